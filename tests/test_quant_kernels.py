"""Quantized weights (GGUF blocks) as quant panels: the scalar reference dequantization of every
format against the gguf package's, and the native kernels (int16 activations against the file's
integer codes; decode and prefill alike; the embedding gather) of every ISA against a float64
reference of the dequantized weights, on fresh seeded random inputs. The SIMD paths must equal
the scalar twin bit for bit."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

from pyserve import _C

ALL_FORMATS = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k"]
NATIVE = [f for f in ALL_FORMATS if _C.kernels.is_native_format(f)]
ISAS = ["scalar"] + [isa for isa in ("avx2", "avx512", "avx512_vnni") if _C.cpu_features()[isa]]
SIMD_ISAS = ISAS[1:]


def rng_for(*key: object) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def random_blocks(fmt: str, n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """[n, k] of `fmt` as raw bytes: quantized from Gaussian weights where the gguf package can,
    else random bytes with finite, modest f16 scales."""
    t = GGMLQuantizationType[fmt.upper()]
    w = rng.standard_normal((n, k)).astype(np.float32)
    try:
        return np.ascontiguousarray(quants.quantize(w, t)).view(np.uint8).reshape(n, -1)
    except NotImplementedError:
        block, size = GGML_QUANT_SIZES[t]
        raw = rng.integers(0, 256, (n, k // block, size), dtype=np.uint8)
        # Every f16 field (scales d/dmin) sits at a known offset; make them small finite numbers.
        offsets = {"q2_k": [80, 82], "q3_k": [108], "q4_k": [0, 2], "q5_k": [0, 2], "q6_k": [208]}[fmt]
        for off in offsets:
            raw[:, :, off:off + 2] = rng.uniform(0.001, 0.05, (n, k // block)).astype(np.float16)[..., None].view(np.uint8)
        return raw.reshape(n, -1)


def reference(fmt: str, raw: np.ndarray, k: int) -> np.ndarray:
    t = GGMLQuantizationType[fmt.upper()]
    return quants.dequantize(raw, t).reshape(raw.shape[0], k).astype(np.float64)


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_reference_dequantization_matches_gguf(fmt: str) -> None:
    rng = rng_for("deq", fmt)
    raw = random_blocks(fmt, 3, 512, rng)
    ours = _C.kernels.dequantize(fmt, raw, raw.shape[0] * 512).reshape(3, 512)
    np.testing.assert_array_equal(ours, reference(fmt, raw, 512).astype(np.float32))


def test_every_quantized_format_is_native() -> None:
    assert NATIVE == ALL_FORMATS
    assert not _C.kernels.is_native_format("f32")


@pytest.mark.parametrize("fmt", ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q4_k", "q5_k", "q6_k"])
def test_panels_hold_the_files_bytes(fmt: str) -> None:
    """Decode reads every packed byte once per token: the panels of the 4- to 8-bit formats hold
    what the file holds (5- and 6-bit codes keep their high bits in a plane, not in whole bytes).
    Q4_K and Q5_K spend a byte on each 6-bit sub-block scale and min code (2.3% more than the
    file); Q2_K and Q3_K keep their 2- and 3-bit codes in nibbles, so they are left out."""
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[fmt.upper()]]
    n, k = 64, 2048
    file_bytes = n * k // block * size
    packed = _C.kernels.packed_bytes(fmt, n, k)
    if fmt in ("q4_k", "q5_k"):
        assert packed == file_bytes + n * k // 256 * 4  # 16 code bytes where the file has 12
    else:
        assert packed == file_bytes


def activation_error_bound(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """|x·wᵀ - x̂·wᵀ| for x̂ = x rounded to int16 per 32-block (step amax / 32767, so at most half
    a step off per value): sum over blocks of amax_b / 65534 * sum_{j in b} |w_j|."""
    m, k = x.shape
    amax = np.abs(x.astype(np.float64)).reshape(m, k // 32, 32).max(axis=2)  # [m, nb]
    wabs = np.abs(w).reshape(w.shape[0], k // 32, 32).sum(axis=2)           # [n, nb]
    return (amax / 65534.0) @ wabs.T


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", ALL_FORMATS)
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 13])
def test_quantized_matmul_matches_float64(isa: str, fmt: str, m: int) -> None:
    # n not a multiple of the 16-row panel; k several blocks (256 for K-quants); m across tiles.
    rng = rng_for("mm", isa, fmt, m)
    n, k = 53, 512
    raw = random_blocks(fmt, n, k, rng)
    w = reference(fmt, raw, k)
    x = rng.standard_normal((m, k)).astype(np.float32)
    x[0, :32] *= 40.0  # one block with a far larger range than the rest
    bias = rng.standard_normal(n).astype(np.float32)
    y0 = rng.standard_normal((m, n)).astype(np.float32)
    ref = x.astype(np.float64) @ w.T + bias + y0
    got = _C.kernels.qgemm(fmt, raw, n, k, x, bias=bias, y=y0, isa=isa, threads=2)
    # The activation step's own error, plus float32 rounding of the sums.
    float_err = 1e-6 * (np.abs(x.astype(np.float64)) @ np.abs(w.T) + np.abs(bias) + np.abs(y0) + 1.0)
    bound = activation_error_bound(x, w) + float_err
    excess = np.abs(got - ref) - bound
    # (8-bit activations, llama.cpp's choice, would be ~256x this bound's typical use: they fail.)
    assert excess.max() <= 0, f"worst excess {excess.max():.3g} over a bound of {bound.max():.3g}"


@pytest.mark.parametrize("isa", SIMD_ISAS)
@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_simd_equals_scalar_bit_for_bit(isa: str, fmt: str) -> None:
    rng = rng_for("bits", isa, fmt)
    n, k = 45, 768
    raw = random_blocks(fmt, n, k, rng)
    x = rng.standard_normal((11, k)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    y0 = rng.standard_normal((11, n)).astype(np.float32)
    simd = _C.kernels.qgemm(fmt, raw, n, k, x, bias=bias, y=y0, isa=isa, threads=2)
    scalar = _C.kernels.qgemm(fmt, raw, n, k, x, bias=bias, y=y0, isa="scalar", threads=1)
    np.testing.assert_array_equal(simd, scalar)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", NATIVE)
def test_quantized_gather_is_exact(isa: str, fmt: str) -> None:
    rng = rng_for("gather", isa, fmt)
    n, k = 40, 256
    raw = random_blocks(fmt, n, k, rng)
    ids = [int(i) for i in rng.integers(0, n, 7)]
    got = _C.kernels.qgather(fmt, raw, n, k, ids, isa=isa)
    np.testing.assert_array_equal(got, reference(fmt, raw, k)[ids].astype(np.float32))


def test_wrong_sizes_are_clear_errors() -> None:
    raw = np.zeros(20 * 4, np.uint8)
    with pytest.raises(ValueError, match="wrong number of bytes"):
        _C.kernels.qgemm("q4_1", raw, 5, 32, np.ones((1, 32), np.float32))
    with pytest.raises(ValueError, match="unsupported tensor format 'q7_0'.*q4_1"):
        _C.kernels.dequantize("q7_0", raw, 32)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", NATIVE)
def test_quantized_matmul_is_batch_invariant(isa: str, fmt: str) -> None:
    """A row's result is bit-identical alone, in any batch, with any thread count: a seeded request
    samples the same tokens whatever else the engine is running."""
    rng = rng_for("inv", isa, fmt)
    n, k = 77, 256
    raw = random_blocks(fmt, n, k, rng)
    x = rng.standard_normal((13, k)).astype(np.float32)
    batch = _C.kernels.qgemm(fmt, raw, n, k, x, isa=isa, threads=2)
    for i in (0, 5, 12):
        alone = _C.kernels.qgemm(fmt, raw, n, k, x[i:i + 1], isa=isa, threads=1)
        np.testing.assert_array_equal(alone[0], batch[i])
    pair = _C.kernels.qgemm(fmt, raw, n, k, x[3:5], isa=isa, threads=2)
    np.testing.assert_array_equal(pair, batch[3:5])
