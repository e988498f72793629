"""Tiny random-initialised checkpoints for tests (uses torch/transformers/sentencepiece: test-only).

    make_llama(dir, dtype=torch.float32, tokenizer="spm" | "bpe")   Llama 3 style rope (llama3 scaling), tied
    make_mistral(dir, ...)                                          sliding_window 16, sentencepiece (legacy)
    make_qwen2(dir, ...)                                            q/k/v biases, byte-level BPE, ChatML
    write_gguf(hf_dir, path, ...)                                   the same model as a GGUF file, written
                                                                    the way llama.cpp's converter does

All share: hidden 64, 2 layers, 4 heads, 2 kv heads, head_dim 16, intermediate 128, max_position 512,
a vocabulary of a few hundred tokens trained here in well under a second (model vocab = tokenizer
vocab), seeded weights. Everything is deterministic: same arguments, same bytes.
"""

from __future__ import annotations

import io
import json
import os
import random
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, INTER, MAX_POS = 64, 2, 4, 2, 16, 128, 512

# Chat templates in the style of the real models (short versions).
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
QWEN2_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def training_text(n_lines: int = 1500, seed: int = 0) -> list[str]:
    """Deterministic made-up text with prose, code, digits, accents, CJK and emoji."""
    rng = random.Random(seed)
    words = (
        "the quick brown fox jumps over a lazy dog while servers batch tokens and caches hold keys "
        "values attention layers weights model decode prefill prompt stream request reply hello world "
        "def return class import print self value None True False for in if else"
    ).split()
    extras = ["café", "naïve", "Über", "façade", "中文", "测试", "日本語", "🙂", "🚀", "x = 42", "f(a, b)", "{}", "[]", "#!"]
    lines = []
    for i in range(n_lines):
        n = rng.randint(3, 14)
        toks = [rng.choice(words) if rng.random() > 0.1 else rng.choice(extras) for _ in range(n)]
        line = " ".join(toks)
        if i % 3 == 0:
            line += f" {rng.randint(0, 99999)}"
        if i % 7 == 0:
            line = "    " + line.replace(" ", "_", 1) + ":"
        lines.append(line + rng.choice([".", "!", "?", ",", "", "\n"]))
    return lines


@lru_cache(maxsize=4)
def spm_model_bytes(vocab_size: int = 400) -> bytes:
    """A sentencepiece BPE model trained like Llama's: identity normalisation, dummy prefix, no
    whitespace squashing, digits split, byte fallback. <unk>=0, <s>=1, </s>=2."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(training_text()),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    return buf.getvalue()


def bpe_tokenizer(style: str = "llama3", vocab_size: int = 420):
    """A byte-level BPE `tokenizers.Tokenizer` trained here; style "llama3" or "qwen2"."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    specials = LLAMA3_SPECIALS if style == "llama3" else QWEN2_SPECIALS
    split = LLAMA3_SPLIT if style == "llama3" else QWEN2_SPLIT
    tok = Tokenizer(models.BPE(ignore_merges=style == "llama3"))
    if style == "qwen2":
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(split), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(specials),
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(training_text(), trainer=trainer)
    tok.add_special_tokens(specials)  # appended after the trained vocabulary, like the real models
    if style == "llama3":
        bos = specials[0]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    return tok


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False), encoding="utf-8")


def _special(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}


