"""Tokenizer: one wrapper over a HF `tokenizers.Tokenizer` for every source we load from.

tokenizer.json is used as written; sentencepiece `tokenizer.model` files and GGUF vocabularies are
turned into an equivalent `tokenizers` pipeline (see vocab_tokenizer.py), the way transformers
builds its fast tokenizers, so encode/decode match transformers by construction.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

from tokenizers import Tokenizer as _Backend
from tokenizers import processors

log = logging.getLogger(__name__)


class Tokenizer:
    vocab_size: int
    bos_token: str | None
    eos_token: str | None
    bos_token_id: int | None
    eos_token_ids: list[int]
    add_bos_token: bool
    add_eos_token: bool
    all_special_ids: set[int]

    def __init__(
        self,
        backend: _Backend,
        *,
        bos_token: str | None,
        eos_token: str | None,
        unk_token: str | None = None,
        pad_token: str | None = None,
        add_bos_token: bool | None = None,
        add_eos_token: bool | None = None,
        extra_eos_ids: Iterable[int] = (),
    ) -> None:
        """`add_bos_token`/`add_eos_token` None: keep the backend's post-processor (tokenizer.json);
        either one given: install a post-processor that adds exactly those, as transformers does."""
        self.backend = backend
        self.bos_token, self.eos_token = bos_token, eos_token
        self.unk_token, self.pad_token = unk_token, pad_token
        self.bos_token_id = self.token_to_id(bos_token)
        eos_id = self.token_to_id(eos_token)
        self.eos_token_ids = []
        for i in ([eos_id] if eos_id is not None else []) + list(extra_eos_ids):
            if i not in self.eos_token_ids:
                self.eos_token_ids.append(int(i))
        self.eos_token_id = self.eos_token_ids[0] if self.eos_token_ids else None
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)

        if add_bos_token is not None or add_eos_token is not None:
            self._set_post_processor(bool(add_bos_token), bool(add_eos_token))
        self.add_bos_token = self._probe_adds(first=True)
        self.add_eos_token = self._probe_adds(first=False)

        special = {i for i, tok in backend.get_added_tokens_decoder().items() if tok.special}
        for t in (bos_token, eos_token, unk_token, pad_token):
            if (i := self.token_to_id(t)) is not None:
                special.add(i)
        self.all_special_ids = special

    # -- construction helpers -------------------------------------------------------------
    def _set_post_processor(self, add_bos: bool, add_eos: bool) -> None:
        if add_bos and self.bos_token_id is None:
            log.warning("add_bos_token is set but the tokenizer has no BOS token; not adding one")
            add_bos = False
        eos_id = self.token_to_id(self.eos_token)
        if add_eos and eos_id is None:
            add_eos = False
        single = ("$A:0" if not add_bos else f"{self.bos_token}:0 $A:0") + (f" {self.eos_token}:0" if add_eos else "")
        pair = single + (f" {self.bos_token}:1" if add_bos else "") + " $B:1" + (f" {self.eos_token}:1" if add_eos else "")
        specials = []
        if add_bos:
            specials.append((self.bos_token, self.bos_token_id))
        if add_eos:
            specials.append((self.eos_token, eos_id))
        self.backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)

    def _probe_adds(self, first: bool) -> bool:
        """Whether encode(add_special_tokens=True) adds BOS (first) / EOS (last) — read off the backend
        rather than trusted from config, so the flag always tells the truth."""
        tid = self.bos_token_id if first else self.token_to_id(self.eos_token)
        if tid is None:
            return False
        with_special = self.backend.encode("a", add_special_tokens=True).ids
        plain = self.backend.encode("a", add_special_tokens=False).ids
        if len(with_special) <= len(plain):
            return False
        return (with_special[0] if first else with_special[-1]) == tid

    # -- public API -----------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids; special tokens written in the text (e.g. "<|im_start|>") map to their ids."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text for `ids`. No clean-up of spaces: decode(encode(s)) gives s back (ids outside the
        vocabulary, e.g. the padding rows of a larger embedding, decode to nothing)."""
        ids = [int(i) for i in ids]
        if any(i < 0 for i in ids):
            raise ValueError(f"token ids must be >= 0, got {min(ids)}")
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str | None]:
        """Raw vocabulary pieces (byte-level or '▁'-spelled), None for ids outside the vocabulary."""
        return [self.backend.id_to_token(int(i)) for i in ids]

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    def is_special(self, id: int) -> bool:
        return id in self.all_special_ids

    def get_vocab(self) -> dict[str, int]:
        return self.backend.get_vocab(with_added_tokens=True)

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r}, "
            f"add_bos_token={self.add_bos_token})"
        )
