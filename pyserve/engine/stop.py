"""Stop strings over a text stream that arrives in arbitrary pieces.

The matcher emits text as early as it can while never letting a stop string (or any part of one)
out: a tail of the buffer that could still grow into a stop string is held back until the next
piece decides it. When a stop string completes, the text before it is emitted and the stream ends.

Which stop wins when several match: the one that *completes first* in the stream (earliest end),
and on a tie the longest (earliest start). That is what a token-by-token generator would see, so the
result does not depend on how the text was chunked.
"""
from __future__ import annotations

from typing import Iterable


class StopStringMatcher:
    def __init__(self, stops: Iterable[str]) -> None:
        # Empty strings would match everywhere; duplicates add nothing.
        self.stops: list[str] = sorted({s for s in stops if s}, key=len, reverse=True)
        self._buffer = ""
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the stream, if any

    def feed(self, text: str) -> tuple[str, bool]:
        """Adds `text`; returns (text safe to emit now, stopped?). After a stop, returns ("", True)."""
        if self.stopped:
            return "", True
        if not self.stops:
            return text, False
        buf = self._buffer + text
        best_end = best_start = -1
        for stop in self.stops:
            start = buf.find(stop)
            if start < 0:
                continue
            end = start + len(stop)
            if best_end < 0 or end < best_end or (end == best_end and start < best_start):
                best_start, best_end, self.matched = start, end, stop
        if best_end >= 0:
            self.stopped = True
            self._buffer = ""
            return buf[:best_start], True
        hold = self._partial_match_len(buf)
        self._buffer = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold], False

    def flush(self) -> str:
        """The held-back text, for a stream that ended without hitting a stop string."""
        if self.stopped:
            return ""
        out, self._buffer = self._buffer, ""
        return out

    def _partial_match_len(self, buf: str) -> int:
        """Length of the longest suffix of `buf` that is a proper prefix of some stop string."""
        best = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(buf)), best, -1):
                if buf.endswith(stop[:k]):
                    best = k
                    break
        return best
