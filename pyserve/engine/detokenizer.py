"""Incremental detokenization: token ids in, newly completed text out.

Decoding each new token on its own is wrong twice over: a sentencepiece piece like "▁world" decodes
to "world" when it stands first (the leading space is eaten), and a byte-level or byte-fallback token
may hold only part of a UTF-8 character. So, like vLLM, we decode a small *window* of ids twice:

    prefix_text = decode(ids[prefix_offset:read_offset])   # text already emitted, re-decoded
    full_text   = decode(ids[prefix_offset:])              # the same plus the new tokens
    new_text    = full_text[len(prefix_text):]

The window keeps a few earlier tokens, so the leading-space rule of the decoder applies to the
window's first token (whose text was emitted earlier) rather than to the new one. When `full_text`
ends in U+FFFD the last character is still incomplete: emit nothing, keep the offsets, and try again
with the next token. Only after a clean emit does the window slide forward.
"""
from __future__ import annotations

from typing import Protocol, Sequence

REPLACEMENT_CHAR = "\ufffd"

# How many prompt tokens the first window starts with: enough context for the decoder's
# leading-space handling, small enough that decoding stays O(window) per step.
_INITIAL_CONTEXT = 5


class _Decoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str: ...


class IncrementalDetokenizer:
    """Turns a stream of generated token ids into text, one completed piece at a time.

    Guarantees: the concatenation of every `add()` result and the final `flush()` equals the
    decode of the output ids in the context of the prompt, and no `add()` result ends in a
    broken UTF-8 character (no stray U+FFFD from a half-received multi-byte character).
    """

    def __init__(
        self,
        tokenizer: _Decoder,
        prompt_ids: Sequence[int] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._ids: list[int] = list(prompt_ids)
        self._num_prompt = len(self._ids)
        # [prefix_offset, read_offset): tokens whose text was already emitted (context only).
        # [read_offset, len(ids)):      tokens whose text is still pending.
        self._prefix_offset = max(len(self._ids) - _INITIAL_CONTEXT, 0)
        self._read_offset = len(self._ids)

    @property
    def output_ids(self) -> list[int]:
        """Every generated id added so far (the prompt excluded)."""
        return self._ids[self._num_prompt :]

    def add(self, token_ids: Sequence[int]) -> str:
        """Appends generated ids; returns the text they complete (possibly "")."""
        if not token_ids:
            return ""
        self._ids.extend(token_ids)
        new_text = self._pending_text()
        if new_text.endswith(REPLACEMENT_CHAR):
            # A multi-byte character is still incomplete: wait for the next token. (An invalid
            # byte, or a real U+FFFD, is only held until a token ends on a clean boundary; byte-
            # level BPE tokens often straddle CJK characters, so "force it out after N tokens"
            # would break valid text.)
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return new_text

    def flush(self) -> str:
        """Returns whatever is still pending at the end of the stream (may end in U+FFFD if the
        model really stopped in the middle of a character; that is the honest decode then)."""
        new_text = self._pending_text()
        self._prefix_offset = self._read_offset = len(self._ids)
        return new_text

    def _pending_text(self) -> str:
        if self._read_offset >= len(self._ids):
            return ""
        decode = self._tokenizer.decode
        window = self._ids[self._prefix_offset :]
        prefix_len = self._read_offset - self._prefix_offset
        prefix_text = decode(window[:prefix_len], skip_special_tokens=self._skip_special) if prefix_len else ""
        full_text = decode(window, skip_special_tokens=self._skip_special)
        if len(full_text) <= len(prefix_text):
            # e.g. only skipped special tokens arrived, or the decoder merged text across the
            # boundary (cleanup rules); nothing new to show yet.
            return ""
        return full_text[len(prefix_text) :]
