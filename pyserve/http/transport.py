"""A connected byte stream with the failure modes folded into return values.

Clients vanish at any moment; code above this layer should see "no more bytes" (read -> b"") or
"could not write" (write -> False), never a zoo of EndOfStream / BrokenResource / OSError.
"""

from __future__ import annotations

import logging

import anyio
import anyio.abc

logger = logging.getLogger("pyserve.http")

# Network errors that mean "the peer is gone" (or we closed the stream ourselves).
_GONE = (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError)

# After an error response we half-close and read (and discard) what the client still sends, for at
# most this long / this much: closing a socket with unread input makes the kernel send a TCP reset,
# which can destroy the error response before the client reads it.
LINGER_SECONDS = 1.0
LINGER_BYTES = 1024 * 1024


def _peer(stream: anyio.abc.ByteStream, attr: object) -> tuple[str, int] | None:
    try:
        address = stream.extra(attr)  # type: ignore[arg-type]
    except anyio.TypedAttributeLookupError:
        return None
    if isinstance(address, tuple) and len(address) >= 2:  # IPv6 addresses are 4-tuples
        return (str(address[0]), int(address[1]))
    return None


class Transport:
    def __init__(self, stream: anyio.abc.ByteStream, write_timeout: float) -> None:
        self._stream = stream
        self._write_timeout = write_timeout
        self.closed = False  # a write failed: the connection is unusable
        self.client = _peer(stream, anyio.abc.SocketAttribute.remote_address)
        self.server = _peer(stream, anyio.abc.SocketAttribute.local_address)

    async def read(self, max_bytes: int = 65536) -> bytes:
        """Some bytes, or b"" once the peer closed (or reset) the connection."""
        try:
            return await self._stream.receive(max_bytes)
        except _GONE:
            return b""

    async def write(self, data: bytes) -> bool:
        """False when the peer is gone or did not take the bytes within write_timeout."""
        if self.closed:
            return False
        with anyio.move_on_after(self._write_timeout):
            try:
                await self._stream.send(data)
                return True
            except _GONE:
                pass
        logger.debug("write to %s failed or timed out; dropping the connection", self.client)
        self.closed = True
        return False

    async def linger(self) -> None:
        """Half-close, then drain the client's leftovers briefly (see LINGER_SECONDS)."""
        with anyio.move_on_after(LINGER_SECONDS):
            try:
                await self._stream.send_eof()
            except (*_GONE, NotImplementedError):
                return
            drained = 0
            while drained < LINGER_BYTES:
                chunk = await self.read()
                if not chunk:
                    return
                drained += len(chunk)

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True):  # closing must happen even while being cancelled
            try:
                await self._stream.aclose()
            except _GONE:
                pass
