"""Tokenizer + chat template from a HF model directory.

tokenizer.json (the `tokenizers` serialization) is used as written; without it, a sentencepiece
tokenizer.model is read with `sentencepiece` and rebuilt as the equivalent `tokenizers` BPE, the
way transformers' LlamaTokenizer does (vocab_tokenizer.sentencepiece_bpe). tokenizer_config.json
supplies the special tokens, add_bos_token/add_eos_token, extra added tokens and the chat template.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from typing import Any

from tokenizers import AddedToken
from tokenizers import Tokenizer as Backend

from .errors import ModelLoadError
from .tokenizer import Tokenizer
from .vocab_tokenizer import NORMAL, sentencepiece_bpe

log = logging.getLogger(__name__)


def read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path} is not valid JSON: {e}") from e
    except OSError as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from e


def token_content(value: Any) -> str | None:
    """Special tokens in tokenizer_config.json are strings or AddedToken dicts {"content": ...}."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ModelLoadError(f"tokenizer_config.json: cannot read special token {value!r}")


def pick_chat_template(value: Any, where: str) -> str | None:
    """chat_template is a string, or a list of {"name", "template"} from which we take "default"."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if "default" in named:
            return named["default"]
        if len(named) == 1:
            return next(iter(named.values()))
        raise ModelLoadError(f"{where}: chat_template lists {sorted(map(str, named))} but no 'default'")
    raise ModelLoadError(f"{where}: chat_template must be a string or a list of {{name, template}}")


def read_chat_template(model_dir: str, tok_config: dict) -> str | None:
    """tokenizer_config.json's chat_template, else chat_template.jinja / chat_template.json (newer
    HF layouts keep it in its own file)."""
    where = os.path.join(model_dir, "tokenizer_config.json")
    template = pick_chat_template(tok_config.get("chat_template"), where)
    if template is not None:
        return template
    jinja_path = os.path.join(model_dir, "chat_template.jinja")
    if os.path.isfile(jinja_path):
        with open(jinja_path, encoding="utf-8") as f:
            return f.read()
    json_path = os.path.join(model_dir, "chat_template.json")
    if os.path.isfile(json_path):
        return pick_chat_template(read_json(json_path).get("chat_template"), json_path)
    return None


def _added_tokens_from_config(tok_config: dict) -> list[tuple[int, AddedToken]]:
    out = []
    for key, spec in (tok_config.get("added_tokens_decoder") or {}).items():
        content = token_content(spec)
        if content is None:
            continue
        spec = spec if isinstance(spec, dict) else {}
        out.append(
            (
                int(key),
                AddedToken(
                    content,
                    special=bool(spec.get("special", False)),
                    normalized=bool(spec.get("normalized", not spec.get("special", False))),
                    lstrip=bool(spec.get("lstrip", False)),
                    rstrip=bool(spec.get("rstrip", False)),
                    single_word=bool(spec.get("single_word", False)),
                ),
            )
        )
    return sorted(out, key=lambda x: x[0])


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def _proto_fields(buf: bytes):
    """Yield (field number, wire type, value) of one protobuf message: ints for varints, bytes for
    length-delimited fields, raw 4/8 bytes for fixed ones."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos : pos + 8], pos + 8
        elif wire == 2:
            n, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + n], pos + n
        elif wire == 5:
            value, pos = buf[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield field, wire, value


def read_sentencepiece_proto(proto: bytes) -> dict:
    """The few ModelProto fields we need (sentencepiece_model.proto), without protobuf:
    pieces (piece, score, type), trainer_spec.model_type and normalizer_spec.add_dummy_prefix."""
    import struct

    pieces, scores, types = [], [], []
    model_type, add_dummy_prefix = 1, True  # proto defaults: UNIGRAM, true
    for field, _wire, value in _proto_fields(proto):
        if field == 1:  # SentencePiece
            piece, score, typ = "", 0.0, NORMAL
            for f, _w, v in _proto_fields(value):
                if f == 1:
                    piece = v.decode("utf-8")
                elif f == 2:
                    score = struct.unpack("<f", v)[0]
                elif f == 3:
                    typ = v
            pieces.append(piece)
            scores.append(score)
            types.append(typ)
        elif field == 2:  # TrainerSpec
            for f, _w, v in _proto_fields(value):
                if f == 3:
                    model_type = v
        elif field == 3:  # NormalizerSpec
            for f, _w, v in _proto_fields(value):
                if f == 3:
                    add_dummy_prefix = bool(v)
    return {"pieces": pieces, "scores": scores, "types": types, "model_type": model_type, "add_dummy_prefix": add_dummy_prefix}


_SPM_MODEL_TYPES = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}


