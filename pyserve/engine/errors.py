"""What the engine raises for faults of ours (the API turns them into 5xx responses)."""

from __future__ import annotations


class EngineError(RuntimeError):
    """The engine ended this request with an error: a fault of ours, not the client's (500)."""


class EngineFailed(RuntimeError):
    """The engine cannot go on: every request ends with an error and /health reports why (503)."""
