"""The OpenAI-compatible ASGI app (never touches sockets or h11)."""
from pyserve.api.app import App, create_app
from pyserve.api.cors import CORSConfig

__all__ = ["App", "create_app", "CORSConfig"]