def _write_tokenizer(d: Path, kind: str) -> dict:
    """Write tokenizer files; return {vocab_size, bos_token_id, eos_token_id(s)} for the config."""
    if kind in ("spm", "spm-legacy"):
        (d / "tokenizer.model").write_bytes(spm_model_bytes())
        import sentencepiece as spm

        n = spm.SentencePieceProcessor(model_proto=spm_model_bytes()).get_piece_size()
        legacy = kind == "spm-legacy"
        _write_json(
            d / "tokenizer_config.json",
            {
                "add_bos_token": True,
                "add_eos_token": False,
                "added_tokens_decoder": {"0": _special("<unk>"), "1": _special("<s>"), "2": _special("</s>")},
                "bos_token": {"__type": "AddedToken", **_special("<s>")},  # dict form, as older configs write it
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "pad_token": None,
                "legacy": legacy,
                "clean_up_tokenization_spaces": False,
                "model_max_length": MAX_POS,
                "tokenizer_class": "LlamaTokenizer",
                "chat_template": MISTRAL_TEMPLATE if legacy else LLAMA2_TEMPLATE,
            },
        )
        return {"vocab_size": n, "bos_token_id": 1, "eos_token_id": 2}
    style = {"bpe": "llama3", "bpe-qwen2": "qwen2"}[kind]
    tok = bpe_tokenizer(style)
    tok.save(str(d / "tokenizer.json"))
    n = tok.get_vocab_size(with_added_tokens=True)
    decoder = {str(tok.token_to_id(s)): _special(s) for s in (LLAMA3_SPECIALS if style == "llama3" else QWEN2_SPECIALS)}
    if style == "llama3":
        _write_json(
            d / "tokenizer_config.json",
            {
                "added_tokens_decoder": decoder,
                "bos_token": "<|begin_of_text|>",
                "eos_token": "<|eot_id|>",
                "clean_up_tokenization_spaces": False,
                "model_max_length": MAX_POS,
                "tokenizer_class": "PreTrainedTokenizerFast",
                # the list form: a named "default" plus another
                "chat_template": [{"name": "default", "template": LLAMA3_TEMPLATE}, {"name": "tool_use", "template": "{{ 'tools' }}"}],
            },
        )
        return {
            "vocab_size": n,
            "bos_token_id": tok.token_to_id("<|begin_of_text|>"),
            "eos_token_id": [tok.token_to_id("<|end_of_text|>"), tok.token_to_id("<|eot_id|>")],
        }
    _write_json(
        d / "tokenizer_config.json",
        {
            "added_tokens_decoder": decoder,
            "bos_token": None,
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "errors": "replace",
            "split_special_tokens": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": MAX_POS,
            "tokenizer_class": "Qwen2Tokenizer",
            "chat_template": CHATML_TEMPLATE,
        },
    )
    return {"vocab_size": n, "bos_token_id": None, "eos_token_id": [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]}


def _save(model, d: Path, dtype, max_shard_size, seed: int, init_std: float, gen: dict) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(init_std * torch.randn_like(p))
    model = model.to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(d), **kwargs)
    g = {"bos_token_id": gen.get("bos_token_id"), "eos_token_id": gen["eos_token_id"], "do_sample": True, "temperature": 0.7, "top_p": 0.9}
    _write_json(d / "generation_config.json", g)


def _common(tok: dict, **over) -> dict:
    kw = dict(
        vocab_size=tok["vocab_size"],
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=MAX_POS,
        rms_norm_eps=1e-5,
        bos_token_id=tok["bos_token_id"],
        eos_token_id=tok["eos_token_id"],
    )
    kw.update(over)
    return kw


