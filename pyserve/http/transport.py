"""A connected socket with the failure modes folded into return values.

Clients vanish at any moment; code above this layer should see "no more bytes" (read -> b"") or
"could not write" (write -> False), never a zoo of EOF / reset / OSError.

The socket is non-blocking and used directly, with anyio only to wait for readiness
(`wait_readable` / `wait_writable`, which work on every anyio backend). A read or write that the
kernel can satisfy at once costs one system call and no trip through the event loop; only a
wait for the peer does. That is also where the time limits live: a write that has to wait gets
write_timeout, and nothing else pays for a cancel scope.
"""

from __future__ import annotations

import logging
import socket

import anyio
import anyio.lowlevel

logger = logging.getLogger("pyserve.http")

# After an error response we half-close and read (and discard) what the client still sends, for at
# most this long / this much: closing a socket with unread input makes the kernel send a TCP reset,
# which can destroy the error response before the client reads it.
LINGER_SECONDS = 1.0
LINGER_BYTES = 1024 * 1024
READ_SIZE = 65536

_WAIT_FAILED = (OSError, anyio.ClosedResourceError, anyio.BusyResourceError)


def _address(sock: socket.socket, peer: bool) -> tuple[str, int] | None:
    try:
        address = sock.getpeername() if peer else sock.getsockname()
    except OSError:
        return None
    if isinstance(address, tuple) and len(address) >= 2:  # IPv6 addresses are 4-tuples
        return (str(address[0]), int(address[1]))
    return None


class Transport:
    def __init__(self, sock: socket.socket, write_timeout: float) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._write_timeout = write_timeout
        self.closed = False  # a write failed (or we closed): the connection is unusable
        self._writing = False  # a write is waiting for the socket; later writes queue behind it
        self._write_done: anyio.Event | None = None
        self.waits = 0  # reads and writes that had to wait for the peer (see server.py: fairness)
        self.client = _address(sock, peer=True)
        self.server = _address(sock, peer=False)

    # ---- reading ---------------------------------------------------------------------------

    def read_nowait(self) -> bytes | None:
        """Bytes the kernel already holds, b"" once the peer closed (or reset) the connection,
        None when nothing has arrived yet."""
        try:
            return self._sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            return b""

    async def read(self) -> bytes:
        """Some bytes, or b"" once the peer closed (or reset) the connection."""
        while True:
            data = self.read_nowait()
            if data is not None:
                return data
            self.waits += 1
            try:
                await anyio.wait_readable(self._sock)
            except _WAIT_FAILED:
                return b""

    # ---- writing ---------------------------------------------------------------------------

    async def write(self, data: bytes) -> bool:
        """False when the peer is gone or did not take the bytes within write_timeout.

        Writes go out in call order even when tasks write concurrently: while one write waits
        for the socket, the others wait for it."""
        if self._writing:
            return await self._write_after_others(data)
        if self.closed:
            return False
        try:
            sent = self._sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._fail()
            return False
        if sent == len(data):
            return True
        return await self._write_slowly(memoryview(data)[sent:])

    async def _write_slowly(self, rest: memoryview) -> bool:
        self._writing = True
        self.waits += 1
        try:
            with anyio.move_on_after(self._write_timeout):
                while rest:
                    await anyio.wait_writable(self._sock)
                    try:
                        rest = rest[self._sock.send(rest):]
                    except (BlockingIOError, InterruptedError):
                        continue
                return True
        except _WAIT_FAILED:
            pass
        finally:
            self._writing = False
            if self._write_done is not None:
                self._write_done.set()
                self._write_done = None
        logger.debug("write to %s failed or timed out; dropping the connection", self.client)
        self._fail()
        return False

    async def _write_after_others(self, data: bytes) -> bool:
        while self._writing:
            if self._write_done is None:
                self._write_done = anyio.Event()
            await self._write_done.wait()
        return await self.write(data)

    def _fail(self) -> None:
        self.closed = True

    # ---- ending ----------------------------------------------------------------------------

    async def linger(self) -> None:
        """Half-close, then drain the client's leftovers briefly (see LINGER_SECONDS)."""
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError:
            return
        with anyio.move_on_after(LINGER_SECONDS):
            drained = 0
            while drained < LINGER_BYTES:
                chunk = await self.read()
                if not chunk:
                    return
                drained += len(chunk)

    async def aclose(self) -> None:
        """Close the socket; any task still waiting on it is woken (its wait fails)."""
        self.closed = True
        if self._sock.fileno() < 0:
            return
        anyio.notify_closing(self._sock)
        self._sock.close()
        await anyio.lowlevel.cancel_shielded_checkpoint()
