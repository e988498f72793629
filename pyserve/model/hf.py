"""Loading a HF model directory: config.json, generation_config.json, safetensors weights,
tokenizer files and chat template."""

from __future__ import annotations

import logging
import os
from collections import Counter

from .config import ModelConfig, merge_ids, parse_hf_config
from .errors import ModelLoadError
from .parts import ModelParts
from .hf_tokenizer import load_hf_tokenizer, read_json
from .safetensors import load_safetensors_dir
from .tensor import TensorRecord
from .weights import check_tensors, expected_shapes

log = logging.getLogger(__name__)

# generation_config.json keys we pass on as sampling defaults (same names as the file)
GENERATION_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def read_hf_config(model_dir: str) -> tuple[ModelConfig, dict]:
    """(ModelConfig, generation_config dict) of a HF directory."""
    cfg_path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(cfg_path):
        raise ModelLoadError(f"{model_dir}: no config.json (is this a HF model directory?)")
    cfg = read_json(cfg_path)
    gen_path = os.path.join(model_dir, "generation_config.json")
    gen = read_json(gen_path) if os.path.isfile(gen_path) else {}
    return parse_hf_config(cfg, gen, cfg_path), gen


def read_hf_dir(model_dir: str, *, load_tensors: bool = True) -> ModelParts:
    config, gen = read_hf_config(model_dir)
    tensors: dict[str, TensorRecord] = {}
    files: list[str] = []
    if load_tensors:
        wanted = set(expected_shapes(config))
        if config.tie_word_embeddings:
            wanted.discard("lm_head.weight")

        def select(name: str) -> bool:
            # Ignore buffers such as rotary inv_freq, and a stored lm_head when tied.
            return name in wanted

        tensors, files = load_safetensors_dir(model_dir, select)
        check_tensors(tensors, config, model_dir)
    tokenizer, template = load_hf_tokenizer(model_dir, extra_eos_ids=config.eos_token_ids)
    config.eos_token_ids = merge_ids(tokenizer.eos_token_ids, config.eos_token_ids)
    if config.bos_token_id is None:
        config.bos_token_id = tokenizer.bos_token_id
    if tokenizer.vocab_size > config.vocab_size:
        log.warning("%s: tokenizer has %d tokens but the model only %d", model_dir, tokenizer.vocab_size, config.vocab_size)
    formats = Counter(t.format for t in tensors.values() if len(t.shape) > 1)
    fmt = "safetensors " + (formats.most_common(1)[0][0] if formats else "unknown")
    gen_defaults = {k: gen[k] for k in GENERATION_DEFAULT_KEYS if gen.get(k) is not None}
    files = files or [f for f in os.listdir(model_dir) if f.endswith(".safetensors")]
    size = sum(os.path.getsize(os.path.join(model_dir, f)) for f in files)
    return ModelParts(config, tensors, tokenizer, template, gen_defaults, fmt, size)
