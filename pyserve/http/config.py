"""Server settings: where to listen and the limits that keep hostile or slow clients cheap."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable, Optional


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000  # 0 -> an ephemeral port; serve() reports the real one via task_status
    # Request size limits.
    max_body_bytes: int = 16 * 1024 * 1024  # larger bodies -> 413
    max_header_bytes: int = 64 * 1024  # request line + headers; larger -> 431
    max_header_count: int = 100  # header fields per request; more -> 431
    # Time limits (seconds). Each one drops a client that stalls a connection slot.
    header_timeout: float = 10.0  # to receive a complete request head (from accept, or from
    #                               the first byte of a keep-alive request)
    keep_alive_timeout: float = 5.0  # idle wait for the next request on a kept-alive connection
    body_timeout: float = 60.0  # longest silence while a request body is still arriving
    write_timeout: float = 60.0  # longest one write may block on a client that does not read
    # Capacity and shutdown.
    max_connections: int = 1024  # beyond this, new clients wait in the listen backlog
    backlog: int = 2048
    shutdown_timeout: float = 30.0  # in-flight requests get this long to finish on stop
    # The body of the server's own error responses (400, 408, 413, 431, 500, 501): (status,
    # message) -> (content type, body). None: the app's `http_error_body` if it has one (that is
    # how an app gives its error format to the server), else plain text.
    error_body: Optional[Callable[[int, str], tuple[bytes, bytes]]] = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "port":
                if not 0 <= value <= 65535:
                    raise ValueError(f"port must be in 0..65535, got {value}")
            elif isinstance(value, (int, float)) and not isinstance(value, bool) and value <= 0:
                raise ValueError(f"ServerConfig.{f.name} must be positive, got {value}")
