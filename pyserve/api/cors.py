"""CORS: the `--allow-origins/--allow-methods/--allow-headers/--allow-credentials` flags.

Defaults follow MLC-LLM (and the FastAPI CORSMiddleware it uses): every origin, method and header
is allowed, credentials are not. Behaviour:

- A preflight (OPTIONS with Origin and Access-Control-Request-Method) is answered here, before
  routing and before the API key check (browsers never send credentials on a preflight): 204 with
  the Access-Control-Allow-* headers, or 400 when the origin, method or a header is not allowed.
- Every other response to a request with an allowed Origin gets Access-Control-Allow-Origin
  (and -Credentials), errors included, so browser code can read the error body.
- With credentials (or a cookie in the request) the wildcard origin is answered by echoing the
  request's Origin, since browsers refuse `*` there; echoed origins add `Vary: Origin`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

ALL_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")
# Request headers a browser may always send (the CORS "safelisted" ones).
SAFELISTED_HEADERS = ("accept", "accept-language", "content-language", "content-type")
PREFLIGHT_MAX_AGE = 600

RawHeaders = list[tuple[bytes, bytes]]


@dataclass
class CORSConfig:
    allow_origins: list[str] = field(default_factory=lambda: ["*"])
    allow_methods: list[str] = field(default_factory=lambda: ["*"])
    allow_headers: list[str] = field(default_factory=lambda: ["*"])
    allow_credentials: bool = False
    expose_headers: list[str] = field(default_factory=list)
    max_age: int = PREFLIGHT_MAX_AGE

    @property
    def enabled(self) -> bool:
        return bool(self.allow_origins)


def _header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> str | None:
    for k, v in headers:
        if k.lower() == name:
            return v.decode("latin-1")
    return None


class CORS:
    def __init__(self, config: CORSConfig) -> None:
        self.config = config
        self._any_origin = "*" in config.allow_origins
        self._origins = {o.rstrip("/") for o in config.allow_origins if o != "*"}
        self._any_method = "*" in config.allow_methods
        self._methods = ALL_METHODS if self._any_method else tuple(m.upper() for m in config.allow_methods)
        self._any_header = "*" in config.allow_headers
        self._headers = {h.lower() for h in config.allow_headers if h != "*"} | set(SAFELISTED_HEADERS)

    def origin_allowed(self, origin: str) -> bool:
        return self._any_origin or origin.rstrip("/") in self._origins

    @staticmethod
    def is_preflight(method: str, headers: RawHeaders) -> bool:
        return (
            method == "OPTIONS"
            and _header(headers, b"origin") is not None
            and _header(headers, b"access-control-request-method") is not None
        )

    def _origin_headers(self, origin: str, headers: RawHeaders) -> RawHeaders:
        echo = not self._any_origin or self.config.allow_credentials or _header(headers, b"cookie") is not None
        out: RawHeaders = [(b"access-control-allow-origin", origin.encode("latin-1") if echo else b"*")]
        if echo:
            out.append((b"vary", b"Origin"))
        if self.config.allow_credentials:
            out.append((b"access-control-allow-credentials", b"true"))
        return out

    def preflight(self, headers: RawHeaders) -> tuple[int, RawHeaders, str | None]:
        """(status, response headers, refusal reason or None) for a preflight request."""
        origin = _header(headers, b"origin") or ""
        method = (_header(headers, b"access-control-request-method") or "").strip().upper()
        asked = [h.strip().lower() for h in (_header(headers, b"access-control-request-headers") or "").split(",")]
        asked = [h for h in asked if h]
        problems = []
        if not self.origin_allowed(origin):
            problems.append("origin")
        if method not in self._methods:
            problems.append("method")
        if not self._any_header and any(h not in self._headers for h in asked):
            problems.append("headers")
        if problems:
            return 400, [(b"vary", b"Origin")], f"Disallowed CORS {', '.join(problems)}"
        out = self._origin_headers(origin, headers)
        out.append((b"access-control-allow-methods", ", ".join(self._methods).encode("latin-1")))
        if self._any_header:
            allow_headers = ", ".join(asked) if asked else ", ".join(SAFELISTED_HEADERS)
        else:
            allow_headers = ", ".join(sorted(self._headers))
        out.append((b"access-control-allow-headers", allow_headers.encode("latin-1")))
        out.append((b"access-control-max-age", str(self.config.max_age).encode()))
        return 204, out, None

    def response_headers(self, headers: RawHeaders) -> RawHeaders:
        """Headers to add to a normal response (none without an allowed Origin)."""
        origin = _header(headers, b"origin")
        if origin is None or not self.origin_allowed(origin):
            return []
        out = self._origin_headers(origin, headers)
        if self.config.expose_headers:
            out.append((b"access-control-expose-headers", ", ".join(self.config.expose_headers).encode("latin-1")))
        return out
