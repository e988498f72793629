"""pyserve's GGUF reader (pyserve/model/gguf_reader.py) against the reference, `gguf.GGUFReader`:
the same keys, values and value types, the same tensor infos and bytes, on the default model, the
tiny test GGUFs and a file with every value type; plus what the reference does not do for us:
clear errors for big-endian, truncated and corrupt files."""

from __future__ import annotations

import mmap
import os
import re
import struct

import numpy as np
import pytest

import tiny_models as tm
from pyserve.model import ModelLoadError, default_model_path, load_model
from pyserve.model.gguf_reader import ELEMENT_DTYPES, GGML_TYPES, GGUFFile, ValueType, ggml_type, read_gguf_file

gguf = pytest.importorskip("gguf")
VT = gguf.GGUFValueType


def _flatten(v):
    """The reference flattens arrays of arrays into one list; ours keeps them nested."""
    if isinstance(v, list) and v and isinstance(v[0], list):
        return [x for sub in v for x in _flatten(sub)]
    return v


def assert_same_as_reference(path: str) -> GGUFFile:
    ref = gguf.GGUFReader(path, "r")
    ours = read_gguf_file(path)
    assert ours.version == ref.fields["GGUF.version"].contents()
    assert len(ours.tensors) == ref.fields["GGUF.tensor_count"].contents()
    assert len(ours.metadata) == ref.fields["GGUF.kv_count"].contents()
    fields = {k: f for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert list(ours.metadata) == list(fields)  # every key, in file order
    for key, f in fields.items():
        assert [int(t) for t in ours.types[key]] == [int(t) for t in f.types], key
        want, got = f.contents(), _flatten(ours.metadata[key])
        assert type(got) is type(want), key
        assert got == want, key
        if isinstance(want, list):  # bool vs int vs float element types too
            assert [type(x) for x in got] == [type(x) for x in want], key

    assert (ours.alignment, ours.data_offset) == (ref.alignment, ref.data_offset)
    assert ours.file_size == os.path.getsize(path)
    assert list(ours.tensors) == [t.name for t in ref.tensors]
    for t in ref.tensors:
        o = ours.tensors[t.name]
        assert (o.type.id, o.type.name) == (int(t.tensor_type), t.tensor_type.name), t.name
        assert o.dims == tuple(int(d) for d in t.shape), t.name
        assert o.shape == tuple(reversed(o.dims))
        assert (o.n_elements, o.n_bytes, o.offset) == (t.n_elements, t.n_bytes, t.data_offset), t.name
        raw = ours.raw(o)
        assert not raw.flags.writeable and isinstance(raw.base, memoryview) and isinstance(raw.base.obj, mmap.mmap)
        np.testing.assert_array_equal(raw, np.asarray(t.data).reshape(-1).view(np.uint8))
        if o.type.name in ELEMENT_DTYPES:
            arr = ours.array(o)
            assert arr.shape == o.shape
            np.testing.assert_array_equal(arr.view(np.uint8), np.asarray(t.data).view(np.uint8))
        else:
            assert ours.blocks(o).shape == tuple(t.data.shape), t.name  # the reference's byte shape
            with pytest.raises(ModelLoadError, match="stored in blocks"):
                ours.array(o)
    return ours


# --------------------------------------------------------------------------- against the reference


def test_default_model_matches_reference() -> None:
    ours = assert_same_as_reference(default_model_path())
    assert len(ours.metadata["tokenizer.ggml.tokens"]) == 49152
    assert ours.metadata["general.architecture"] == "llama"
    assert ours.tensors["blk.0.attn_q.weight"].type.name == "Q4_1"


@pytest.mark.parametrize("kind, quant", [("llama", "Q8_0"), ("qwen2", "Q4_1"), ("mistral", "F16"), ("llama-bpe", "BF16")])
def test_tiny_ggufs_match_reference(kind: str, quant: str) -> None:
    assert_same_as_reference(tm.tiny_gguf(kind, quant))


_SCALARS = [
    ("t.u8", 200, VT.UINT8), ("t.i8", -100, VT.INT8), ("t.u16", 60000, VT.UINT16), ("t.i16", -30000, VT.INT16),
    ("t.u32", 4_000_000_000, VT.UINT32), ("t.i32", -2_000_000_000, VT.INT32), ("t.f32", 0.1, VT.FLOAT32),
    ("t.bool_true", True, VT.BOOL), ("t.bool_false", False, VT.BOOL), ("t.str", "héllo ✓", VT.STRING),
    ("t.str_empty", "", VT.STRING), ("t.u64", 2**64 - 1, VT.UINT64), ("t.i64", -(2**63), VT.INT64),
    ("t.f64", 1e-300, VT.FLOAT64),
]


def _write_all_types(path: str) -> None:
    w = gguf.GGUFWriter(path, "llama")
    for key, value, vt in _SCALARS:
        w.add_key_value(key, value, vt)
    for key, value, vt in _SCALARS:
        if vt != VT.STRING:
            w.add_key_value(key + ".array", [value, value], VT.ARRAY, sub_type=vt)
    w.add_key_value("t.strings", ["a", "", "ü ✓", "x y"], VT.ARRAY, sub_type=VT.STRING)
    w.add_key_value("t.nested", [[1, 2], [3]], VT.ARRAY, sub_type=VT.ARRAY)
    w.add_custom_alignment(64)
    rng = np.random.default_rng(0)
    w.add_tensor("f32", rng.standard_normal((3, 5), dtype=np.float32))
    w.add_tensor("f16", rng.standard_normal((2, 3, 4)).astype(np.float16))
    w.add_tensor("i32", np.arange(7, dtype=np.int32))
    w.add_tensor("q8", gguf.quants.quantize(rng.standard_normal((4, 64), dtype=np.float32), gguf.GGMLQuantizationType.Q8_0),
                 raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("bf16", gguf.quants.quantize(rng.standard_normal((2, 8), dtype=np.float32), gguf.GGMLQuantizationType.BF16),
                 raw_dtype=gguf.GGMLQuantizationType.BF16)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_every_value_type_matches_reference(tmp_path) -> None:
    path = str(tmp_path / "all.gguf")
    _write_all_types(path)
    ours = assert_same_as_reference(path)
    md = ours.metadata
    for key, value, vt in _SCALARS:
        assert ours.types[key] == (ValueType(int(vt)),)
        want = float(np.float32(value)) if vt == VT.FLOAT32 else value
        assert md[key] == want and type(md[key]) is type(value), key
        if vt != VT.STRING:
            assert md[key + ".array"] == [want, want] and ours.types[key + ".array"] == (ValueType.ARRAY, ValueType(int(vt)))
    assert md["t.strings"] == ["a", "", "ü ✓", "x y"]
    assert md["t.nested"] == [[1, 2], [3]]
    assert ours.types["t.nested"] == (ValueType.ARRAY, ValueType.ARRAY, ValueType.INT32)
    assert ours.alignment == 64 and ours.data_offset % 64 == 0
    assert all((t.offset - ours.data_offset) % 64 == 0 for t in ours.tensors.values())
    assert ours.array(ours.tensors["f16"]).shape == (2, 3, 4)
    assert ours.array(ours.tensors["i32"]).tolist() == list(range(7))
    assert ours.blocks(ours.tensors["q8"]).shape == (4, 68)  # 2 blocks of 34 bytes a row


def test_type_tables_match_gguf() -> None:
    assert {t.name: int(t) for t in ValueType} == {t.name: int(t) for t in VT}
    for tid, t in GGML_TYPES.items():
        q = gguf.GGMLQuantizationType(tid)
        assert t.name == q.name and (t.block_size, t.type_size) == gguf.GGML_QUANT_SIZES[q]
    for name, dtype in ELEMENT_DTYPES.items():
        t = GGML_TYPES[gguf.GGMLQuantizationType[name].value]
        assert (t.block_size, t.type_size) == (1, dtype.itemsize)
    # a type missing from our table comes from gguf's
    iq = gguf.GGMLQuantizationType.IQ4_NL
    assert int(iq) not in GGML_TYPES
    assert (ggml_type(int(iq)).name, ggml_type(int(iq)).block_size) == ("IQ4_NL", 32)
    assert ggml_type(9999) is None
    from pyserve.model.gguf_file import _FILE_TYPES

    for ft, name in _FILE_TYPES.items():
        assert gguf.LlamaFileType(ft).name.removeprefix("MOSTLY_").removeprefix("ALL_") == name


# --------------------------------------------------------------------------- files built by hand


def _s(b: bytes | str) -> bytes:
    b = b.encode() if isinstance(b, str) else b
    return struct.pack("<Q", len(b)) + b


def _kv(key: bytes | str, vtype: int, payload: bytes) -> bytes:
    return _s(key) + struct.pack("<I", vtype) + payload


def _file(kvs: list[bytes], tensors: list[tuple[str, tuple[int, ...], int, bytes]] = (), *, version: int = 3,
          alignment: int = 32) -> bytes:
    """A GGUF image: kvs as built by _kv; tensors as (name, dims, ggml type, data bytes)."""
    infos, data = b"", b""
    for name, dims, gtype, blob in tensors:
        data += b"\0" * (-len(data) % alignment)
        infos += _s(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
        infos += struct.pack("<IQ", gtype, len(data))
        data += blob
    head = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(kvs)) + b"".join(kvs) + infos
    return head + b"\0" * (-len(head) % alignment) + data


def _u32(key: str, v: int) -> bytes:
    return _kv(key, 4, struct.pack("<I", v))


def _write(tmp_path, name: str, image: bytes) -> str:
    p = tmp_path / name
    p.write_bytes(image)
    return str(p)


def test_hand_built_file_and_empty_arrays(tmp_path) -> None:
    empty_u32 = _kv("a.empty", 9, struct.pack("<IQ", 4, 0))
    empty_str = _kv("a.empty_str", 9, struct.pack("<IQ", 8, 0))
    f32 = np.arange(6, dtype="<f4").reshape(2, 3)
    path = _write(tmp_path, "h.gguf", _file([_u32("a.x", 7), empty_u32, empty_str], [("w", (3, 2), 0, f32.tobytes())]))
    g = read_gguf_file(path)
    assert g.metadata == {"a.x": 7, "a.empty": [], "a.empty_str": []}
    assert g.types["a.empty"] == (ValueType.ARRAY, ValueType.UINT32)  # the reference says only (ARRAY,)
    np.testing.assert_array_equal(g.array(g.tensors["w"]), f32)
    ref = gguf.GGUFReader(path)
    assert ref.fields["a.empty"].contents() == [] and ref.fields["a.x"].contents() == 7


def test_big_endian_is_a_clear_error(tmp_path) -> None:
    path = str(tmp_path / "be.gguf")
    w = gguf.GGUFWriter(path, "llama", endianess=gguf.GGUFEndian.BIG)
    w.add_uint32("a.x", 7)
    w.add_tensor("w", np.ones(4, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert gguf.GGUFReader(path).fields["a.x"].contents() == 7  # a valid file, just big-endian
    with pytest.raises(ModelLoadError, match=re.escape(path) + ".*big-endian.*only little-endian"):
        read_gguf_file(path)


def _cut_points(path: str) -> dict[str, int]:
    g = read_gguf_file(path)
    with open(path, "rb") as f:
        image = f.read()
    tokens = image.find(b"tokenizer.ggml.tokens")
    first_info = image.find(_s(next(iter(g.tensors))))
    return {
        "counts": 10,
        "first key": 26,
        "token strings": tokens + 200,
        "tensor infos": first_info + 12,
        "last tensor info": g.data_offset - 8,
        "tensor data": g.file_size - 1,
    }


@pytest.mark.parametrize("where", ["counts", "first key", "token strings", "tensor infos", "last tensor info", "tensor data"])
def test_truncated_file_is_a_clear_error(tmp_path, where: str) -> None:
    src = tm.tiny_gguf("qwen2", "Q8_0")
    cut = _cut_points(src)[where]
    with open(src, "rb") as f:
        image = f.read()
    path = _write(tmp_path, "cut.gguf", image[:cut])
    with pytest.raises(ModelLoadError, match=re.escape(path) + ".*truncated") as info:
        read_gguf_file(path)
    assert f"the file has {cut}" in str(info.value)
    with pytest.raises(ModelLoadError, match=re.escape(path)):
        load_model(path)


_CORRUPT = [
    (b"", "is not a GGUF file"),
    (b"GGML" + bytes(20), "is not a GGUF file"),
    (_file([], version=1), "GGUF version 1 is not supported"),
    (_file([], version=4), "GGUF version 4 is not supported"),
    (_file([_kv("a.x", 13, b"\0" * 8)]), "metadata a.x has unknown value type 13"),
    (_file([_kv("a.x", 9, struct.pack("<IQ", 77, 1))]), r"metadata a.x \(array element type\) has unknown value type 77"),
    (_file([_u32("a.x", 1), _u32("a.x", 2)]), "metadata key 'a.x' appears twice"),
    (_file([_kv(b"\xff\xfe", 4, bytes(4))]), "metadata key 0 at byte 32 is not UTF-8"),
    (_file([_kv("general.alignment", 10, struct.pack("<Q", 32))]), "general.alignment must be a power of two"),
    (_file([_u32("general.alignment", 48)]), "general.alignment must be a power of two"),
    (_file([_u32("general.alignment", 0)]), "general.alignment must be a power of two"),
    (_file([_kv("a.s", 9, struct.pack("<IQ", 8, 2**60))]), r"a.s \(1152921504606846976 strings\)"),
    (_file([_kv("a.n", 9, struct.pack("<IQ", 6, 2**40))]), r"a.n \(1099511627776 FLOAT32 values\)"),
    (_file([_kv("a.s", 9, struct.pack("<IQ", 8, 2) + _s(b"x") + struct.pack("<Q", 2**63))]), r"a.s\[1\]"),
    (_file([_kv("a.s", 9, struct.pack("<IQ", 8, 2) + struct.pack("<Q", 2**63) + _s(b"x"))]), r"a.s\[0\]"),
    (_file([], [("w", (4,), 99, bytes(16))]), "tensor w has unknown GGML type 99"),
    (_file([], [("w", (4,), 0, bytes(16)), ("w", (4,), 0, bytes(16))]), "tensor 'w' appears twice"),
    (_file([], [("w", (40,), 8, bytes(34))]), "rows of 40 are not whole Q8_0 blocks of 32"),
    (_file([], [("w", (1, 1, 1, 1, 1), 0, bytes(4))]), "tensor w has 5 dimensions"),
    (_file([], [("w", (64,), 0, bytes(16))]), "tensor w ends at byte"),
]


@pytest.mark.parametrize("image, message", _CORRUPT, ids=[m for _, m in _CORRUPT])
def test_corrupt_files_are_clear_errors(tmp_path, image: bytes, message: str) -> None:
    path = _write(tmp_path, "bad.gguf", image)
    with pytest.raises(ModelLoadError, match=re.escape(path) + ".*" + message if image else message):
        read_gguf_file(path)


def test_undecodable_string_value_is_replaced_with_a_warning(tmp_path, caplog) -> None:
    path = _write(tmp_path, "u.gguf", _file([_kv("a.s", 8, _s(b"ok\xff")), _kv("a.l", 9, struct.pack("<IQ", 8, 2) + _s(b"x") + _s(b"\xc3"))]))
    g = read_gguf_file(path)
    assert g.metadata == {"a.s": "ok\ufffd", "a.l": ["x", "\ufffd"]}
    assert "a.s is not valid UTF-8" in caplog.text and "a.l[1] is not valid UTF-8" in caplog.text
