"""Errors raised while loading a model (kept apart so every loader module can raise them)."""

from __future__ import annotations


class ModelLoadError(ValueError):
    """A model could not be loaded; the message says what is wrong and, where possible, how to fix it."""
