"""Reading .safetensors files without the safetensors package: header parse + numpy memmap, no copies.

Layout: 8-byte little-endian header length N, N bytes of JSON
({name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}), then the data;
offsets are relative to the end of the header.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from collections.abc import Callable

import numpy as np

from .errors import ModelLoadError
from .tensor import TensorRecord

log = logging.getLogger(__name__)

# safetensors dtype -> (our format, numpy dtype holding the bytes)
_DTYPES: dict[str, tuple[str, np.dtype]] = {
    "F32": ("f32", np.dtype("<f4")),
    "F16": ("f16", np.dtype("<f2")),
    "BF16": ("bf16", np.dtype("<u2")),  # bf16 bits as uint16; the engine knows the format
}
SUPPORTED_DTYPES = tuple(_DTYPES)

_MAX_HEADER = 100 * 1024 * 1024  # the format's own limit


def read_header(path: str) -> tuple[dict, int]:
    """(header dict without __metadata__, byte offset where tensor data starts)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ModelLoadError(f"{path}: too short to be a safetensors file")
            (n,) = struct.unpack("<Q", raw)
            if n > _MAX_HEADER:
                raise ModelLoadError(f"{path}: safetensors header length {n} is implausible (corrupt file?)")
            header_bytes = f.read(n)
    except OSError as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from e
    if len(header_bytes) != n:
        raise ModelLoadError(f"{path}: truncated safetensors header")
    try:
        header = json.loads(header_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path}: safetensors header is not valid JSON: {e}") from e
    if not isinstance(header, dict):
        raise ModelLoadError(f"{path}: safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    return header, 8 + n


def read_safetensors(path: str, select: Callable[[str], bool] | None = None) -> dict[str, TensorRecord]:
    """TensorRecords (memmap views, no copies) for the tensors of one file that `select` keeps."""
    header, data_start = read_header(path)
    size = os.path.getsize(path)
    # One read-only map per file; every record is a view into it, so the file stays mapped while
    # any record lives.
    mm = np.memmap(path, dtype=np.uint8, mode="r") if size > 0 else np.zeros(0, np.uint8)
    out: dict[str, TensorRecord] = {}
    for name, info in header.items():
        if select is not None and not select(name):
            continue
        try:
            dtype_name = info["dtype"]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise ModelLoadError(f"{path}: malformed header entry for tensor {name!r}") from e
        if dtype_name not in _DTYPES:
            raise ModelLoadError(
                f"{path}: tensor {name!r} has dtype {dtype_name}, which is not supported; "
                f"supported dtypes: {', '.join(SUPPORTED_DTYPES)}"
            )
        fmt, dtype = _DTYPES[dtype_name]
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if end - begin != count * dtype.itemsize or begin < 0 or data_start + end > size:
            raise ModelLoadError(
                f"{path}: tensor {name!r} byte range [{begin}, {end}) does not fit shape {list(shape)} "
                f"{dtype_name} or the file size (truncated file?)"
            )
        data = mm[data_start + begin : data_start + end].view(dtype).reshape(shape)
        out[name] = TensorRecord(format=fmt, data=data, shape=shape)
    return out


def load_safetensors_dir(model_dir: str, select: Callable[[str], bool] | None = None) -> tuple[dict[str, TensorRecord], list[str]]:
    """All tensors of a model directory: model.safetensors, or shards listed in
    model.safetensors.index.json. Returns (records, files read)."""
    index_path = os.path.join(model_dir, "model.safetensors.index.json")
    single = os.path.join(model_dir, "model.safetensors")
    if os.path.isfile(index_path):
        try:
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, KeyError, TypeError, json.JSONDecodeError) as e:
            raise ModelLoadError(f"{index_path}: cannot read the shard index ('weight_map'): {e}") from e
        files = sorted(set(weight_map.values()))
    elif os.path.isfile(single):
        weight_map = None
        files = ["model.safetensors"]
    else:
        found = sorted(n for n in os.listdir(model_dir) if n.endswith(".safetensors"))
        if not found:
            others = sorted(n for n in os.listdir(model_dir) if n.endswith((".bin", ".pt", ".pth", ".gguf")))
            hint = f" (found {', '.join(others)}: only safetensors weights are supported in a directory)" if others else ""
            raise ModelLoadError(f"{model_dir}: no model.safetensors or model.safetensors.index.json{hint}")
        weight_map = None
        files = found
    records: dict[str, TensorRecord] = {}
    for fname in files:
        fpath = os.path.join(model_dir, fname)
        if not os.path.isfile(fpath):
            raise ModelLoadError(f"{model_dir}: shard {fname} named in the index is missing")

        def keep(name: str, _fname: str = fname) -> bool:
            # With an index, a tensor belongs to the shard the index names (duplicates elsewhere ignored).
            if weight_map is not None and weight_map.get(name) != _fname:
                return False
            return select is None or select(name)

        for name, rec in read_safetensors(fpath, keep).items():
            if name in records:
                raise ModelLoadError(f"{model_dir}: tensor {name!r} appears in more than one file")
            records[name] = rec
    if weight_map is not None:
        missing = [n for n in weight_map if n not in records and (select is None or select(n))]
        if missing:
            raise ModelLoadError(f"{model_dir}: tensors listed in the index but absent from their shard: {missing[:5]}")
    return records, files