def make_llama(
    d,
    *,
    dtype=torch.float32,
    tokenizer: str = "spm",
    max_shard_size: str | None = None,
    seed: int = 0,
    init_std: float = 0.1,
    rope_scaling: dict | None = None,
) -> str:
    """Llama with Llama 3 style rope (theta 500000, llama3 scaling) and tied embeddings.
    init_std 0.1 (not HF's 0.02) so the tiny model's logits are far from ties."""
    from transformers import LlamaConfig, LlamaForCausalLM

    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    tok = _write_tokenizer(d, tokenizer)
    if rope_scaling is None:
        rope_scaling = {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
    cfg = LlamaConfig(**_common(tok, rope_theta=500000.0, rope_scaling=rope_scaling, tie_word_embeddings=True))
    torch.manual_seed(seed)
    _save(LlamaForCausalLM(cfg), d, dtype, max_shard_size, seed, init_std, tok)
    return str(d)


def make_mistral(
    d, *, dtype=torch.float32, tokenizer: str = "spm-legacy", max_shard_size: str | None = None, seed: int = 1, init_std: float = 0.1
) -> str:
    """Mistral with sliding_window 16 (shorter than a 64-token prompt), untied."""
    from transformers import MistralConfig, MistralForCausalLM

    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    tok = _write_tokenizer(d, tokenizer)
    cfg = MistralConfig(**_common(tok, rope_theta=10000.0, sliding_window=16, tie_word_embeddings=False))
    torch.manual_seed(seed)
    _save(MistralForCausalLM(cfg), d, dtype, max_shard_size, seed, init_std, tok)
    return str(d)


def make_qwen2(
    d, *, dtype=torch.float32, tokenizer: str = "bpe-qwen2", max_shard_size: str | None = None, seed: int = 2, init_std: float = 0.1
) -> str:
    """Qwen2 (q/k/v biases), untied, sliding window configured but off (use_sliding_window False)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    tok = _write_tokenizer(d, tokenizer)
    cfg = Qwen2Config(
        **_common(tok, rope_theta=1000000.0, tie_word_embeddings=False, use_sliding_window=False, sliding_window=32)
    )
    torch.manual_seed(seed)
    _save(Qwen2ForCausalLM(cfg), d, dtype, max_shard_size, seed, init_std, tok)
    return str(d)


# ---------------------------------------------------------------------------------------------
# GGUF writer: a tiny HF directory -> GGUF the way llama.cpp's convert_hf_to_gguf.py lays it out.

_HF_TO_GGUF_BLOCK = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(hf: str) -> str:
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    parts = hf.split(".")
    return f"blk.{parts[2]}.{_HF_TO_GGUF_BLOCK['.'.join(parts[3:])]}"


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_state(hf_dir: str) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    out = {}
    for f in sorted(p for p in os.listdir(hf_dir) if p.endswith(".safetensors")):
        with safe_open(os.path.join(hf_dir, f), framework="pt") as sf:
            for k in sf.keys():
                out[k] = sf.get_tensor(k).float().numpy()
    return out


def write_gguf(
    hf_dir: str,
    path: str,
    *,
    quant: str = "Q8_0",
    name: str = "tiny",
    pre: str | None = None,
    add_space_prefix: bool | None = None,
    sampling: dict | None = None,
) -> str:
    """Write the model in `hf_dir` as a GGUF file. Arch "llama" for Llama/Mistral (q/k permuted),
    "qwen2" for Qwen2. 2-D weights use `quant` (Q8_0, Q4_0, Q4_1, F16, BF16 or F32), norms F32.
    Tokenizer metadata: `llama` (sentencepiece pieces + scores + types) when the directory has a
    tokenizer.model, else `gpt2` (byte-level tokens + merges) with pre `pre` (default by arch)."""
    import gguf

    cfg = json.loads(Path(hf_dir, "config.json").read_text())
    arch = "qwen2" if cfg["model_type"] == "qwen2" else "llama"
    w = gguf.GGUFWriter(path, arch)
    w.add_name(name)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    rope = cfg.get("rope_parameters") or {}
    w.add_rope_freq_base(float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_rope_dimension_count(cfg["head_dim"])

    state = _hf_state(hf_dir)
    if cfg.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    if rope.get("rope_type") == "llama3":
        # llama.cpp bakes llama3 scaling into a rope_freqs tensor.
        from pyserve.model.gguf_file import llama3_rope_factors

        factors = llama3_rope_factors(
            cfg["head_dim"], rope["rope_theta"], rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"], rope["original_max_position_embeddings"]
        )
        w.add_tensor("rope_freqs.weight", factors)
    qtype = gguf.GGMLQuantizationType[quant]
    for hf, t in state.items():
        if arch == "llama" and ".q_proj." in hf:
            t = llamacpp_permute(t, cfg["num_attention_heads"])
        elif arch == "llama" and ".k_proj." in hf:
            t = llamacpp_permute(t, cfg["num_key_value_heads"])
        t = np.ascontiguousarray(t, dtype=np.float32)
        if t.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(gguf_name(hf), t)
        elif qtype == gguf.GGMLQuantizationType.F16:
            w.add_tensor(gguf_name(hf), t.astype(np.float16))
        else:
            w.add_tensor(gguf_name(hf), gguf.quants.quantize(t, qtype), raw_dtype=qtype)

    for key, value in (sampling or {}).items():  # e.g. {"temp": 0.6, "top_k": 20, "top_p": 0.95}
        getattr(w, f"add_sampling_{key}")(value)

    tok_cfg = json.loads(Path(hf_dir, "tokenizer_config.json").read_text())
    if os.path.exists(os.path.join(hf_dir, "tokenizer.model")):
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=os.path.join(hf_dir, "tokenizer.model"))
        n = sp.get_piece_size()
        types = []
        for i in range(n):
            types.append(
                gguf.TokenType.UNKNOWN if sp.is_unknown(i) else gguf.TokenType.CONTROL if sp.is_control(i)
                else gguf.TokenType.BYTE if sp.is_byte(i) else gguf.TokenType.UNUSED if sp.is_unused(i) else gguf.TokenType.NORMAL
            )
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list([sp.id_to_piece(i) for i in range(n)])
        w.add_token_scores([sp.get_score(i) for i in range(n)])
        w.add_token_types(types)
        w.add_bos_token_id(sp.bos_id())
        w.add_eos_token_id(sp.eos_id())
        w.add_unk_token_id(sp.unk_id())
        w.add_add_bos_token(True)
        w.add_add_eos_token(False)
        w.add_add_space_prefix(True if add_space_prefix is None else add_space_prefix)
    else:
        tj = json.loads(Path(hf_dir, "tokenizer.json").read_text())
        vocab = dict(tj["model"]["vocab"])
        specials = {}
        for a in tj["added_tokens"]:
            vocab[a["content"]] = a["id"]
            if a["special"]:
                specials[a["content"]] = a["id"]
        tokens = [None] * len(vocab)
        for t, i in vocab.items():
            tokens[i] = t
        types = [gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL for t in tokens]
        merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre or ("qwen2" if arch == "qwen2" else "llama-bpe"))
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        eos = tok_cfg["eos_token"]
        w.add_eos_token_id(vocab[eos])
        if tok_cfg.get("bos_token"):
            w.add_bos_token_id(vocab[tok_cfg["bos_token"]])
            w.add_add_bos_token(True)
        else:
            w.add_bos_token_id(vocab["<|endoftext|>"])  # llama.cpp's Qwen2 converter does this
            w.add_add_bos_token(False)
        if tok_cfg.get("pad_token"):
            w.add_pad_token_id(vocab[tok_cfg["pad_token"]])
    tmpl = tok_cfg.get("chat_template")
    if isinstance(tmpl, list):
        tmpl = next(t["template"] for t in tmpl if t["name"] == "default")
    if tmpl:
        w.add_chat_template(tmpl)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ---------------------------------------------------------------------------------------------
# Session-wide caches (one process runs all test modules; building/loading once saves seconds).

_TMP_ROOT: str | None = None


def _tmp_root() -> str:
    global _TMP_ROOT
    if _TMP_ROOT is None:
        import atexit
        import shutil
        import tempfile

        _TMP_ROOT = tempfile.mkdtemp(prefix="pyserve-tiny-")
        atexit.register(shutil.rmtree, _TMP_ROOT, True)
    return _TMP_ROOT


_MAKERS = {
    # kind: (maker, kwargs)
    "llama": (make_llama, {}),
    "llama-bpe": (make_llama, {"tokenizer": "bpe"}),
    "llama-bf16-sharded": (make_llama, {"tokenizer": "bpe", "dtype": torch.bfloat16, "max_shard_size": "100KB"}),
    "mistral": (make_mistral, {}),
    "mistral-f16": (make_mistral, {"dtype": torch.float16}),
    "qwen2": (make_qwen2, {}),
}


@lru_cache(maxsize=None)
def tiny_model_dir(kind: str) -> str:
    """A cached tiny HF directory: llama, llama-bpe, llama-bf16-sharded, mistral, mistral-f16, qwen2.
    Treat it as read-only (copy it before changing files)."""
    maker, kwargs = _MAKERS[kind]
    return maker(os.path.join(_tmp_root(), kind), **kwargs)


@lru_cache(maxsize=None)
def tiny_gguf(kind: str, quant: str = "Q8_0") -> str:
    """A cached GGUF of tiny_model_dir(kind); returns the file path (its directory holds only GGUFs)."""
    out_dir = os.path.join(_tmp_root(), "gguf")
    os.makedirs(out_dir, exist_ok=True)
    return write_gguf(tiny_model_dir(kind), os.path.join(out_dir, f"{kind}-{quant}.gguf"), quant=quant)


@lru_cache(maxsize=1)
def default_model():
    """pyserve's LoadedModel of the default GGUF (SmolLM2-135M-Instruct Q4_1), loaded once."""
    from pyserve.model import default_model_path, load_model

    return load_model(default_model_path())


@lru_cache(maxsize=None)
def hf_gguf_tokenizer(path: str):
    """transformers' tokenizer built from a GGUF file (needs the file's directory)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
