"""The text side of issue-3 parameters: single tokens as logprobs show them (TokenStrings, on the
default model's byte-level BPE and on a sentencepiece vocabulary with byte fallback), and stop
strings that are many, long or self-similar."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyserve.engine.detokenizer import TokenStrings
from pyserve.engine.stop import StopStringMatcher
from pyserve.model.loader import default_model_path, load_model
from pyserve.model.tokenizer import Tokenizer
from pyserve.model.vocab_tokenizer import CONTROL, NORMAL, BYTE, sentencepiece_bpe

# --- TokenStrings ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm_tokenizer() -> Tokenizer:
    return load_model(default_model_path(), load_tensors=False).tokenizer


def test_byte_level_tokens_of_the_default_model(smollm_tokenizer):
    tok = smollm_tokenizer
    strings = TokenStrings(tok)
    text = "Hello wörld 日本 🎉"
    ids = tok.encode(text, add_special_tokens=False)
    got = [strings.get(i) for i in ids]
    # The raw bytes of the tokens spell the text exactly; no byte-alphabet characters leak.
    assert b"".join(raw for _, raw in got).decode("utf-8") == text
    assert got[:2] == [("Hello", b"Hello"), (" w", b" w")]
    assert not any("Ġ" in t or "Ã" in t for t, _ in got)
    # A token holding part of a character shows U+FFFD and keeps its exact bytes.
    partial = [(t, raw) for t, raw in got if "\ufffd" in t]
    assert partial and all(raw.decode("utf-8", errors="replace") == t for t, raw in partial)
    # Special tokens as written.
    eos = tok.token_to_id("<|im_end|>")
    assert strings.get(eos) == ("<|im_end|>", b"<|im_end|>")


def _sentencepiece_tokenizer() -> Tokenizer:
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + ["▁", "a", "b", "▁a", "▁ab", "é"]
    types = [NORMAL, CONTROL, CONTROL] + [BYTE] * 256 + [NORMAL] * 6
    scores = [0.0] * 259 + [-1.0, -2.0, -3.0, -4.0, -5.0, -6.0]
    backend = sentencepiece_bpe(pieces, types, scores=scores, unk_id=0)
    return Tokenizer(backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", add_bos_token=False)


def test_sentencepiece_tokens():
    tok = _sentencepiece_tokenizer()
    strings = TokenStrings(tok)
    ids = tok.encode("ab ab é 日", add_special_tokens=False)
    got = [strings.get(i) for i in ids]
    # '▁' is a space (the decoder strips the text's first one; a lone token keeps it), byte
    # fallback pieces are their byte.
    assert got[0] == (" ab", b" ab")
    assert b"".join(raw for _, raw in got) == " ab ab é 日".encode()
    byte_tokens = [raw for t, raw in got if len(raw) == 1 and raw[0] >= 0x80]
    assert byte_tokens == [bytes([b]) for b in "日".encode()]
    assert strings.get(tok.token_to_id("</s>")) == ("</s>", b"</s>")


def test_other_tokenizers_fall_back_to_decoding_the_token_alone():
    class Plain:
        def decode(self, ids, skip_special_tokens=False):
            return "".join(f"<{i}>" for i in ids)

    strings = TokenStrings(Plain())
    assert strings.get(7) == ("<7>", b"<7>")


def test_ids_outside_the_vocabulary_are_empty(smollm_tokenizer):
    tok = smollm_tokenizer
    assert TokenStrings(tok).get(tok.vocab_size + 10) == ("", b"")


# --- stop strings ---------------------------------------------------------------------------------


def run(stops: list[str], chunks: list[str]) -> tuple[str, bool, str | None]:
    m = StopStringMatcher(stops)
    out = []
    for chunk in chunks:
        text, stopped = m.feed(chunk)
        out.append(text)
        if stopped:
            return "".join(out), True, m.matched
    out.append(m.flush())
    return "".join(out), False, None


def reference(stops: list[str], text: str) -> tuple[str, bool, str | None]:
    """First position where any stop ends; on a tie the longest."""
    stops = [s for s in stops if s]
    for end in range(1, len(text) + 1):
        hits = [s for s in stops if text[:end].endswith(s)]
        if hits:
            best = max(hits, key=len)
            return text[: end - len(best)], True, best
    return text, False, None


@settings(max_examples=300, deadline=None)
@given(
    stops=st.lists(st.text(alphabet="ab", min_size=1, max_size=7), max_size=12),
    text=st.text(alphabet="abc", max_size=40),
    cuts=st.lists(st.integers(min_value=0, max_value=40), max_size=10),
)
def test_many_self_similar_stops_match_like_the_reference(stops, text, cuts):
    bounds = sorted({0, len(text), *[c for c in cuts if c <= len(text)]})
    chunks = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    assert run(stops, chunks) == reference(stops, text)


def test_long_self_similar_stop_string():
    stop = "a" * 300 + "b"
    # 299 a's then b: no match, everything comes out; the partial match is held in between.
    m = StopStringMatcher([stop])
    assert m.feed("a" * 299) == ("", False)
    assert m.feed("b") == ("a" * 299 + "b", False)
    # 400 a's then b, fed one character at a time: the stop is the last 301 characters.
    assert run([stop], ["a"] * 400 + ["b", "tail"]) == ("a" * 100, True, stop)


def test_matcher_state_survives_a_flushed_stream():
    m = StopStringMatcher(["xyz"])
    assert m.feed("xy") == ("", False)
    assert m.flush() == "xy"
