"""Tokenizers of HF directories vs transformers: tokenizer.model (sentencepiece, rebuilt as the
`tokenizers` BPE transformers' LlamaTokenizer builds) and tokenizer.json (Llama 3 and Qwen2 style)."""

from __future__ import annotations

import json
import os
import shutil

import pytest

import tiny_models as tm
from pyserve.model import ModelLoadError, load_model
from pyserve.model.hf_tokenizer import load_hf_tokenizer, pick_chat_template, read_sentencepiece_proto, token_content
from tokenizer_corpus import CORPUS, LONG_TEXT

EXTRA = ["<s>hi</s> there", "<unk>", "x <s> y", " <s>", "<s> ", "</s></s>", "[INST] hi [/INST]"]


def _reference(kind: str):
    from transformers import AutoTokenizer, LlamaTokenizer

    d = tm.tiny_model_dir(kind)
    # AutoTokenizer picks Mistral-specific conversion rules for model_type "mistral"; the directory
    # names LlamaTokenizer, which is what we mirror.
    return LlamaTokenizer.from_pretrained(d) if kind.startswith("mistral") else AutoTokenizer.from_pretrained(d)


@pytest.mark.parametrize("kind", ["llama", "mistral", "llama-bpe", "qwen2"])
def test_ids_and_decode_match_transformers(kind: str) -> None:
    ours = load_model(tm.tiny_model_dir(kind), load_tensors=False).tokenizer
    ref = _reference(kind)
    texts = CORPUS + [LONG_TEXT] + EXTRA
    bad = [(s, ours.encode(s), ref.encode(s)) for s in texts if ours.encode(s) != ref.encode(s)]
    assert not bad, bad[:3]
    for s in texts:
        ids = ours.encode(s)
        assert ours.decode(ids) == ref.decode(ids), s
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True), s
        assert ours.encode(s, add_special_tokens=False) == ref.encode(s, add_special_tokens=False), s
    assert ours.vocab_size == len(ref)
    assert ours.bos_token == ref.bos_token and ours.eos_token == ref.eos_token
    assert set(ref.all_special_ids) <= ours.all_special_ids


def test_bytelevel_roundtrip() -> None:
    for kind in ("llama-bpe", "qwen2"):
        tok = load_model(tm.tiny_model_dir(kind), load_tensors=False).tokenizer
        for s in CORPUS:
            ids = tok.encode(s, add_special_tokens=False)
            # NFC normalisation (qwen2) may change a string; compare with its NFC form.
            import unicodedata

            want = unicodedata.normalize("NFC", s) if kind == "qwen2" else s
            assert tok.decode(ids) == want


def test_sentencepiece_matches_sentencepiece_library() -> None:
    """Away from the two places transformers (and so we) deliberately differ from raw sentencepiece
    - text starting with whitespace, and special tokens written in the text - the ids are
    sentencepiece's own, with BOS prepended."""
    import sentencepiece as spm

    d = tm.tiny_model_dir("llama")
    sp = spm.SentencePieceProcessor(model_file=os.path.join(d, "tokenizer.model"))
    tok = load_model(d, load_tensors=False).tokenizer
    checked = 0
    for s in CORPUS + [LONG_TEXT]:
        if not s or s[0].isspace() or any(t in s for t in ("<s>", "</s>", "<unk>")):
            continue
        assert tok.encode(s) == [1] + sp.encode(s), s
        assert tok.decode(tok.encode(s), skip_special_tokens=True) == sp.decode(sp.encode(s)), s
        checked += 1
    assert checked >= 150


def test_add_bos_and_special_tokens_in_text() -> None:
    tok = load_model(tm.tiny_model_dir("llama"), load_tensors=False).tokenizer
    assert tok.add_bos_token and not tok.add_eos_token
    assert tok.encode("hi")[0] == 1 and tok.encode("hi", add_special_tokens=False)[0] != 1
    assert tok.encode("<s>", add_special_tokens=False) == [1]
    assert tok.encode("</s>", add_special_tokens=False) == [2]
    assert tok.is_special(0) and tok.is_special(1) and tok.is_special(2)
    assert tok.eos_token_ids == [2]


def test_proto_reader() -> None:
    info = read_sentencepiece_proto(tm.spm_model_bytes())
    assert info["model_type"] == 2 and info["add_dummy_prefix"] is True
    assert info["pieces"][:3] == ["<unk>", "<s>", "</s>"] and info["types"][:4] == [2, 3, 3, 6]
    assert len(info["pieces"]) == len(info["scores"]) == len(info["types"]) == 400


def test_tokenizer_config_shapes() -> None:
    assert token_content("<s>") == "<s>"
    assert token_content({"content": "<s>", "special": True}) == "<s>"
    assert token_content(None) is None
    assert pick_chat_template("x", "w") == "x"
    assert pick_chat_template([{"name": "tool_use", "template": "a"}, {"name": "default", "template": "b"}], "w") == "b"
    assert pick_chat_template([{"name": "only", "template": "c"}], "w") == "c"
    with pytest.raises(ModelLoadError, match="no 'default'"):
        pick_chat_template([{"name": "a", "template": "1"}, {"name": "b", "template": "2"}], "w")


def test_added_token_from_config_and_template_file(tmp_path) -> None:
    d = str(tmp_path / "llama")
    shutil.copytree(tm.tiny_model_dir("llama"), d)
    cfg_path = os.path.join(d, "tokenizer_config.json")
    cfg = json.load(open(cfg_path))
    # an added token only the config knows (the next free id), and the template moved to its own file
    cfg["added_tokens_decoder"]["400"] = {"content": "<|tool|>", "special": True}
    template = cfg.pop("chat_template")
    json.dump(cfg, open(cfg_path, "w"))
    open(os.path.join(d, "chat_template.jinja"), "w").write(template)
    tok, source = load_hf_tokenizer(d)
    assert source == template
    assert tok.encode("a<|tool|>b", add_special_tokens=False)[1] == 400
    assert tok.vocab_size == 401 and tok.is_special(400)


def test_unigram_sentencepiece_is_rejected(tmp_path) -> None:
    import io

    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(tm.training_text(300)), model_writer=buf, vocab_size=120, model_type="unigram", minloglevel=2
    )
    (tmp_path / "tokenizer.model").write_bytes(buf.getvalue())
    with pytest.raises(ModelLoadError, match="unigram models are not supported"):
        load_hf_tokenizer(str(tmp_path))
