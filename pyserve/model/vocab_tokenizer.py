"""Building a `tokenizers` pipeline from a bare vocabulary: a GGUF file's tokenizer metadata, or a
sentencepiece `tokenizer.model`.

Two shapes, the same two transformers builds (integrations/gguf, models/llama/tokenization_llama):
- byte-level BPE (GGUF `gpt2`: Llama 3, Qwen2, SmolLM2): tokens + merges, a pre-tokenizer chosen by
  `tokenizer.ggml.pre` (the regexes are llama.cpp's, src/llama-vocab.cpp), ByteLevel decoder;
- sentencepiece-style BPE (GGUF `llama`, tokenizer.model: Llama 2, TinyLlama, Mistral): '▁'-spelled
  pieces, merges derived from the piece scores, byte fallback, Metaspace pre-tokenizer;
- Gemma's sentencepiece BPE (GGUF `llama` of a gemma architecture): as transformers' GemmaTokenizer
  (a normalizer writes spaces as '▁', no prefix space), merges ranked by file order.
Tokens typed CONTROL become special added tokens and USER_DEFINED ones plain added tokens, so both
are matched whole in the text, as llama.cpp and transformers do.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from functools import lru_cache
from itertools import repeat
from operator import itemgetter

import numpy as np

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as Backend

from .errors import ModelLoadError

log = logging.getLogger(__name__)

# llama.cpp / GGUF token types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _split_then_bytes(pattern: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _gpt2() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # uses _GPT2_SPLIT


def _digits_then_gpt2() -> pre_tokenizers.PreTokenizer:
    # llama.cpp's SMOLLM/STARCODER: "\p{N}" (each digit alone), then the GPT-2 regex.
    return pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )


# tokenizer.ggml.pre -> (pre-tokenizer factory, ignore_merges). llama.cpp sets ignore_merges for the
# Llama 3 family: a pre-token that is itself in the vocabulary is taken whole.
_PRE_TOKENIZERS = {
    "gpt2": (_gpt2, False),
    "default": (_gpt2, False),
    "smollm": (_digits_then_gpt2, False),
    "starcoder": (_digits_then_gpt2, False),
    "refact": (_digits_then_gpt2, False),
    "llama-bpe": (lambda: _split_then_bytes(_LLAMA3_SPLIT), True),
    "llama3": (lambda: _split_then_bytes(_LLAMA3_SPLIT), True),
    "llama-v3": (lambda: _split_then_bytes(_LLAMA3_SPLIT), True),
    "smaug-bpe": (lambda: _split_then_bytes(_LLAMA3_SPLIT), False),
    "qwen2": (lambda: _split_then_bytes(_QWEN2_SPLIT), False),
    "deepseek-r1-qwen": (lambda: _split_then_bytes(_QWEN2_SPLIT), False),
}
SUPPORTED_PRE_TOKENIZERS = tuple(sorted(_PRE_TOKENIZERS))


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the byte-level alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _added_tokens(tokens: Sequence[str], types: Sequence[int] | None, extra_special: Sequence[int] = ()) -> list[AddedToken]:
    """CONTROL (and the ids in extra_special) -> special; USER_DEFINED -> not special. Whole-match,
    no normalization, no stripping. Only the typed ids are visited (a vocabulary is mostly NORMAL)."""
    specials, user = set(extra_special), set()
    if types is not None:
        typed = np.asarray(types)
        specials.update(np.flatnonzero(typed == CONTROL).tolist())
        user.update(np.flatnonzero(typed == USER_DEFINED).tolist())
    ids = sorted(i for i in specials | user if 0 <= i < len(tokens))
    return [
        AddedToken(tokens[i], special=i in specials, normalized=False, lstrip=False, rstrip=False, single_word=False)
        for i in ids
    ]


def _vocab_dict(tokens: Sequence[str]) -> dict[str, int]:
    n = len(tokens)
    vocab = dict(zip(tokens, range(n)))
    if len(vocab) != n:  # a token listed twice keeps its first id (reversed: the first one is written last)
        vocab = dict(zip(reversed(tokens), range(n - 1, -1, -1)))
        for i, tok in enumerate(tokens):
            if vocab[tok] != i:
                log.warning("duplicate token %r at ids %d and %d; keeping the first", tok, vocab[tok], i)
    return vocab


def byte_level_bpe(
    tokens: Sequence[str],
    merges: Sequence[str],
    types: Sequence[int] | None,
    pre: str | None,
) -> Backend:
    """Byte-level BPE from GGUF `gpt2` metadata (tokens already spelled in the byte alphabet)."""
    pre_key = pre or "default"
    if pre_key not in _PRE_TOKENIZERS:
        raise ModelLoadError(
            f"GGUF pre-tokenizer {pre!r} is not supported; supported: {', '.join(SUPPORTED_PRE_TOKENIZERS)}"
        )
    if pre is None:
        log.warning("GGUF file names no pre-tokenizer (tokenizer.ggml.pre); using GPT-2's")
    spelled = _byte_level_spelling(tokens, types)
    merge_pairs = _merge_pairs(merges)
    make_pre, ignore_merges = _PRE_TOKENIZERS[pre_key]
    model = models.BPE(
        vocab=_vocab_dict(spelled), merges=merge_pairs, fuse_unk=False, byte_fallback=False, ignore_merges=ignore_merges
    )
    backend = Backend(model)
    backend.normalizer = None
    backend.pre_tokenizer = make_pre()
    backend.decoder = decoders.ByteLevel()
    added = _added_tokens(spelled, types)
    backend.add_special_tokens([t for t in added if t.special])
    backend.add_tokens([t for t in added if not t.special])
    return backend


@lru_cache(maxsize=1)
def _outside_byte_alphabet() -> re.Pattern:
    return re.compile("[^" + "".join(re.escape(c) for c in sorted(bytes_to_unicode().values())) + "]")


def _byte_level_spelling(tokens: Sequence[str], types: Sequence[int] | None) -> list[str]:
    """Tokens spelled in the byte alphabet. Added tokens (CONTROL, USER_DEFINED) are matched on the
    raw text before BPE, so they keep their raw spelling; a normal token outside the alphabet (a
    converter quirk) is respelled byte by byte. One regex scan of the joined vocabulary finds
    whether any token needs a look at all."""
    spelled = list(tokens)
    outside = _outside_byte_alphabet()
    if outside.search("".join(tokens)) is None:
        return spelled
    spelling = bytes_to_unicode()
    for i, tok in enumerate(tokens):
        typ = types[i] if types is not None and i < len(types) else NORMAL
        if typ not in (CONTROL, USER_DEFINED) and outside.search(tok):
            spelled[i] = "".join(spelling[b] for b in tok.encode("utf-8"))
    return spelled


def _merge_pairs(merges: Sequence[str]) -> list[tuple[str, str]]:
    """GGUF merges ("a b") as pairs, split by C-level maps (no Python loop body per merge); a merge
    that is not two space-separated tokens is named in the error."""
    pairs = list(map(tuple, map(str.split, merges, repeat(" "))))
    if pairs and set(map(len, pairs)) != {2}:
        bad = next(m for m, p in zip(merges, pairs) if len(p) != 2)
        raise ModelLoadError(f"GGUF merge {bad!r} is not two space-separated tokens")
    return pairs


def generate_merges(vocab: dict[str, int], scores: dict[str, float] | None = None) -> list[tuple[str, str]]:
    """BPE merges implied by a sentencepiece vocabulary: every split of a piece into two pieces that
    are both in the vocabulary, ranked by the piece's score (highest first) or, without scores, by
    its id; ties keep the order of the pieces. Same order as transformers' `generate_merges`, so
    the two tokenize identically (its per-piece sort by ids cannot matter: the splits of one piece
    all differ in len(left), which the final sort compares first)."""
    ranked: list[tuple[tuple[float, int, int], str, str]] = []
    append = ranked.append
    by = scores if scores is not None else vocab
    for piece, rank in by.items():
        n = len(piece)
        for cut in range(1, n):
            left = piece[:cut]
            if left in vocab:
                right = piece[cut:]
                if right in vocab:
                    append(((rank, cut, n - cut), left, right))
    ranked.sort(key=itemgetter(0), reverse=scores is not None)
    return [(a, b) for _, a, b in ranked]


def sentencepiece_bpe(
    pieces: Sequence[str],
    types: Sequence[int] | None,
    *,
    scores: Sequence[float] | None = None,
    unk_id: int | None = None,
    add_prefix_space: bool = True,
    legacy: bool = False,
) -> Backend:
    """Sentencepiece-style BPE with byte fallback, as transformers' LlamaTokenizer builds it.

    scores None: merges ranked by piece id (tokenizer.model, which stores pieces best-first);
    otherwise by score (GGUF `llama` vocabularies). add_prefix_space: prepend '▁' to the text
    (sentencepiece's dummy prefix) — only at the very start (legacy False) or also after each
    special token (legacy True) — and strip it again when decoding.
    """
    vocab = _vocab_dict(pieces)
    merges = generate_merges(vocab, dict(zip(pieces, scores)) if scores is not None else None)
    unk = pieces[unk_id] if unk_id is not None and 0 <= unk_id < len(pieces) else None
    backend = Backend(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    backend.normalizer = None
    if add_prefix_space:
        scheme = "always" if legacy else "first"
    else:
        scheme = "never"
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix_space:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    added = _added_tokens(pieces, types, extra_special=[unk_id] if unk is not None else [])
    backend.add_special_tokens([t for t in added if t.special])
    backend.add_tokens([t for t in added if not t.special])
    return backend


def gemma_bpe(pieces: Sequence[str], types: Sequence[int] | None, *, unk_id: int | None = None) -> Backend:
    """Gemma's vocabulary (a GGUF `llama` tokenizer of arch gemma/gemma2/gemma3) as transformers
    builds it (integrations/gguf gemma_tokenizer + GemmaTokenizer):
    - a token of two or more spaces is stored as real spaces; it is looked up as '▁'s, so it is
      respelled so (and, no longer matching its own text, is not an added token);
    - the file has no merges and its scores do not follow the merge order: merges are derived from
      the pieces and ranked by file position;
    - spaces become '▁' in a normalizer, no prefix space; byte fallback; decoding undoes both."""
    spelled = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in pieces]
    vocab = _vocab_dict(spelled)
    merges = generate_merges(vocab, {tok: -float(i) for i, tok in enumerate(spelled)})
    unk = spelled[unk_id] if unk_id is not None and 0 <= unk_id < len(spelled) else None
    backend = Backend(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    backend.normalizer = normalizers.Replace(" ", "\u2581")
    backend.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    added = [t for t in _added_tokens(pieces, types) if t.special or t.content in vocab]
    backend.add_special_tokens([t for t in added if t.special])
    backend.add_tokens([t for t in added if not t.special])
    return backend
