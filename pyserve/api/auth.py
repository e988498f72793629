"""API key check: `Authorization: Bearer KEY` on the OpenAI routes (`/v1/...`).

The comparison is constant-time: both sides are hashed to a fixed length first, so neither the
content nor the length of the key leaks through timing. Failures are 401 with OpenAI's error
object (`code: "invalid_api_key"`) and a `WWW-Authenticate: Bearer` header.
"""
from __future__ import annotations

import hashlib
import hmac

from pyserve.protocol.errors import INVALID_REQUEST, ProtocolError

PROTECTED_PREFIX = "/v1/"


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


class APIKeyAuth:
    def __init__(self, api_key: str) -> None:
        if not api_key:
            raise ValueError("the API key must not be empty")
        self._digest = _digest(api_key.encode("utf-8"))

    @staticmethod
    def protects(path: str) -> bool:
        """True for the routes that need the key: everything under /v1."""
        return path == "/v1" or path.startswith(PROTECTED_PREFIX)

    def check(self, authorization: str | None) -> None:
        """Raises the 401 ProtocolError unless `authorization` is `Bearer <the key>`."""
        if authorization is None or not authorization.strip():
            raise _unauthorized(
                "You didn't provide an API key. You need to provide your API key in an "
                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
            )
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _unauthorized("The Authorization header must use Bearer auth (Authorization: Bearer YOUR_KEY).")
        given = _digest(token.strip().encode("latin-1", errors="replace"))
        if not hmac.compare_digest(given, self._digest):
            raise _unauthorized("Incorrect API key provided.")


def _unauthorized(message: str) -> ProtocolError:
    return ProtocolError(
        message,
        status=401,
        type=INVALID_REQUEST,  # what OpenAI sends with code invalid_api_key
        code="invalid_api_key",
        headers=[("www-authenticate", "Bearer")],
    )
