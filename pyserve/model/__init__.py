"""pyserve.model: HF directories and GGUF files -> config, tensors, tokenizer, chat template."""

from .chat_template import FALLBACK_TEMPLATE, ChatTemplate, ChatTemplateError
from .config import ModelConfig
from .errors import ModelLoadError
from .loader import LoadedModel, default_model_path, load_model
from .tensor import TensorRecord
from .tokenizer import Tokenizer

__all__ = [
    "FALLBACK_TEMPLATE",
    "ChatTemplate",
    "ChatTemplateError",
    "LoadedModel",
    "ModelConfig",
    "ModelLoadError",
    "TensorRecord",
    "Tokenizer",
    "default_model_path",
    "load_model",
]
