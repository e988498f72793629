"""Sans-IO HTTP/1.1 server connection: bytes in -> events out, ASGI send messages -> bytes out.

No sockets, no clocks, no tasks: the caller feeds received bytes with `receive_data`, pulls
events with `next_event`, and writes whatever bytes `send`, `send_continue` and `error_response`
return. That keeps every protocol decision (framing, keep-alive, limits, error responses) testable
without I/O, the way h11 itself is built. The anyio glue lives in `cycle.py` and `server.py`.

Response heads are held back until the first body message, so a one-message body gets a
Content-Length instead of chunked framing. An app that wants its head on the wire early (say, a
stream whose first chunk is slow) sends an empty body message with more_body=True.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Union
from urllib.parse import unquote

import h11

Headers = list[tuple[bytes, bytes]]


@dataclass(frozen=True)
class RequestStarted:
    """A request head arrived. The fields are the ASGI scope keys that come from the wire."""

    method: str
    path: str  # percent-decoded, UTF-8 decoded
    raw_path: bytes  # as sent, without the query string
    query_string: bytes
    headers: Headers  # names lowercased (h11 does that), in arrival order
    http_version: str  # "1.0" | "1.1"


@dataclass(frozen=True)
class Body:
    """A piece of the request body; more_body=False marks the end of the request."""

    data: bytes
    more_body: bool


@dataclass(frozen=True)
class Rejected:
    """The client broke the protocol or a limit: answer `error_response(status, message)`, close."""

    status: int  # 400 | 413 | 431 | 501
    message: str


@dataclass(frozen=True)
class Closed:
    """The client closed its side of the connection (clean EOF between or after requests)."""


Event = Union[RequestStarted, Body, Rejected, Closed]


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:  # a status the stdlib does not know: an empty reason is legal
        return b""


def error_body(message: str, type_: str = "invalid_request_error") -> bytes:
    """The OpenAI-style error object, encoded exactly once."""
    return json.dumps({"error": {"message": message, "type": type_, "param": None,
                                 "code": None}}).encode()


class HTTPConnection:
    """One server-side HTTP/1.1 connection, possibly carrying many requests (keep-alive).

    Limits: a request head larger than `max_header_bytes` or with more than `max_header_count`
    fields -> 431; a body larger than `max_body_bytes` -> 413 (from Content-Length up front, or
    counted while a chunked body streams in).
    """

    def __init__(self, *, max_body_bytes: int = 16 * 1024 * 1024,
                 max_header_bytes: int = 64 * 1024, max_header_count: int = 100) -> None:
        self.max_body_bytes = max_body_bytes
        self.max_header_count = max_header_count
        self._max_header_bytes = max_header_bytes
        # h11 raises "Receive buffer too long" (hint 431) once an incomplete event outgrows this.
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=max_header_bytes)
        self._pending_error: Rejected | None = None
        self._reset_cycle()

    def _reset_cycle(self) -> None:
        self._body_received = 0
        self._is_head = False
        self._head: Headers = []  # http.response.start headers, held until the first body
        self.status: int | None = None  # response status once started (for access logs)
        self.response_complete = False

    # ---- receiving -------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the peer; b"" means EOF."""
        self._h11.receive_data(data)

    @property
    def eof_received(self) -> bool:
        return self._h11.trailing_data[1]

    @property
    def buffered_bytes(self) -> int:
        """Received bytes not yet parsed (e.g. a pipelined request waiting for its turn)."""
        return len(self._h11.trailing_data[0])

    @property
    def request_complete(self) -> bool:
        # A client that sent `Connection: close` (or spoke HTTP/1.0) goes DONE -> MUST_CLOSE at
        # the end of its request: its body is just as complete.
        return self._h11.their_state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED)

    def next_event(self) -> Event | None:
        """The next event, or None when more bytes are needed (or the next pipelined request
        must wait for `start_next_cycle`)."""
        event = self._next_h11_event()
        if not isinstance(event, h11.Data):
            return self._translate(event)
        # Coalesce body pieces that are already buffered, so a small body that arrived in one
        # packet reaches the app as a single http.request message with more_body=False.
        data = bytearray(event.data)
        while True:
            nxt = self._next_h11_event()
            if isinstance(nxt, h11.Data):
                data += nxt.data
                continue
            if self._count_body(len(data)):
                return self._reject(413, self._too_large_message())
            if isinstance(nxt, h11.EndOfMessage):
                return Body(bytes(data), more_body=False)
            # NEED_DATA, or a Rejected that _reject made sticky: deliver the data first.
            return Body(bytes(data), more_body=True)

    def _next_h11_event(self) -> Any:
        if self._pending_error is not None:
            return self._pending_error
        try:
            return self._h11.next_event()
        except h11.RemoteProtocolError as exc:
            status = exc.error_status_hint
            if status == 431:
                return self._reject(431, "Request header fields too large")
            return self._reject(status, f"Invalid HTTP request: {exc}")

    def _translate(self, event: Any) -> Event | None:
        if event is h11.NEED_DATA or event is h11.PAUSED:
            return None
        if isinstance(event, (Rejected, Closed)):
            return event
        if isinstance(event, h11.ConnectionClosed):
            return Closed()
        if isinstance(event, h11.EndOfMessage):
            return Body(b"", more_body=False)
        if isinstance(event, h11.Request):
            return self._request_started(event)
        raise AssertionError(f"unexpected h11 event {event!r}")  # h11 servers see no others

    def _request_started(self, req: h11.Request) -> Event:
        headers = [(name, value) for name, value in req.headers]
        # h11 only bounds an *incomplete* head; one that arrived whole in a single read is
        # measured here (request line + "name: value\r\n" per field).
        size = len(req.method) + len(req.target) + 12 + sum(len(k) + len(v) + 4 for k, v in headers)
        if size > self._max_header_bytes:
            return self._reject(431, "Request header fields too large")
        if len(headers) > self.max_header_count:
            return self._reject(431, f"Too many request header fields: the limit is "
                                     f"{self.max_header_count}")
        names = {name for name, _ in headers}
        if b"content-length" in names and b"transfer-encoding" in names:
            # Legal to resolve in favour of chunked, but it is the classic request-smuggling
            # shape; a single-hop server has no reason to accept it.
            return self._reject(400, "Invalid HTTP request: both Content-Length and "
                                     "Transfer-Encoding")
        self._is_head = req.method == b"HEAD"
        for name, value in headers:
            if name == b"content-length" and int(value) > self.max_body_bytes:
                return self._reject(413, self._too_large_message())
        target = req.target
        if target.startswith((b"http://", b"https://")):  # absolute-form: keep only the path
            rest = target.split(b"//", 1)[1]
            target = b"/" + rest.split(b"/", 1)[1] if b"/" in rest else b"/"
        raw_path, _, query = target.partition(b"?")
        return RequestStarted(
            method=req.method.decode("ascii"),
            path=unquote(raw_path.decode("latin-1")),
            raw_path=raw_path,
            query_string=query,
            headers=headers,
            http_version=req.http_version.decode("ascii"),
        )

    def _count_body(self, n: int) -> bool:
        """Add n body bytes; True when the limit is exceeded."""
        self._body_received += n
        return self._body_received > self.max_body_bytes

    def _too_large_message(self) -> str:
        return f"Request body too large: the limit is {self.max_body_bytes} bytes"

    def _reject(self, status: int, message: str) -> Rejected:
        # Sticky: after a rejection the connection only ever reports the same rejection.
        self._pending_error = Rejected(status, message)
        return self._pending_error

    def send_continue(self) -> bytes:
        """`100 Continue` if the client waits for one (call when the app first asks for the
        body); b"" otherwise."""
        if not self._h11.they_are_waiting_for_100_continue or self.response_started:
            return b""
        return self._h11.send(h11.InformationalResponse(status_code=100, headers=[]))

    # ---- sending ---------------------------------------------------------------------------

    @property
    def response_started(self) -> bool:
        return self.status is not None

    def send(self, message: dict[str, Any]) -> bytes:
        """Translate one ASGI send message into bytes for the wire.

        Raises RuntimeError for messages that break the ASGI sequence, h11.LocalProtocolError for
        invalid status/headers (both are the app's bugs, raised before anything is written).
        The response head is held back until the first body message: when that message is also
        the last one, we can send Content-Length instead of chunked framing.
        """
        kind = message.get("type")
        if kind == "http.response.start":
            if self.response_started:
                raise RuntimeError("http.response.start sent twice")
            status = int(message["status"])
            headers = [(bytes(k).lower(), bytes(v)) for k, v in message.get("headers", [])]
            # Validate now, while a 500 is still possible; the head itself waits for the body.
            h11.Response(status_code=status, headers=headers)
            self._head = headers
            self.status = status
            return b""
        if kind == "http.response.body":
            if not self.response_started:
                raise RuntimeError("http.response.body sent before http.response.start")
            if self.response_complete:
                raise RuntimeError("http.response.body sent after the response completed")
            return self._send_body(bytes(message.get("body", b"")),
                                   bool(message.get("more_body", False)))
        raise RuntimeError(f"unexpected ASGI message type {kind!r}")

    def _send_body(self, body: bytes, more_body: bool) -> bytes:
        out = b""
        if self._h11.our_state is h11.SEND_RESPONSE:  # first body message: the head goes now
            headers, status = self._head, self.status or 500
            framed = any(k in (b"content-length", b"transfer-encoding") for k, _ in headers)
            if not framed and not more_body and status not in (204, 304):
                headers = headers + [(b"content-length", str(len(body)).encode())]
            # Without Content-Length h11 picks chunked (HTTP/1.1) or close-delimited (HTTP/1.0).
            out += self._h11.send(h11.Response(status_code=status, headers=headers,
                                               reason=_reason(status)))
        if body and not self._is_head:  # HEAD: the head says what GET would send, no body
            out += self._h11.send(h11.Data(data=body))
        if not more_body:
            out += self._h11.send(h11.EndOfMessage())
            self.response_complete = True
        return out

    def error_response(self, status: int, message: str,
                       type_: str = "invalid_request_error") -> bytes:
        """A complete JSON error response that also closes the connection; b"" when a response
        is already under way (then the caller can only close)."""
        if self.response_started or self._h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return b""
        body = error_body(message, type_)
        self.status = status
        headers = [(b"content-type", b"application/json"),
                   (b"content-length", str(len(body)).encode()), (b"connection", b"close")]
        try:
            out = self._h11.send(h11.Response(status_code=status, headers=headers,
                                              reason=_reason(status)))
            if not self._is_head:
                out += self._h11.send(h11.Data(data=body))
            out += self._h11.send(h11.EndOfMessage())
        except h11.LocalProtocolError:
            return b""  # state forbids a response (cannot happen from IDLE/SEND_RESPONSE)
        self.response_complete = True
        return out

    # ---- keep-alive ------------------------------------------------------------------------

    def start_next_cycle(self) -> bool:
        """Get ready for the next request on this connection. False means: close it (either side
        asked for close, HTTP/1.0, the body was not fully read, or an error happened)."""
        if self._h11.our_state is not h11.DONE or self._h11.their_state is not h11.DONE:
            return False
        self._h11.start_next_cycle()
        self._reset_cycle()
        return True
