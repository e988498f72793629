"""IncrementalDetokenizer against real tokenizers trained in-test (milliseconds each):
a byte-level BPE (`tokenizers`) and a sentencepiece model with byte_fallback."""
from __future__ import annotations

import io
from typing import Sequence

import pytest

from pyserve.engine.detokenizer import IncrementalDetokenizer

CORPUS = [
    "Hello world, this is a small corpus for a tiny tokenizer.",
    "The quick brown fox jumps over the lazy dog.",
    "naïve café, déjà vu, crème brûlée and piñata.",
    "Numbers like 12345 and symbols like #, $ and % appear too.",
    "Ünïcödé text is welcome here.",
    "東京は日本の首都です。中文和日本語",  # CJK merges: byte-level tokens that straddle characters
] * 20

TEXTS = [
    "Hello world",
    "naïve café déjà vu",
    "日本語のテキストです。中文也可以。",
    "emoji 🎉 party 👍🏽 family 👨\u200d👩\u200d👧 done",
    "mixed: café 東京 🚀 end",
    "  leading and  double  spaces\nand newlines\n",
]

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


class HFAdapter:
    """The interface-doc Tokenizer methods over a `tokenizers.Tokenizer`."""

    def __init__(self, tok) -> None:
        self.tok = tok
        self.vocab_size = tok.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return [self.tok.id_to_token(i) for i in ids]


class SPAdapter:
    """The interface-doc Tokenizer methods over a SentencePieceProcessor."""

    def __init__(self, sp) -> None:
        self.sp = sp
        self.vocab_size = sp.get_piece_size()
        self.bos_token_id = sp.bos_id()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.sp.encode(text)
        return [self.bos_token_id, *ids] if add_special_tokens else ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.sp.decode(list(ids))  # control pieces (<s>, </s>) decode to nothing

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return [self.sp.id_to_piece(i) for i in ids]


@pytest.fixture(scope="module")
def bpe() -> HFAdapter:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=SPECIALS
    )
    tok.train_from_iterator(CORPUS, trainer)
    return HFAdapter(tok)


@pytest.fixture(scope="module")
def spm() -> SPAdapter:
    import sentencepiece

    buf = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_writer=buf,
        vocab_size=400,
        byte_fallback=True,
        character_coverage=1.0,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    return SPAdapter(sentencepiece.SentencePieceProcessor(model_proto=buf.getvalue()))


@pytest.fixture(params=["bpe", "spm"])
def tokenizer(request):
    return request.getfixturevalue(request.param)


def stream(tok, ids: Sequence[int], prompt: Sequence[int] = (), step: int = 1, skip: bool = True) -> list[str]:
    """Feeds `ids` `step` at a time; returns every add() result, then flush()."""
    d = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip)
    pieces = [d.add(ids[i : i + step]) for i in range(0, len(ids), step)]
    pieces.append(d.flush())
    return pieces


@pytest.mark.parametrize("text", TEXTS)
def test_one_token_at_a_time_equals_full_decode(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces = stream(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids)
    assert not any("\ufffd" in p for p in pieces), pieces  # never a broken character


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("step", [2, 3, 7])
def test_several_tokens_per_step(tokenizer, text, step):
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces = stream(tokenizer, ids, step=step)
    assert "".join(pieces) == tokenizer.decode(ids)
    assert not any("\ufffd" in p for p in pieces)


@pytest.mark.parametrize("text", TEXTS[2:5])
def test_texts_really_split_characters_across_tokens(tokenizer, text):
    # Guard for the tests above: CJK/emoji must arrive as partial UTF-8 in single tokens.
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)


def test_bpe_has_tokens_straddling_characters(bpe):
    # A token that ends inside one character and starts inside another (not just a lone byte).
    ids = bpe.encode(TEXTS[2], add_special_tokens=False)
    pieces = [bpe.decode([i]) for i in ids]
    # e.g. "日" + the first bytes of "本" decode to "日\ufffd".
    assert any(len(p) >= 2 and "\ufffd" in p for p in pieces), pieces


@pytest.mark.parametrize("text", TEXTS)
def test_continuation_after_prompt(tokenizer, text):
    """Split a sequence into prompt + output at every character boundary: the streamed output
    is exactly the full decode minus the prompt's decode (leading spaces included)."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    full = tokenizer.decode(ids)
    checked = 0
    for k in range(1, len(ids)):
        prefix = tokenizer.decode(ids[:k])
        if prefix.endswith("\ufffd") or not full.startswith(prefix):
            continue  # the prompt would end inside a character
        pieces = stream(tokenizer, ids[k:], prompt=ids[:k])
        assert "".join(pieces) == full[len(prefix) :], (k, pieces)
        assert not any("\ufffd" in p for p in pieces)
        checked += 1
    assert checked > 0


def test_sentencepiece_leading_space_is_kept(spm):
    ids = spm.encode("Hello world", add_special_tokens=True)
    pieces = spm.convert_ids_to_tokens(ids)
    k = next(i for i, p in enumerate(pieces) if p.startswith("▁w"))
    assert spm.decode(ids[k:]) == "world"  # decoded alone, the space is lost...
    out = "".join(stream(spm, ids[k:], prompt=ids[:k]))
    assert out == " world"  # ...but not in context


def test_bpe_leading_space_is_kept(bpe):
    prompt = bpe.encode("Hello", add_special_tokens=False)
    out_ids = bpe.encode(" world", add_special_tokens=False)
    assert "".join(stream(bpe, out_ids, prompt=prompt)) == " world"


def test_skip_special_tokens(bpe):
    end = bpe.tok.token_to_id("<|im_end|>")
    ids = bpe.encode("hi", add_special_tokens=False) + [end] + bpe.encode(" there", add_special_tokens=False)
    assert "".join(stream(bpe, ids, skip=True)) == "hi there"
    assert "".join(stream(bpe, ids, skip=False)) == "hi<|im_end|> there"


def test_only_special_tokens_yield_nothing(bpe):
    end = bpe.tok.token_to_id("<|im_end|>")
    d = IncrementalDetokenizer(bpe, bpe.encode("a", add_special_tokens=False))
    assert d.add([end]) == ""
    assert d.add(bpe.encode("b", add_special_tokens=False)) == "b"
    assert d.output_ids[0] == end


def test_incomplete_character_is_held_then_flushed(bpe):
    ids = bpe.encode("🚀", add_special_tokens=False)
    assert len(ids) > 1
    d = IncrementalDetokenizer(bpe)
    assert d.add(ids[:1]) == ""
    # The stream ended mid-character: flush gives the honest (replacement) decode.
    assert d.flush() == bpe.decode(ids[:1])
    assert d.add([]) == ""


def test_invalid_byte_is_released_by_the_next_clean_token(bpe):
    bad = bpe.tok.token_to_id("ÿ")  # byte-level alphabet: the lone byte 0xFF, never valid UTF-8
    ok = bpe.encode(" ok", add_special_tokens=False)
    d = IncrementalDetokenizer(bpe, bpe.encode("a", add_special_tokens=False))
    assert d.add([bad]) == ""
    assert d.add(ok) == "\ufffd ok"  # the honest decode, emitted as soon as the text is settled
    assert d.flush() == ""
