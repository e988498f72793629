"""Stop strings over a text stream that arrives in arbitrary pieces.

The matcher emits text as early as it can while never letting a stop string (or any part of one)
out: a tail of the buffer that could still grow into a stop string is held back until the next
piece decides it. When a stop string completes, the text before it is emitted and the stream ends.

Which stop wins when several match: the one that *completes first* in the stream (earliest end),
and on a tie the longest (earliest start). That is what a token-by-token generator would see, so the
result does not depend on how the text was chunked.

Each stop string runs a Knuth-Morris-Pratt automaton whose state (how much of the stop the text
currently ends with) carries across pieces: every character costs O(1) amortized per stop, so
long or self-similar stop strings cannot make a request expensive.
"""
from __future__ import annotations

from typing import Iterable


def _failure(stop: str) -> list[int]:
    """KMP failure function: fail[i] = length of the longest proper border of stop[: i + 1]."""
    fail = [0] * len(stop)
    k = 0
    for i in range(1, len(stop)):
        while k and stop[i] != stop[k]:
            k = fail[k - 1]
        if stop[i] == stop[k]:
            k += 1
        fail[i] = k
    return fail


class StopStringMatcher:
    def __init__(self, stops: Iterable[str]) -> None:
        # Empty strings would match everywhere; duplicates add nothing. Longest first, so the
        # first stop found completing at a character is the longest one ending there.
        self.stops: list[str] = sorted({s for s in stops if s}, key=len, reverse=True)
        self._fail = [_failure(s) for s in self.stops]
        self._state = [0] * len(self.stops)  # characters of each stop the text ends with
        self._chars = frozenset("".join(self.stops))
        self._buffer = ""  # held text: the longest partial match
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the stream, if any

    def feed(self, text: str) -> tuple[str, bool]:
        """Adds `text`; returns (text safe to emit now, stopped?). After a stop, returns ("", True)."""
        if self.stopped:
            return "", True
        if not self.stops:
            return text, False
        if not self._buffer and self._chars.isdisjoint(text):
            return text, False  # nothing here can start or continue a stop (states are all 0)
        buf = self._buffer + text
        base = len(self._buffer)
        states = self._state
        for pos, c in enumerate(text):
            hit = -1
            for i, stop in enumerate(self.stops):
                m = states[i]
                if m or stop[0] == c:
                    fail = self._fail[i]
                    while m and stop[m] != c:
                        m = fail[m - 1]
                    if stop[m] == c:
                        m += 1
                        if m == len(stop):
                            if hit < 0:
                                hit = i
                            m = fail[m - 1]
                    states[i] = m
            if hit >= 0:
                self.stopped = True
                self.matched = self.stops[hit]
                self._buffer = ""
                return buf[: base + pos + 1 - len(self.matched)], True
        hold = max(states)
        self._buffer = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold], False

    def flush(self) -> str:
        """The held-back text, for a stream that ended without hitting a stop string."""
        if self.stopped:
            return ""
        out, self._buffer = self._buffer, ""
        self._state = [0] * len(self.stops)
        return out
