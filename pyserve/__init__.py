"""pyserve: an OpenAI-compatible LLM inference server over a C++ batching engine."""

__version__ = "0.1.0"
