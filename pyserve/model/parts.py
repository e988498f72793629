"""ModelParts: what a format reader (hf.py, gguf_file.py) hands to the loader."""

from __future__ import annotations

from dataclasses import dataclass, field

from .config import ModelConfig
from .tensor import TensorRecord
from .tokenizer import Tokenizer


@dataclass
class ModelParts:
    config: ModelConfig
    tensors: dict[str, TensorRecord]
    tokenizer: Tokenizer
    chat_template: str | None
    generation_defaults: dict = field(default_factory=dict)
    format: str = ""  # e.g. "safetensors bf16", "gguf Q4_1"
    file_bytes: int = 0  # size of the weights on disk
