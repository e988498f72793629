"""GGUF tokenizers rebuilt from metadata vs transformers' GGUF tokenizer (AutoTokenizer with
gguf_file=...): the default SmolLM2 model (byte-level BPE, pre "smollm") on a varied corpus, and tiny
GGUFs written here for the sentencepiece (`llama`) and other byte-level (`qwen2`, `llama-bpe`) paths."""

from __future__ import annotations

import copy
import re

import pytest

import tiny_models as tm
from pyserve.model import ModelLoadError, default_model_path
from pyserve.model.vocab_tokenizer import SUPPORTED_PRE_TOKENIZERS, byte_level_bpe
from tokenizer_corpus import CORPUS, LONG_TEXT


@pytest.fixture(scope="module")
def ours():
    return tm.default_model().tokenizer


@pytest.fixture(scope="module")
def ref():
    return tm.hf_gguf_tokenizer(default_model_path())


@pytest.fixture(scope="module")
def ref_smollm(ref):
    """transformers' GGUF tokenizer with the pre-tokenizer llama.cpp uses for "smollm" (and SmolLM2's
    own tokenizer.json has): every digit split off first, then the GPT-2 regex. transformers knows no
    "smollm" entry and falls back to the bare GPT-2 regex."""
    from tokenizers import pre_tokenizers

    backend = copy.deepcopy(ref.backend_tokenizer)
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    return backend


def test_corpus_ids_match_transformers(ours, ref, ref_smollm) -> None:
    mismatches = [s for s in CORPUS + [LONG_TEXT] if ours.encode(s) != ref_smollm.encode(s).ids]
    assert not mismatches, mismatches[:3]
    # Against transformers as it ships, the only differences are runs of 2+ whitespace characters
    # right before a digit (llama.cpp keeps the run whole: "  3" -> "ĠĠ", "3"; transformers' GPT-2
    # regex gives "Ġ", "Ġ3" -> "Ġ", "Ġ", "3").
    differ = [s for s in CORPUS + [LONG_TEXT] if ours.encode(s) != ref.encode(s)]
    assert all(re.search(r"\s{2,}\d", s) for s in differ), [s for s in differ if not re.search(r"\s{2,}\d", s)]
    assert len(CORPUS) - len(differ) >= 200
    assert ours.encode("a  3") != ref.encode("a  3")
    assert ours.convert_ids_to_tokens(ours.encode("a  3")) == ["a", "ĠĠ", "3"]
    assert ref.convert_ids_to_tokens(ref.encode("a  3")) == ["a", "Ġ", "Ġ", "3"]


def test_batch_and_no_special_tokens(ours, ref) -> None:
    assert ours.encode_batch(CORPUS[:50]) == [ref.encode(s) for s in CORPUS[:50]]
    assert ours.encode("<|im_start|>hi", add_special_tokens=False) == ref.encode("<|im_start|>hi", add_special_tokens=False)


def test_decode_roundtrip_and_matches_transformers(ours, ref) -> None:
    for s in CORPUS + [LONG_TEXT]:
        ids = ours.encode(s)
        assert ours.decode(ids) == s
        assert ours.decode(ids) == ref.decode(ids)
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)


def test_pieces_and_specials(ours, ref) -> None:
    ids = ours.encode("<|im_start|>user\nHello, wörld 123 🙂<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert ours.convert_ids_to_tokens(ids) == ref.convert_ids_to_tokens(ids)
    assert ours.convert_ids_to_tokens([10**6]) == [None]
    assert ours.decode([ids[1], 10**6, ids[2]]) == ours.decode([ids[1], ids[2]])  # out-of-vocab ids vanish
    assert ours.bos_token == "<|im_start|>" and ours.eos_token == "<|im_end|>"
    assert ours.bos_token_id == 1 and ours.eos_token_ids[0] == 2
    assert not ours.add_bos_token and not ours.add_eos_token
    assert set(range(17)) <= ours.all_special_ids  # the 17 CONTROL tokens
    assert ours.is_special(0) and not ours.is_special(ids[1])
    assert set(ref.all_special_ids) <= ours.all_special_ids
    with pytest.raises(ValueError):
        ours.decode([-1])


def test_digits_are_split_like_llamacpp_smollm(ours) -> None:
    # llama.cpp's "smollm" pre-tokenizer isolates every digit (\p{N}) before the GPT-2 regex.
    ids = ours.encode("12345")
    assert len(ids) == 5 and ours.decode(ids) == "12345"


@pytest.mark.parametrize("kind, quant", [("llama", "Q8_0"), ("mistral", "Q4_0"), ("qwen2", "Q4_1"), ("llama-bpe", "F16")])
def test_tiny_gguf_tokenizers_match_transformers(kind: str, quant: str) -> None:
    from pyserve.model import load_model

    path = tm.tiny_gguf(kind, quant)
    ours = load_model(path, load_tensors=False).tokenizer
    ref = tm.hf_gguf_tokenizer(path)
    texts = CORPUS + [LONG_TEXT, "<s>hi</s> there", "<unk>", "x <s> y"]
    # transformers' GPT-2 builder adds its default "<|endoftext|>" as a *new* id past the vocabulary
    # when the file has no such token (llama-bpe here); those strings say nothing about parity.
    texts = [s for s in texts if max(ref.encode(s), default=0) < ours.vocab_size]
    assert len(texts) >= 200
    bad = [(s, ours.encode(s), ref.encode(s)) for s in texts if ours.encode(s) != ref.encode(s)]
    assert not bad, bad[:3]
    for s in texts:
        ids = ours.encode(s)
        assert ours.decode(ids) == ref.decode(ids), s
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True), s
    if kind in ("llama", "mistral"):
        assert ours.add_bos_token and ours.encode("hi")[0] == ours.bos_token_id == 1


