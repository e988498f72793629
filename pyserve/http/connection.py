"""Sans-IO HTTP/1.1 server connection: bytes in -> events out, ASGI send messages -> bytes out.

No sockets, no clocks, no tasks: the caller feeds received bytes with `receive_data`, pulls
events with `next_event`, and writes whatever bytes `send`, `send_continue` and `error_response`
return. That keeps every protocol decision (framing, keep-alive, limits, error responses) testable
without I/O, the way h11 itself is built. The anyio glue lives in `cycle.py` and `server.py`.

Requests: a request whose head and whole body (Content-Length, or none) are already buffered,
written the plain way (CRLF lines, one Host, no Transfer-Encoding, nothing h11 would fold or
repair), is read by a short fast path here that applies h11's own grammar; anything else (split
heads, chunked bodies, slow bodies, anything odd or invalid) goes to h11, which has the last word
on what is malformed. Each h11-parsed request gets a fresh h11 state machine fed with what the
previous request left over. Responses are framed here, not by h11: a response is a few lines of
bytes whose rules fit on a page (Content-Length, chunked for HTTP/1.1, close-delimited for
HTTP/1.0, no body for HEAD/204/304, `Connection: close` when the connection ends), and building
them directly costs a fraction of h11's event objects and header re-validation. App-supplied
header names and values are still checked against the RFC 9110 grammar (h11's own patterns).

Response heads are held back until the first body message, so a one-message body gets a
Content-Length instead of chunked framing, and the whole response leaves in one write. An app that
wants its head on the wire early (say, a stream whose first chunk is slow) sends an empty body
message with more_body=True.

Protocol failures (400, 408, 413, 431, 500, 501) are answered with a body the caller chooses
(`error_body`: status, message -> content type, body); this layer knows no error format of its own
beyond plain text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Callable, Union
from urllib.parse import unquote

import h11

Headers = list[tuple[bytes, bytes]]
ErrorBody = Callable[[int, str], tuple[bytes, bytes]]  # (status, message) -> (content type, body)


def plain_error_body(status: int, message: str) -> tuple[bytes, bytes]:
    """The neutral default: the message as plain text."""
    return b"text/plain; charset=utf-8", message.encode("utf-8", "replace")


@dataclass(slots=True)
class RequestStarted:
    """A request head arrived. The fields are the ASGI scope keys that come from the wire."""

    method: str
    path: str  # percent-decoded, UTF-8 decoded
    raw_path: bytes  # as sent, without the query string
    query_string: bytes
    headers: Headers  # names lowercased (h11 does that), in arrival order
    http_version: str  # "1.0" | "1.1"


@dataclass(slots=True)
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

# RFC 9110 field-name / field-value (the patterns h11 validates with).
_FIELD_NAME = re.compile(rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+")
_FIELD_VALUE = re.compile(rb"(?:[^\x00\s]+(?:[ \t]+[^\x00\s]+)*)?")
_DIGITS = re.compile(rb"[0-9]+")
_REQUEST_LINE = re.compile(rb"([-!#$%&'*+.^_`|~0-9a-zA-Z]+) ([\x21-\x7e]+) HTTP/(1\.[01])")
# One header field line: name ":" OWS value OWS CRLF (the two patterns above, in one match).
_FIELD_LINE = re.compile(rb"([-!#$%&'*+.^_`|~0-9a-zA-Z]+):[ \t]*((?:[^\x00\s]+(?:[ \t]+[^\x00\s]+)*)?)[ \t]*\r\n")
_MAX_LENGTH_DIGITS = 18

_STATUS_LINES: dict[int, bytes] = {}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_NO_BODY_STATUSES = (204, 304)


def status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is None:
        if not 200 <= status <= 999:
            raise ValueError(f"response status must be in 200..999, got {status}")
        try:
            reason = HTTPStatus(status).phrase.encode()
        except ValueError:  # a status the stdlib does not know: an empty reason is legal
            reason = b""
        line = _STATUS_LINES[status] = b"HTTP/1.1 %d %s\r\n" % (status, reason)
    return line


class HTTPConnection:
    """One server-side HTTP/1.1 connection, possibly carrying many requests (keep-alive).

    Limits: a request head larger than `max_header_bytes` or with more than `max_header_count`
    fields -> 431; a body larger than `max_body_bytes` -> 413 (from Content-Length up front, or
    counted while a chunked body streams in).
    """

    def __init__(self, *, max_body_bytes: int = 16 * 1024 * 1024,
                 max_header_bytes: int = 64 * 1024, max_header_count: int = 100,
                 error_body: ErrorBody = plain_error_body) -> None:
        self.max_body_bytes = max_body_bytes
        self.max_header_count = max_header_count
        self._max_header_bytes = max_header_bytes
        self._error_body = error_body
        self._buf = bytearray()  # received bytes of requests not handed to h11
        self._h11: h11.Connection | None = None  # parsing the current request, when it had to
        self._body: bytes | None = None  # a fast-path request's whole body, not yet delivered
        self._eof = False
        self._pending_error: Rejected | None = None
        self._reset_cycle()

    def _new_parser(self) -> h11.Connection:
        # h11 raises "Receive buffer too long" (hint 431) once an incomplete event outgrows this.
        return h11.Connection(h11.SERVER, max_incomplete_event_size=self._max_header_bytes)

    def _reset_cycle(self) -> None:
        self._body_received = 0
        self._body = None
        self.request_complete = False  # the request's last body byte is here
        self._is_head = False
        self._http10 = False
        self._keep_alive = True  # neither side asked to close
        self._client_closes = False  # the client asked to close (or spoke HTTP/1.0)
        self._expects_continue = False
        self._head: Headers | None = None  # http.response.start headers, held until the first body
        self._framing = ""  # "length" | "chunked" | "close" | "none", once the head is out
        self._remaining = 0  # bytes still owed under "length" framing
        self.status: int | None = None  # response status once started (for access logs)
        self.response_complete = False

    # ---- receiving -------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the peer; b"" means EOF."""
        if not data:
            self._eof = True
        if self._h11 is not None:
            self._h11.receive_data(data)
        elif data:
            self._buf += data

    @property
    def eof_received(self) -> bool:
        return self._eof

    @property
    def buffered_bytes(self) -> int:
        """Received bytes not yet parsed (e.g. a pipelined request waiting for its turn)."""
        if self._h11 is not None:
            return len(self._h11.trailing_data[0])
        return len(self._buf)

    def next_event(self) -> Event | None:
        """The next event, or None when more bytes are needed (or the next pipelined request
        must wait for `start_next_cycle`)."""
        if self._body is not None:
            body, self._body = self._body, None
            return Body(body, False)
        if self._h11 is not None or self._pending_error is not None:
            return self._next_parsed_event()
        if not self._buf:
            return Closed() if self._eof else None
        if self.request_complete:  # the next request waits for start_next_cycle ...
            if self._client_closes:  # ... unless the client said this was its last (as h11)
                return self._reject(400, "Invalid HTTP request: Got data when expecting EOF")
            return None
        event = self._fast_request()
        if event is not None:
            return event
        self._h11 = self._new_parser()  # the slow path: h11 reads this request
        self._h11.receive_data(bytes(self._buf))
        self._buf.clear()
        if self._eof:
            self._h11.receive_data(b"")
        return self._next_parsed_event()

    def _fast_request(self) -> Event | None:
        """A request whose head and body are all here, in the plain shape most clients send;
        None to leave it to h11. Every check is h11's (the same grammar), so both paths agree."""
        buf = self._buf
        end = buf.find(b"\r\n\r\n")
        if end <= 0:
            return None
        head = bytes(buf[:end + 2])  # the request line and every field line, each with its CRLF
        line_end = head.find(b"\r\n")
        match = _REQUEST_LINE.fullmatch(head, 0, line_end)
        if match is None:
            return None
        headers: Headers = []
        length = 0
        hosts = lengths = 0
        pos = line_end + 2
        field = _FIELD_LINE.match
        while pos < len(head):
            m = field(head, pos)
            if m is None:
                return None  # folded, malformed or odd: h11 decides
            pos = m.end()
            name, value = m.groups()
            name = name.lower()
            if name == b"content-length":
                if lengths or len(value) > _MAX_LENGTH_DIGITS or not _DIGITS.fullmatch(value):
                    return None
                lengths = 1
                length = int(value)
            elif name == b"host":
                hosts += 1
            elif name == b"transfer-encoding" or name == b"upgrade":
                return None
            headers.append((name, value))
        method, target, version = match.groups()
        if method == b"CONNECT":  # h11's protocol-switch states: leave them to it
            return None
        if hosts > 1 or (hosts == 0 and version == b"1.1"):
            return None
        start = end + 4
        if len(buf) - start < length and length <= self.max_body_bytes:
            return None  # the body is still on its way
        event = self._request_started(method, target, version, headers)
        if type(event) is RequestStarted:
            self._body = bytes(buf[start:start + length])
            self.request_complete = True
            del buf[:start + length]
        return event

    def _next_parsed_event(self) -> Event | None:
        event = self._next_h11_event()
        if type(event) is not h11.Data:
            event = self._translate(event)
            if type(event) is RequestStarted and self._h11.their_state is h11.SEND_BODY:  # type: ignore[union-attr]
                # A request without a body is complete with its head: say so now (h11 has its
                # EndOfMessage ready), so the server knows the rest of the bytes are the next
                # request's even if the app never calls receive().
                framing = {name for name, _ in event.headers}  # type: ignore[union-attr]
                if b"transfer-encoding" not in framing and all(
                        int(v) == 0 for n, v in event.headers if n == b"content-length"):  # type: ignore[union-attr]
                    if type(self._next_h11_event()) is h11.EndOfMessage:
                        self._body = b""
                        self.request_complete = True
            return event
        # Coalesce body pieces that are already buffered, so a small body that arrived in one
        # packet reaches the app as a single http.request message with more_body=False.
        data = event.data
        while True:
            nxt = self._next_h11_event()
            if type(nxt) is h11.Data:
                data = bytes(data) + bytes(nxt.data)
                continue
            if self._count_body(len(data)):
                return self._reject(413, self._too_large_message())
            if type(nxt) is h11.EndOfMessage:
                self.request_complete = True
                return Body(bytes(data), False)
            # NEED_DATA, or a Rejected that _reject made sticky: deliver the data first.
            return Body(bytes(data), True)

    def skip_body(self) -> None:
        """Drop the body bytes that are already here and that the app did not read, so the
        connection can carry the next request."""
        self._body = None
        while not self.request_complete and type(self.next_event()) is Body:
            pass

    def _next_h11_event(self) -> Any:
        if self._pending_error is not None:
            return self._pending_error
        assert self._h11 is not None
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
        kind = type(event)
        if kind is h11.Request:
            return self._request_started(event.method, event.target, event.http_version,
                                         list(event.headers))
        if kind is h11.EndOfMessage:
            self.request_complete = True
            return Body(b"", False)
        if kind is Rejected or kind is Closed:
            return event
        if kind is h11.ConnectionClosed:
            return Closed()
        raise AssertionError(f"unexpected h11 event {event!r}")  # h11 servers see no others

    def _request_started(self, method: bytes, target: bytes, version: bytes,
                         headers: Headers) -> Event:
        if len(headers) > self.max_header_count:
            return self._reject(431, f"Too many request header fields: the limit is "
                                     f"{self.max_header_count}")
        # h11 only bounds an *incomplete* head; one that arrived whole in a single read is
        # measured here (request line + "name: value\r\n" per field).
        size = len(method) + len(target) + 12
        content_length = transfer_encoding = False
        for name, value in headers:
            size += len(name) + len(value) + 4
            if name == b"content-length":
                content_length = True
                if int(value) > self.max_body_bytes:
                    return self._reject(413, self._too_large_message())
            elif name == b"transfer-encoding":
                transfer_encoding = True
            elif name == b"connection" and _has_token(value, b"close"):
                self._keep_alive = False
                self._client_closes = True
            elif name == b"expect" and value.lower() == b"100-continue":
                self._expects_continue = True
        if size > self._max_header_bytes:
            return self._reject(431, "Request header fields too large")
        if content_length and transfer_encoding:
            # Legal to resolve in favour of chunked, but it is the classic request-smuggling
            # shape; a single-hop server has no reason to accept it.
            return self._reject(400, "Invalid HTTP request: both Content-Length and "
                                     "Transfer-Encoding")
        self._is_head = method == b"HEAD"
        if version != b"1.1":
            self._http10 = True
            self._keep_alive = False
            self._client_closes = True
        if target.startswith((b"http://", b"https://")):  # absolute-form: keep only the path
            rest = target.split(b"//", 1)[1]
            target = b"/" + rest.split(b"/", 1)[1] if b"/" in rest else b"/"
        raw_path, _, query = target.partition(b"?")
        return RequestStarted(method.decode("ascii"), unquote(raw_path.decode("latin-1")),
                              raw_path, query, headers, version.decode("ascii"))

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
        body); b"" otherwise. At most once per request."""
        if not self._expects_continue or self.response_started or self.request_complete:
            return b""
        self._expects_continue = False
        if self._h11 is None or not self._h11.they_are_waiting_for_100_continue:
            return b""  # it sent body bytes already
        return _CONTINUE

    # ---- sending ---------------------------------------------------------------------------

    @property
    def response_started(self) -> bool:
        return self.status is not None

    @property
    def keep_alive(self) -> bool:
        """Whether the connection may carry another request after this one (so far)."""
        return self._keep_alive

    def send(self, message: dict[str, Any]) -> bytes:
        """Translate one ASGI send message into bytes for the wire.

        Raises RuntimeError for messages that break the ASGI sequence or HTTP framing, ValueError
        for an invalid status or header (all of them the app's bugs, raised before anything is
        written). The response head is held back until the first body message: when that message
        is also the last one, we can send Content-Length instead of chunked framing.
        """
        kind = message.get("type")
        if kind == "http.response.body":
            if self._framing:
                return self._send_body(message.get("body", b""), message.get("more_body", False))
            if self._head is None:
                if self.response_complete:
                    raise RuntimeError("http.response.body sent after the response completed")
                raise RuntimeError("http.response.body sent before http.response.start")
            return self._send_first_body(message.get("body", b""), message.get("more_body", False))
        if kind == "http.response.start":
            if self.status is not None:
                raise RuntimeError("http.response.start sent twice")
            status = message["status"]
            if type(status) is not int:
                status = int(status)
            status_line(status)  # validates the status
            self._head = _checked_headers(message.get("headers", ()))
            self.status = status
            return b""
        raise RuntimeError(f"unexpected ASGI message type {kind!r}")

    def _send_first_body(self, body: bytes, more_body: bool) -> bytes:
        """The response head, framed from the app's headers and this first body message, plus
        the message's bytes."""
        headers = self._head
        status = self.status
        assert headers is not None and status is not None
        self._head = None
        length: int | None = None
        chunked = False
        for name, value in headers:
            if name == b"content-length":
                if not _DIGITS.fullmatch(value) or (length is not None and int(value) != length):
                    raise ValueError(f"invalid Content-Length header: {value!r}")
                length = int(value)
            elif name == b"transfer-encoding":
                if value.lower() != b"chunked":
                    raise ValueError("only Transfer-Encoding: chunked is supported")
                chunked = True
            elif name == b"connection" and _has_token(value, b"close"):
                self._keep_alive = False
        no_body = status in _NO_BODY_STATUSES
        if no_body:
            framing = "none"
        elif chunked or (length is None and more_body):
            # Unknown length: chunked for HTTP/1.1, close-delimited for HTTP/1.0.
            headers = [h for h in headers if h[0] != b"content-length" and h[0] != b"transfer-encoding"]
            if self._http10:
                framing = "close"
                if not self._is_head:
                    self._keep_alive = False
            else:
                framing = "chunked"
                headers.append((b"transfer-encoding", b"chunked"))
        elif length is None:
            framing, length = "length", len(body)
            headers = headers + [(b"content-length", b"%d" % length)]
        else:
            framing = "length"
        if self._is_head:
            framing = "none"  # the head says what GET would send; no body follows
        if not self._keep_alive:
            headers = [h for h in headers if h[0] != b"connection"]
            headers.append((b"connection", b"close"))
        self._framing = framing
        self._remaining = length or 0
        parts = [status_line(status)]
        for name, value in headers:
            parts += (name, b": ", value, b"\r\n")
        parts.append(b"\r\n")
        return b"".join(parts) + self._send_body(body, more_body)

    def _send_body(self, body: bytes, more_body: bool) -> bytes:
        framing = self._framing
        if self.response_complete:
            raise RuntimeError("http.response.body sent after the response completed")
        if not more_body:
            self.response_complete = True
        if framing == "length":
            self._remaining -= len(body)
            if self._remaining < 0:
                raise RuntimeError("Too much data for declared Content-Length")
            if not more_body and self._remaining:
                raise RuntimeError("Too little data for declared Content-Length")
            return body
        if framing == "chunked":
            if more_body:
                return b"%x\r\n%b\r\n" % (len(body), body) if body else b""
            return (b"%x\r\n%b\r\n0\r\n\r\n" % (len(body), body)) if body else b"0\r\n\r\n"
        if framing == "close":
            return body
        if body and not self._is_head:  # "none": 204/304 carry no body
            raise RuntimeError(f"a {self.status} response cannot have a body")
        return b""

    def error_response(self, status: int, message: str) -> bytes:
        """A complete error response (body from `error_body`) that also closes the connection;
        b"" when a response is already under way (then the caller can only close)."""
        if self.response_started or self.response_complete:
            return b""
        content_type, body = self._error_body(status, message)
        self.status = status
        self._keep_alive = False
        self.response_complete = True
        head = b"%bcontent-type: %b\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % (
            status_line(status), content_type, len(body))
        return head if self._is_head else head + body

    # ---- keep-alive ------------------------------------------------------------------------

    def start_next_cycle(self) -> bool:
        """Get ready for the next request on this connection. False means: close it (either side
        asked for close, HTTP/1.0, the body was not fully read, or an error happened)."""
        if not (self.request_complete and self.response_complete and self._keep_alive) or (
                self._pending_error is not None):
            return False
        if self._h11 is not None:  # what h11 did not parse belongs to the next request
            self._buf = bytearray(self._h11.trailing_data[0])
            self._h11 = None
        self._reset_cycle()
        return True


def _has_token(value: bytes, token: bytes) -> bool:
    """Whether a comma-separated header value lists `token` (case-insensitively)."""
    return token in value.lower() and any(t.strip() == token for t in value.lower().split(b","))


_CHECKED_NAMES: dict[bytes, bytes] = {}  # header names an app sent before -> lowercased


def _checked_headers(raw: Any) -> Headers:
    """The app's response headers as lowercased bytes pairs, each name and value checked (no
    CR/LF or other bytes that could split the head)."""
    headers: Headers = []
    for name, value in raw:
        lowered = _CHECKED_NAMES.get(name) if type(name) is bytes else None
        if lowered is None:
            name = bytes(name)
            if not _FIELD_NAME.fullmatch(name):
                raise ValueError(f"illegal header name {name!r}")
            lowered = name.lower()
            if len(_CHECKED_NAMES) < 512:
                _CHECKED_NAMES[name] = lowered
        if type(value) is not bytes:
            value = bytes(value)
        if not _FIELD_VALUE.fullmatch(value):
            raise ValueError(f"illegal header value {value!r}")
        headers.append((lowered, value))
    return headers
