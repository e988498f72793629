"""OpenAI request/response types and validation: pure data, no I/O, no engine."""
from pyserve.protocol.errors import ProtocolError, error_body
from pyserve.protocol.requests import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerationRequest,
    parse_json_object,
)

__all__ = [
    "ChatCompletionRequest",
    "CompletionRequest",
    "GenerationRequest",
    "ProtocolError",
    "error_body",
    "parse_json_object",
]
