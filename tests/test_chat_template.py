"""ChatTemplate renders like transformers' apply_chat_template(..., tokenize=False)."""

from __future__ import annotations

import datetime
import json
import os
import shutil

import pytest

import tiny_models as tm
from pyserve.model import FALLBACK_TEMPLATE, ChatTemplate, ChatTemplateError, default_model_path, load_model

SYSTEM = {"role": "system", "content": "You are terse."}
CONVERSATIONS = {
    "single": [{"role": "user", "content": "Hi!"}],
    "system": [SYSTEM, {"role": "user", "content": "What is 2+2?"}],
    "multi": [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi, how can I help?"},
        {"role": "user", "content": "Tell me a joke about <|im_start|> tokens\n\nplease"},
    ],
    "system-multi": [
        SYSTEM,
        {"role": "user", "content": "One"},
        {"role": "assistant", "content": "Two"},
        {"role": "user", "content": "Three  "},
    ],
}


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("gen", [True, False])
def test_default_model_matches_transformers(name: str, gen: bool) -> None:
    ours = tm.default_model().chat_template
    ref = tm.hf_gguf_tokenizer(default_model_path())
    msgs = CONVERSATIONS[name]
    assert ours.render(msgs, add_generation_prompt=gen) == ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)


def test_default_model_prompt_text() -> None:
    text = tm.default_model().chat_template.render(CONVERSATIONS["single"])
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
    )


# (the Mistral template rejects system messages: tested below)
_TINY_CASES = [
    (kind, name)
    for kind in ("llama", "llama-bpe", "qwen2", "mistral")
    for name in sorted(CONVERSATIONS)
    if not (kind == "mistral" and CONVERSATIONS[name][0]["role"] == "system")
]


@pytest.mark.parametrize("kind, name", _TINY_CASES)
def test_tiny_dirs_match_transformers(kind: str, name: str) -> None:
    from transformers import AutoTokenizer

    msgs = CONVERSATIONS[name]
    ours = load_model(tm.tiny_model_dir(kind), load_tensors=False).chat_template
    ref = AutoTokenizer.from_pretrained(tm.tiny_model_dir(kind))
    assert ours.render(msgs) == ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert ours.render(msgs, add_generation_prompt=False) == ref.apply_chat_template(msgs, tokenize=False)


def test_bos_token_variable() -> None:
    t = load_model(tm.tiny_model_dir("llama"), load_tensors=False).chat_template
    assert t.render(CONVERSATIONS["single"]) == "<s>[INST] Hi! [/INST]"


def test_raise_exception_becomes_chat_template_error() -> None:
    t = load_model(tm.tiny_model_dir("mistral"), load_tensors=False).chat_template
    with pytest.raises(ChatTemplateError, match="Only user and assistant roles are supported!") as e:
        t.render([{"role": "user", "content": "a"}, SYSTEM])
    assert isinstance(e.value, ValueError)
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        t.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_syntax_and_runtime_errors() -> None:
    with pytest.raises(ChatTemplateError, match="syntax error"):
        ChatTemplate("{% for m in messages %}", None, None)
    t = ChatTemplate("{{ messages[0]['content'].nope() }}", None, None)
    with pytest.raises(ChatTemplateError):
        t.render([{"role": "user", "content": "x"}])
    with pytest.raises(ChatTemplateError):
        ChatTemplate("{{ undefined_thing.attr }}", None, None).render([])
    with pytest.raises(ChatTemplateError):
        t.render("not a list")  # type: ignore[arg-type]


def test_sandbox_blocks_internals() -> None:
    t = ChatTemplate("{{ ''.__class__.__mro__[1].__subclasses__() }}", None, None)
    with pytest.raises(ChatTemplateError):
        t.render([])
    ns = ChatTemplate("{% set ns = namespace(_x=1) %}{{ ns._x }}", None, None)
    with pytest.raises(ChatTemplateError):
        ns.render([])
    with pytest.raises(ChatTemplateError):
        ChatTemplate("{% set _ = messages.append(1) %}", None, None).render([])  # immutable sandbox


def test_helpers_and_extra_variables() -> None:
    t = ChatTemplate(
        "{{ bos_token }}|{{ messages | tojson }}|{{ tools | tojson }}|{{ strftime_now('%Y') }}|{{ custom }}"
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}[{{ m.role }}]{% endfor %}",
        "<s>",
        "</s>",
    )
    out = t.render(
        [{"role": "user", "content": "<b>&é", "name": None}, {"role": "assistant", "content": "x"}],
        tools=[{"type": "function"}],
        custom="C",
    )
    # tojson does not HTML-escape and keeps non-ASCII; None-valued keys are dropped first
    assert out == (
        '<s>|[{"role": "user", "content": "<b>&é"}, {"role": "assistant", "content": "x"}]|[{"type": "function"}]|'
        f"{datetime.datetime.now().year}|C[user]"
    )
    assert ChatTemplate("{{ tools is none }}{{ documents is none }}", None, None).render([]) == "TrueTrue"


def test_trim_and_lstrip_blocks() -> None:
    t = ChatTemplate("{% for m in messages %}\n    {{ m.content }}\n{% endfor %}", None, None)
    assert t.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]) == "    a\n    b\n"


def test_fallback_template() -> None:
    t = ChatTemplate(None, "<s>", "</s>")
    assert t.is_fallback and t.source == FALLBACK_TEMPLATE
    msgs = [SYSTEM, {"role": "user", "content": "Hi"}]
    assert t.render(msgs) == "System: You are terse.\n\nUser: Hi\n\nAssistant:"
    assert t.render(msgs, add_generation_prompt=False) == "System: You are terse.\n\nUser: Hi\n\n"


def test_model_without_template_gets_fallback(tmp_path) -> None:
    d = str(tmp_path / "qwen2")
    shutil.copytree(tm.tiny_model_dir("qwen2"), d)
    cfg_path = os.path.join(d, "tokenizer_config.json")
    cfg = json.load(open(cfg_path))
    del cfg["chat_template"]
    json.dump(cfg, open(cfg_path, "w"))
    t = load_model(d, load_tensors=False).chat_template
    assert t.is_fallback
    assert t.render([{"role": "user", "content": "Hi"}]) == "User: Hi\n\nAssistant:"


def test_broken_template_fails_load(tmp_path) -> None:
    from pyserve.model import ModelLoadError

    d = str(tmp_path / "qwen2")
    shutil.copytree(tm.tiny_model_dir("qwen2"), d)
    cfg_path = os.path.join(d, "tokenizer_config.json")
    cfg = json.load(open(cfg_path))
    cfg["chat_template"] = "{% if %}"
    json.dump(cfg, open(cfg_path, "w"))
    with pytest.raises(ModelLoadError, match="syntax error"):
        load_model(d, load_tensors=False)