def test_unknown_pre_tokenizer_is_an_error() -> None:
    with pytest.raises(ModelLoadError, match="pre-tokenizer 'made-up'.*supported:.*smollm"):
        byte_level_bpe(["a", "b", "ab"], ["a b"], None, "made-up")
    assert {"gpt2", "smollm", "llama-bpe", "qwen2"} <= set(SUPPORTED_PRE_TOKENIZERS)


def test_unsupported_tokenizer_model() -> None:
    from pyserve.model.gguf_file import build_tokenizer

    with pytest.raises(ModelLoadError, match="tokenizer model 'bert' is not supported; supported: gpt2, llama"):
        build_tokenizer({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]}, "x.gguf")


def test_llama_vocab_without_space_prefix(tmp_path) -> None:
    """tokenizer.ggml.add_space_prefix = false: no '▁' is prepended (and none stripped on decode)."""
    from pyserve.model import load_model

    with_prefix = load_model(tm.tiny_gguf("llama"), load_tensors=False).tokenizer
    path = tm.write_gguf(tm.tiny_model_dir("llama"), str(tmp_path / "noprefix.gguf"), add_space_prefix=False)
    tok = load_model(path, load_tensors=False).tokenizer
    assert with_prefix.convert_ids_to_tokens(with_prefix.encode("hello", add_special_tokens=False))[0].startswith("▁")
    pieces = tok.convert_ids_to_tokens(tok.encode("hello world", add_special_tokens=False))
    assert not pieces[0].startswith("▁") and any(p.startswith("▁") for p in pieces)
    for s in CORPUS:
        assert tok.decode(tok.encode(s), skip_special_tokens=True) == s.replace("<s>", "").replace("</s>", "").replace("<unk>", "")


def test_generate_merges_matches_transformers() -> None:
    """Same merge order as transformers' generate_merges, ties in the scores included (seeded
    random vocabulary: every piece's splits are candidates)."""
    import random

    from transformers.tokenization_utils_base import generate_merges as hf_generate_merges

    from pyserve.model.vocab_tokenizer import generate_merges

    rng = random.Random(1234)
    alphabet = "▁abcdeéx"
    pieces = list(dict.fromkeys(alphabet))
    while len(pieces) < 600:
        pieces.append("".join(rng.choice(alphabet) for _ in range(rng.randint(2, 6))))
        pieces = list(dict.fromkeys(pieces))
    vocab = {p: i for i, p in enumerate(pieces)}
    scores = {p: float(-(i // 4)) for i, p in enumerate(pieces)}  # four pieces share each score
    ours = generate_merges(vocab, scores)
    assert len(ours) > 400
    assert ours == hf_generate_merges(vocab, scores)
    assert generate_merges(vocab) == hf_generate_merges(vocab)


def test_byte_level_vocab_quirks(caplog) -> None:
    """A normal token outside the byte alphabet is respelled byte by byte (added tokens keep their
    raw text); a token listed twice keeps its first id; a merge that is not two tokens is an error."""
    from pyserve.model.vocab_tokenizer import CONTROL, NORMAL

    tokens = ["a", "b", "Ġ", "ab", "a b", "<|x y|>", "a"]
    types = [NORMAL, NORMAL, NORMAL, NORMAL, NORMAL, CONTROL, NORMAL]
    backend = byte_level_bpe(tokens, ["a b"], types, "gpt2")
    assert backend.token_to_id("aĠb") == 4 and backend.token_to_id("a b") is None
    assert backend.token_to_id("<|x y|>") == 5
    assert backend.token_to_id("a") == 0 and "duplicate token 'a' at ids 0 and 6" in caplog.text
    assert backend.encode("ab<|x y|>").ids == [3, 5]
    with pytest.raises(ModelLoadError, match="GGUF merge 'a b c' is not two space-separated tokens"):
        byte_level_bpe(tokens, ["a b", "a b c"], types, "gpt2")
    with pytest.raises(ModelLoadError, match="GGUF merge 'ab' is not two"):
        byte_level_bpe(tokens, ["ab"], types, "gpt2")
