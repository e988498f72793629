"""Compiling output constraints into grammars the engine enforces.

The engine applies a grammar's allowed-token mask in C++ (csrc/engine/grammar.h, llguidance's C
API without the GIL). This side turns a `Constraint` into llguidance's grammar text, compiles it
once against the model's vocabulary, and caches the result per constraint: agents and extraction
pipelines send the same schema again and again.

The vocabulary (every token's bytes, special tokens marked) is built on the first constrained
request, not at start-up: unconstrained serving pays nothing for it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from typing import Any, Sequence

from pyserve.engine.detokenizer import TokenStrings
from pyserve.protocol.structured import Constraint

log = logging.getLogger(__name__)

# JSON may put whitespace between tokens; a model (a small one especially) can get stuck emitting
# it forever. A bounded run keeps pretty-printed output possible and every output finite.
JSON_WHITESPACE = r"[ \t\n\r]{0,24}"


class GrammarError(ValueError):
    """A constraint that does not compile (the message is the compiler's reason)."""


def grammar_text(constraint: Constraint) -> tuple[str, str]:
    """(kind, data) for the engine's compiler: json_schema, regex, lark or llguidance."""
    from llguidance import LLMatcher
    from llguidance.gbnf_to_lark import any_to_lark

    if constraint.kind == "json_schema":
        schema = json.loads(constraint.data)
        own = schema.get("x-guidance") if isinstance(schema, dict) else None
        says = isinstance(own, dict) and ({"whitespace_pattern", "whitespace_flexible"} & set(own))
        try:
            return "llguidance", LLMatcher.grammar_from_json_schema(
                schema, defaults={} if says else {"whitespace_pattern": JSON_WHITESPACE})
        except ValueError as e:
            raise GrammarError(str(e)) from None
    if constraint.kind == "regex":
        return "regex", constraint.data
    if constraint.kind == "choice":
        choices = json.loads(constraint.data)
        return "lark", "start: " + " | ".join(json.dumps(c) for c in choices)
    if constraint.kind == "grammar":  # GBNF (llama.cpp's) or Lark
        try:
            return "lark", any_to_lark(constraint.data)
        except Exception as e:  # the converter raises whatever its parser meets
            raise GrammarError(f"cannot read the grammar: {e}") from None
    if constraint.kind == "lark":
        return "lark", constraint.data
    raise GrammarError(f"unknown constraint kind {constraint.kind!r}")


def vocabulary_bytes(tokenizer: Any, vocab_size: int) -> list[bytes]:
    """Each token id's bytes as llguidance reads them: text tokens as the bytes they add to the
    output, special tokens as 0xFF + their name (never produced as text), ids past the
    tokenizer's end (padding rows of the embedding) as special placeholders."""
    strings = TokenStrings(tokenizer)
    special = set(getattr(tokenizer, "all_special_ids", ()) or ())
    out: list[bytes] = []
    n_tok = int(getattr(tokenizer, "vocab_size", vocab_size))
    for i in range(vocab_size):
        if i >= n_tok:
            out.append(b"\xff<[%d]>" % i)
            continue
        text, raw = strings.get(i)
        if i in special:
            out.append(b"\xff" + (text.encode("utf-8") or b"<[%d]>" % i))
        else:
            out.append(raw)
    return out


class GrammarCompiler:
    """Constraint -> compiled grammar (pyserve._C.Grammar), cached. Thread-safe; compiling runs
    without the GIL, so handlers call it from a worker thread."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: Sequence[int], *, cache_size: int = 64) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = int(vocab_size)
        self._eos = [int(t) for t in eos_token_ids if 0 <= int(t) < vocab_size]
        self._cache: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._cache_size = cache_size
        self._vocab: Any = None
        self._lock = threading.Lock()  # the cache (held for dict operations only)
        self._vocab_lock = threading.Lock()  # building the vocabulary (seconds for a large one)

    def _vocabulary(self) -> Any:
        with self._vocab_lock:
            if self._vocab is None:
                if not self._eos:
                    raise GrammarError("structured output needs an end-of-sequence token, and this model has none")
                import llguidance
                import llguidance._lib as lib

                from pyserve import _C

                major = str(getattr(llguidance, "__version__", "0")).split(".")[0]
                if major != "1":  # the C structs we fill are llguidance 1.x's
                    raise GrammarError(f"llguidance {llguidance.__version__} is not supported (1.x is)")

                t0 = time.perf_counter()
                tokens = vocabulary_bytes(self._tokenizer, self._vocab_size)
                self._vocab = _C.GrammarVocabulary(lib.__file__, tokens, self._eos[0], self._eos[1:])
                log.info("structured output: vocabulary of %d tokens ready in %.2f s", len(tokens),
                         time.perf_counter() - t0)
            return self._vocab

    def cached(self, constraint: Constraint) -> Any:
        """The compiled grammar if it is cached, else None."""
        with self._lock:
            hit = self._cache.get(constraint.key)
            if hit is not None:
                self._cache.move_to_end(constraint.key)
            return hit

    def compile(self, constraint: Constraint) -> Any:
        key = constraint.key
        hit = self.cached(constraint)
        if hit is not None:
            return hit
        kind, data = grammar_text(constraint)
        vocab = self._vocabulary()
        try:
            grammar = vocab.compile(kind, data)
        except ValueError as e:
            raise GrammarError(str(e)) from None
        with self._lock:
            self._cache[key] = grammar
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return grammar
