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


# ---------------------------------------------------------------------------------------------
# One token's text, for logprobs


def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable character -> byte table (the byte-level BPE alphabet, inverted)."""
    from pyserve.model.vocab_tokenizer import bytes_to_unicode

    return {c: b for b, c in bytes_to_unicode().items()}


def _decoder_kinds(tokenizer: object) -> set[str]:
    """The `type`s in a `tokenizers` decoder pipeline ("ByteLevel", "ByteFallback", ...), or an
    empty set when the tokenizer is not backed by `tokenizers`."""
    backend = getattr(tokenizer, "backend", None)
    if backend is None:
        return set()
    import json

    try:
        # The decoder's own state: serialising the whole tokenizer (to_str) would cost ~0.2 s and
        # 1.5 MB of JSON for a 49k vocabulary, on the first request that asks for logprobs.
        own = getattr(backend, "decoder", None)
        if own is not None:
            decoder = json.loads(own.__getstate__())
        else:
            to_str = getattr(backend, "to_str", None)
            decoder = (json.loads(to_str()).get("decoder") or {}) if to_str is not None else {}
    except (AttributeError, ValueError, TypeError):
        return set()
    kinds: set[str] = set()
    stack = [decoder]
    while stack:
        d = stack.pop()
        if isinstance(d, dict):
            if isinstance(d.get("type"), str):
                kinds.add(d["type"])
            stack.extend(d.get("decoders") or [])
    return kinds


class TokenStrings:
    """The text and raw bytes of single tokens, as logprobs report them.

    A token's bytes are what it contributes to the output: byte-level BPE pieces ("Ġw", "Ã¶")
    mapped back through GPT-2's byte alphabet, sentencepiece pieces with '▁' as a space and
    "<0xAB>" as the byte 0xAB, special tokens as their written form. A token may hold part of a
    UTF-8 character: its `bytes` say exactly which, and its text shows U+FFFD for the broken part
    (vLLM prints the same). Tokenizers of another shape fall back to decoding the token alone.
    """

    def __init__(self, tokenizer: object) -> None:
        self._tokenizer = tokenizer
        kinds = _decoder_kinds(tokenizer)
        self._byte_level = "ByteLevel" in kinds
        self._sentencepiece = not self._byte_level and bool(kinds & {"ByteFallback", "Metaspace", "Replace"})
        self._byte_of = _byte_decoder() if self._byte_level else {}
        self._cache: dict[int, tuple[str, bytes]] = {}
        is_special = getattr(tokenizer, "is_special", None)
        self._is_special = is_special if callable(is_special) else (lambda _id: False)
        backend = getattr(tokenizer, "backend", None)
        get_added = getattr(backend, "get_added_tokens_decoder", None)
        self._added = set(get_added()) if callable(get_added) else set()

    def get(self, token_id: int) -> tuple[str, bytes]:
        """(text, raw bytes) of one token."""
        hit = self._cache.get(token_id)
        if hit is None:
            raw = self._bytes(token_id)
            hit = (raw.decode("utf-8", errors="replace"), raw)
            if len(self._cache) < 1 << 17:
                self._cache[token_id] = hit
        return hit

    def _bytes(self, token_id: int) -> bytes:
        convert = getattr(self._tokenizer, "convert_ids_to_tokens", None)
        piece = convert([token_id])[0] if convert is not None else None
        if piece is None:
            return self._decode_alone(token_id)
        if token_id in self._added or self._is_special(token_id):
            return piece.encode("utf-8")  # added tokens are stored as written
        if self._byte_level:
            try:
                return bytes(self._byte_of[c] for c in piece)
            except KeyError:
                return piece.encode("utf-8")
        if self._sentencepiece:
            if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                try:
                    return bytes([int(piece[3:5], 16)])
                except ValueError:
                    pass
            return piece.replace("\u2581", " ").encode("utf-8")
        return self._decode_alone(token_id)

    def _decode_alone(self, token_id: int) -> bytes:
        try:
            return self._tokenizer.decode([token_id], skip_special_tokens=False).encode("utf-8")  # type: ignore[attr-defined]
        except Exception:  # an id outside the vocabulary: nothing to show
            return b""
