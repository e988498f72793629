"""The matmul family on the device (csrc/backend/cuda/gemv.cu, gemm.cu, matmul.cu): y = x · Wᵀ
(+ bias) (+ y) for W in every stored format, through the decode path (GEMV) and the prefill path
(tiled GEMM), against a float64 product of the weights the gguf package dequantizes from the same
bytes; and the embedding gather, which must give exactly those weights."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

PLAIN = ["f32", "f16", "bf16"]
QUANTIZED = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k"]
FORMATS = PLAIN + QUANTIZED
PATHS = ["gemv", "gemm"]

# Byte offsets of the f16 scale fields of each block (tensor/quant_blocks.h).
F16_FIELDS = {"q4_0": [0], "q4_1": [0, 2], "q5_0": [0], "q5_1": [0, 2], "q8_0": [0],
              "q2_k": [80, 82], "q3_k": [108], "q4_k": [0, 2], "q5_k": [0, 2], "q6_k": [208]}


def random_bytes_blocks(fmt: str, n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """[n, row bytes] of `fmt`: every code bit pattern, with finite, modest f16 scales."""
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[fmt.upper()]]
    raw = rng.integers(0, 256, (n, k // block, size), dtype=np.uint8)
    for off in F16_FIELDS[fmt]:
        raw[:, :, off:off + 2] = rng.uniform(0.001, 0.05, (n, k // block)).astype(np.float16)[..., None].view(np.uint8)
    return raw.reshape(n, -1)


def random_weights(fmt: str, n: int, k: int, rng: np.random.Generator, *, any_bits: bool = False):
    """(raw, w): the packed bytes [n, row bytes] of an [n, k] matrix of `fmt`, and the weights they
    hold as float64 [n, k]. Quantized: blocks quantized from Gaussian weights where the gguf package
    can (or with any_bits), else random bytes with finite scales."""
    g = rng.standard_normal((n, k)).astype(np.float32)
    if fmt == "f32":
        return g.view(np.uint8), g.astype(np.float64)
    if fmt == "f16":
        h = g.astype(np.float16)
        return h.view(np.uint8), h.astype(np.float64)
    if fmt == "bf16":
        bits = (g.view(np.uint32) >> 16).astype(np.uint16)
        return bits.view(np.uint8), (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    t = GGMLQuantizationType[fmt.upper()]
    raw = None
    if not any_bits:
        try:
            raw = np.ascontiguousarray(quants.quantize(g, t)).view(np.uint8).reshape(n, -1)
        except NotImplementedError:
            pass
    if raw is None:
        raw = random_bytes_blocks(fmt, n, k, rng)
    return raw, quants.dequantize(raw, t).reshape(n, k).astype(np.float64)


def run_and_check(gpu, fmt: str, path: str, rng: np.random.Generator, m: int, n: int, k: int, *,
                  with_bias: bool, accumulate: bool, ldx_pad: int = 0, ldy_pad: int = 0) -> None:
    raw, w = random_weights(fmt, n, k, rng)
    x = rng.standard_normal((m, k + ldx_pad)).astype(np.float32)
    if m > 0 and k >= 32:
        x[0, :32] *= 40.0  # one block of far larger range than the rest
    bias = rng.standard_normal(n).astype(np.float32) if with_bias else None
    y0 = rng.standard_normal((m, n + ldy_pad)).astype(np.float32) if accumulate else None

    got = gpu.matmul(fmt, raw, n, k, x, bias=bias, y=y0, path=path)

    x64 = x[:, :k].astype(np.float64)
    ref = x64 @ w.T
    scale = np.abs(x64) @ np.abs(w).T  # sum_j |x_j| |w_j| per output
    if bias is not None:
        ref = ref + bias
        scale = scale + np.abs(bias)
    if y0 is not None:
        ref = ref + y0[:, :n]
        scale = scale + np.abs(y0[:, :n])
        # columns past n (ldy > n) are not the kernel's to touch
        np.testing.assert_array_equal(got[:, n:], y0[:, n:])
    assert got.shape == (m, n + (ldy_pad if accumulate else 0))
    # float32 accumulation of k products (and the bias and y terms) against float64: each rounding
    # is within u = 2^-24 ~ 6e-8 of its partial sum, so |error| <= c * u * scale with c at most
    # ~k in the worst case and far less for random signs: on these inputs, at k = 2304, the GEMM
    # (one running sum over k) stays under 2e-7 of the scale and the GEMV (split over threads)
    # under 2e-8. 2e-5 leaves that a wide margin yet fails a single wrong weight of average size
    # (1/k of the scale: >= 4e-4 at k = 2304), let alone a wrong scale or code plane.
    err = np.abs(got[:, :n].astype(np.float64) - ref)
    bound = 2e-5 * scale + 1e-30
    worst = np.unravel_index(np.argmax(err / bound), err.shape) if err.size else None
    assert (err <= bound).all(), f"worst at {worst}: error {err[worst]:.3g}, bound {bound[worst]:.3g}"


# Per m: the k of the strided, biased, accumulating case and the k of the plain case, so each
# format and path meets every k in {256, 512, 2304} in both.
K_FOR_M = {1: (2304, 256), 3: (256, 512), 8: (512, 2304), 17: (2304, 512), 64: (256, 2304), 200: (512, 256)}


@pytest.mark.parametrize("m", sorted(K_FOR_M))
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_matmul_matches_float64(gpu, rng, fmt: str, path: str, m: int) -> None:
    k_strided, k_plain = K_FOR_M[m]
    # n = 257: not a multiple of any block of rows or tile; x rows 3 floats apart from alignment
    # (the kernels' element-wise x loads), y rows wider than n (columns past n untouched).
    run_and_check(gpu, fmt, path, rng, m, 257, k_strided, with_bias=True, accumulate=True, ldx_pad=3, ldy_pad=5)
    # n = 96, contiguous and 16-byte aligned x (vector loads), no bias, y overwritten.
    run_and_check(gpu, fmt, path, rng, m, 96, k_plain, with_bias=False, accumulate=False)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_small_and_ragged_shapes(gpu, rng, fmt: str, path: str) -> None:
    # Fewer rows than a GEMV block owns; one block of k; plain formats at k that is not a multiple of
    # 8 or 4 (runs that cross the end of the row, rows not 16-byte aligned).
    block = GGML_QUANT_SIZES[GGMLQuantizationType[fmt.upper()]][0] if fmt in QUANTIZED else 1
    shapes = [(5, 2, max(block, 8)), (3, 9, max(block, 16))]
    if fmt in PLAIN:
        shapes += [(33, 5, 37), (50, 20, 100), (7, 3, 1), (9, 70, 13)]
    for n, m, k in shapes:
        run_and_check(gpu, fmt, path, rng, m, n, k, with_bias=True, accumulate=True, ldx_pad=1, ldy_pad=2)


@pytest.mark.parametrize("fmt", ["q4_0", "q4_k", "q6_k", "f16"])
def test_auto_picks_gemv_up_to_8_rows_and_gemm_beyond(gpu, rng, fmt: str) -> None:
    n, k = 70, 512
    raw, _ = random_weights(fmt, n, k, rng)
    for m, path in ((8, "gemv"), (9, "gemm")):
        x = rng.standard_normal((m, k)).astype(np.float32)
        np.testing.assert_array_equal(gpu.matmul(fmt, raw, n, k, x), gpu.matmul(fmt, raw, n, k, x, path=path))


@pytest.mark.parametrize("fmt", FORMATS)
def test_gather_rows_is_exact(gpu, rng, fmt: str) -> None:
    # Random code bytes (every bit pattern), repeated ids and both ends of the table.
    for n, k in ((40, 512), (7, 2304)):
        raw, w = random_weights(fmt, n, k, rng, any_bits=True)
        ids = np.concatenate([[0, n - 1], rng.integers(0, n, 9), [3, 3]]).astype(np.int32)
        got = gpu.gather_rows(fmt, raw, n, k, ids)
        np.testing.assert_array_equal(got, w[ids].astype(np.float32))


@pytest.mark.parametrize("fmt", PLAIN)
def test_gather_rows_ragged_plain(gpu, rng, fmt: str) -> None:
    n, k = 11, 37
    raw, w = random_weights(fmt, n, k, rng)
    ids = np.array([10, 0, 5, 5, 1], np.int32)
    np.testing.assert_array_equal(gpu.gather_rows(fmt, raw, n, k, ids), w[ids].astype(np.float32))


def test_gather_rows_out_of_range_id_is_a_nan_row(gpu, rng) -> None:
    n, k = 6, 256
    raw, w = random_weights("q4_k", n, k, rng)
    got = gpu.gather_rows("q4_k", raw, n, k, np.array([2, 6, -1, 5], np.int32))
    assert np.isnan(got[1]).all() and np.isnan(got[2]).all()
    np.testing.assert_array_equal(got[[0, 3]], w[[2, 5]].astype(np.float32))


def test_every_format_is_supported(gpu) -> None:
    assert all(gpu.supports(f) for f in FORMATS)
    with pytest.raises(ValueError, match="unsupported tensor format 'q7_0'"):
        gpu.supports("q7_0")


def test_zero_sizes(gpu, rng) -> None:
    raw, _ = random_weights("q4_0", 4, 64, rng)
    assert gpu.matmul("q4_0", raw, 4, 64, np.zeros((0, 64), np.float32)).shape == (0, 4)
    assert gpu.matmul("q4_0", b"", 0, 64, rng.standard_normal((3, 64)).astype(np.float32)).shape == (3, 0)
    assert gpu.gather_rows("q4_0", raw, 4, 64, np.zeros(0, np.int32)).shape == (0, 64)
    # k = 0: the product is empty, y = bias (+ y)
    bias = rng.standard_normal(5).astype(np.float32)
    y0 = rng.standard_normal((2, 5)).astype(np.float32)
    for path in PATHS:
        got = gpu.matmul("f32", b"", 5, 0, np.zeros((2, 0), np.float32), bias=bias, y=y0, path=path)
        np.testing.assert_allclose(got, y0 + bias, rtol=1e-6)


def test_bad_arguments_are_clear_errors(gpu, rng) -> None:
    raw, _ = random_weights("q4_k", 4, 256, rng)
    x = rng.standard_normal((2, 256)).astype(np.float32)
    with pytest.raises(ValueError, match="wrong number of bytes"):
        gpu.matmul("q4_k", raw[:, :-1], 4, 256, x)
    with pytest.raises(ValueError, match="multiple of 256"):
        gpu.matmul("q4_k", raw, 8, 128, x)
    with pytest.raises(ValueError, match="path must be"):
        gpu.matmul("q4_k", raw, 4, 256, x, path="fast")
    with pytest.raises(ValueError, match="bias"):
        gpu.matmul("q4_k", raw, 4, 256, x, bias=np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="columns"):
        gpu.matmul("q4_k", raw, 4, 256, x[:, :128])