def _sentencepiece_backend(path: str, tok_config: dict) -> tuple[Backend, dict[str, str | None]]:
    import sentencepiece as spm

    try:
        sp = spm.SentencePieceProcessor(model_file=path)
        info = read_sentencepiece_proto(sp.serialized_model_proto())
    except Exception as e:  # sentencepiece raises RuntimeError/OSError variants
        raise ModelLoadError(f"{path}: not a readable sentencepiece model: {e}") from e
    if info["model_type"] != 2:
        kind = _SPM_MODEL_TYPES.get(info["model_type"], str(info["model_type"]))
        raise ModelLoadError(
            f"{path}: sentencepiece {kind} models are not supported; only BPE models (Llama, Mistral, TinyLlama)"
        )
    add_prefix_space = tok_config.get("add_prefix_space")
    backend = sentencepiece_bpe(
        info["pieces"],
        info["types"],
        unk_id=sp.unk_id() if sp.unk_id() >= 0 else None,
        add_prefix_space=info["add_dummy_prefix"] if add_prefix_space is None else bool(add_prefix_space),
        legacy=bool(tok_config.get("legacy", False)),
    )

    def piece(i: int) -> str | None:
        return sp.id_to_piece(i) if i >= 0 else None

    defaults = {
        "bos_token": piece(sp.bos_id()),
        "eos_token": piece(sp.eos_id()),
        "unk_token": piece(sp.unk_id()),
        "pad_token": piece(sp.pad_id()),
    }
    return backend, defaults


def _added_contents(backend: Backend) -> set[str]:
    return {t.content for t in backend.get_added_tokens_decoder().values()}


def _add(backend: Backend, tok: AddedToken) -> None:
    if tok.special:
        backend.add_special_tokens([tok])
    else:
        backend.add_tokens([tok])


def load_hf_tokenizer(model_dir: str, extra_eos_ids: Iterable[int] = ()) -> tuple[Tokenizer, str | None]:
    """(Tokenizer, chat template source or None) for a HF model directory."""
    cfg_path = os.path.join(model_dir, "tokenizer_config.json")
    tok_config: dict = read_json(cfg_path) if os.path.isfile(cfg_path) else {}
    json_path = os.path.join(model_dir, "tokenizer.json")
    spm_path = os.path.join(model_dir, "tokenizer.model")
    defaults: dict[str, str | None] = {}
    if os.path.isfile(json_path):
        try:
            backend = Backend.from_file(json_path)
        except Exception as e:  # tokenizers raises a bare Exception on bad files
            raise ModelLoadError(f"{json_path}: cannot load: {e}") from e
    elif os.path.isfile(spm_path):
        backend, defaults = _sentencepiece_backend(spm_path, tok_config)
    else:
        raise ModelLoadError(f"{model_dir}: no tokenizer.json or tokenizer.model")

    # Added tokens the config declares but the backend lacks (older checkpoints keep some only there).
    for tid, tok in _added_tokens_from_config(tok_config):
        have = backend.token_to_id(tok.content)
        if have is not None and have != tid:
            log.warning("added token %r has id %d in the tokenizer but %d in tokenizer_config.json", tok.content, have, tid)
            continue
        if have is None and tid != backend.get_vocab_size(with_added_tokens=True):
            log.warning("added token %r declared at id %d does not fit the vocabulary; skipped", tok.content, tid)
            continue
        if tok.content not in _added_contents(backend):
            _add(backend, tok)

    names = {}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        names[key] = token_content(tok_config[key]) if key in tok_config else defaults.get(key)
    # Special tokens named in the config must be matched whole in text, like transformers does.
    for content in names.values():
        if content is not None and backend.token_to_id(content) is not None and content not in _added_contents(backend):
            _add(backend, AddedToken(content, special=True, normalized=False))
    tokenizer = Tokenizer(
        backend,
        bos_token=names["bos_token"],
        eos_token=names["eos_token"],
        unk_token=names["unk_token"],
        pad_token=names["pad_token"],
        # Explicit flags in the config rewrite the post-processor (as transformers does); the
        # sentencepiece path has none of its own, and LlamaTokenizer adds BOS by default.
        add_bos_token=tok_config.get("add_bos_token", True if defaults else None),
        add_eos_token=tok_config.get("add_eos_token"),
        extra_eos_ids=extra_eos_ids,
    )
    return tokenizer, read_chat_template(model_dir, tok_config)
