"""A minimal ASGI 3 HTTP/1.1 server (anyio + h11). Knows nothing of LLMs.

    from pyserve.http import ServerConfig, serve, run
    run(app, ServerConfig(port=8000))          # blocking, SIGINT/SIGTERM stop it gracefully
    port = await tg.start(serve, app, config)  # inside an anyio task group; cancel to stop

The server's own error responses (malformed request 400, body timeout 408, 413, 431, 501, and 500
for an app that failed before responding) carry a plain-text body unless someone says otherwise:
`ServerConfig.error_body`, or else the app's `http_error_body(status, message) -> (content type,
body)` method when it has one. That is how an app gives the server its error format; this package
knows none.
"""

from .config import ServerConfig
from .cycle import ClientDisconnected
from .lifespan import LifespanError
from .server import run, serve

__all__ = ["ServerConfig", "serve", "run", "ClientDisconnected", "LifespanError"]
