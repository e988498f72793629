"""A minimal ASGI 3 HTTP/1.1 server (anyio + h11). Knows nothing of LLMs.

    from pyserve.http import ServerConfig, serve, run
    run(app, ServerConfig(port=8000))          # blocking, SIGINT/SIGTERM stop it gracefully
    port = await tg.start(serve, app, config)  # inside an anyio task group; cancel to stop
"""

from .config import ServerConfig
from .cycle import ClientDisconnected
from .lifespan import LifespanError
from .server import run, serve

__all__ = ["ServerConfig", "serve", "run", "ClientDisconnected", "LifespanError"]
