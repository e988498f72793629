"""OpenAI-style errors: one exception type carrying everything the HTTP layer needs."""
from __future__ import annotations

from typing import Any

# OpenAI's `type` strings, by the HTTP status that usually carries them.
INVALID_REQUEST = "invalid_request_error"
AUTHENTICATION = "authentication_error"
NOT_FOUND = "not_found_error"
SERVER_ERROR = "server_error"
OVERLOADED = "overloaded_error"


class ProtocolError(Exception):
    """A request the server refuses, with the HTTP status and the OpenAI error fields.

    Raised by validation (400), routing (404/405), body limits (413), and may be raised by the
    engine for overload (429/503, with `headers` such as Retry-After).
    """

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        param: str | None = None,
        type: str = INVALID_REQUEST,
        code: str | int | None = None,
        headers: list[tuple[str, str]] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.type = type
        self.code = code
        self.headers = list(headers or [])

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)

    def __repr__(self) -> str:
        return f"ProtocolError(status={self.status}, message={self.message!r}, param={self.param!r})"


def error_body(
    message: str,
    *,
    type: str = INVALID_REQUEST,
    param: str | None = None,
    code: str | int | None = None,
) -> dict[str, Any]:
    """`{"error": {"message", "type", "param", "code"}}` — the only error shape we emit."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}
