"""The element-wise device kernels (csrc/backend/cuda/norm.cu, rope_kv.cu, activation.cu, kv_copy.cu,
copy_bandwidth.cu) against float64 numpy references, through the `pyserve._C.gpu` probes.

Shapes are chosen to reach each kernel's paths: widths that are multiples of 4 take float4 loads,
others (and row strides that are not) the scalar loop; widths above 1024 vectors make a row's
threads loop; odd head counts and sizes leave warps partly idle. KV caches are
[num_pages, n_kv_heads, page_size, head_dim]; slots cross page boundaries.
"""
from __future__ import annotations

import numpy as np
import pytest

F32_EPS = 2.0**-24  # float32 unit roundoff

# --- references -------------------------------------------------------------------------------------


def rmsnorm_ref(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """The CPU backend's formula: y = w * (x / sqrt(mean(x^2) + eps)), in float64."""
    x = x.astype(np.float64)
    inv = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return w.astype(np.float64) * (x * inv)


def inv_freq_for(head_dim: int, theta: float = 10000.0) -> np.ndarray:
    """inv_freq[d] = 1 / theta^(2d / head_dim), stored as float32 as the model stores it."""
    return (1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)).astype(np.float32)


def rope_tables(positions: np.ndarray, inv_freq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin: [m, half] as the kernel builds them: the angle is a float32 product (numpy's
    float32 multiply rounds the same way), cos/sin of it in double, rounded to float32."""
    angle = positions.astype(np.float32)[:, None] * inv_freq[None, :]
    assert angle.dtype == np.float32
    angle = angle.astype(np.float64)
    return np.cos(angle).astype(np.float32).astype(np.float64), np.sin(angle).astype(np.float32).astype(np.float64)


def rope_ref(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate-half RoPE of x: [m, heads, head_dim] in float64; cos, sin: [m, half]."""
    half = x.shape[-1] // 2
    x = x.astype(np.float64)
    x0, x1 = x[..., :half], x[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    return np.concatenate([x0 * c - x1 * s, x1 * c + x0 * s], axis=-1)


def store_ref(cache: np.ndarray, slots: np.ndarray, values: np.ndarray) -> np.ndarray:
    """cache: [num_pages, n_kv_heads, page_size, head_dim] with token i's [n_kv_heads, head_dim]
    written at slots[i] (negative: skipped), rounded to the cache's dtype."""
    out = cache.copy()
    page_size = cache.shape[2]
    for i, slot in enumerate(slots):
        if slot >= 0:
            out[slot // page_size, :, slot % page_size, :] = values[i].astype(cache.dtype)
    return out


def positions_for(m: int, rng: np.random.Generator) -> np.ndarray:
    """Positions from 0 to long contexts: the float32 angle at 30000+ is where a double-angle or
    wrong-precision implementation shows."""
    fixed = np.array([0, 1, 30000, 32767, 131071, 16383], dtype=np.int32)
    pos = rng.integers(0, 131072, size=m).astype(np.int32)
    pos[: min(m, len(fixed))] = fixed[: min(m, len(fixed))]
    return pos


def slots_for(m: int, num_pages: int, page_size: int, rng: np.random.Generator) -> np.ndarray:
    """m distinct slots: a run that crosses a page boundary, then random ones."""
    total = num_pages * page_size
    assert m <= total
    start = page_size - 2 if total > page_size + m else 0
    run = np.arange(start, start + min(m, 4)) % total
    rest = rng.permutation(np.setdiff1d(np.arange(total), run))[: m - len(run)]
    return np.concatenate([run, rest]).astype(np.int64)


def random_cache(shape: tuple[int, ...], dtype: np.dtype, rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal(shape).astype(dtype)


def assert_same_bits(a: np.ndarray, b: np.ndarray) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))


# --- rmsnorm family -----------------------------------------------------------------------------------
#
# Tolerance: the kernel sums squares in float32 (per-thread partial sums, then a tree), whose
# relative error is at most ~(terms per thread + log2(threads)) * 2^-24 < 2e-6 for the widths here;
# 1/sqrt and the two products add a few ulp. rtol 1e-5 leaves a 5x margin and still fails any
# wrong index, weight or eps placement (those are O(1) or O(eps / mean(x^2)) errors).
NORM_RTOL, NORM_ATOL = 1e-5, 1e-7

NORM_SHAPES = [(1, 1), (3, 3), (7, 33), (5, 576), (2, 1000), (4, 4096), (3, 4097), (2, 8192), (64, 960)]


@pytest.mark.parametrize("m,dim", NORM_SHAPES)
@pytest.mark.parametrize("pad", [0, 1, 4])
def test_rmsnorm(gpu, rng, m: int, dim: int, pad: int) -> None:
    x = rng.standard_normal((m, dim + pad)).astype(np.float32)
    w = (1.0 + 0.1 * rng.standard_normal(dim)).astype(np.float32)
    y = gpu.rmsnorm(x, w, 1e-6)
    assert y.shape == (m, dim)
    np.testing.assert_allclose(y, rmsnorm_ref(x[:, :dim], w, 1e-6), rtol=NORM_RTOL, atol=NORM_ATOL)


def test_rmsnorm_eps_inside_the_root(gpu, rng) -> None:
    """Rows so small that eps dominates mean(x^2): eps added anywhere else (outside the root, to
    the sum instead of the mean) changes the result by far more than the tolerance."""
    m, dim, eps = 4, 256, 1e-5
    x = (1e-3 * rng.standard_normal((m, dim))).astype(np.float32)
    w = (1.0 + 0.1 * rng.standard_normal(dim)).astype(np.float32)
    np.testing.assert_allclose(gpu.rmsnorm(x, w, eps), rmsnorm_ref(x, w, eps), rtol=NORM_RTOL, atol=NORM_ATOL)


@pytest.mark.parametrize("m,dim", [(1, 5), (6, 576), (3, 2048), (2, 4097)])
@pytest.mark.parametrize("pad", [0, 3, 8])
def test_rmsnorm_into_a_strided_y(gpu, rng, m: int, dim: int, pad: int) -> None:
    x = rng.standard_normal((m, dim)).astype(np.float32)
    w = rng.standard_normal(dim).astype(np.float32)
    y0 = rng.standard_normal((m, dim + pad)).astype(np.float32)
    y = gpu.rmsnorm(x, w, 1e-6, y=y0)
    np.testing.assert_allclose(y[:, :dim], rmsnorm_ref(x, w, 1e-6), rtol=NORM_RTOL, atol=NORM_ATOL)
    np.testing.assert_array_equal(y[:, dim:], y0[:, dim:])  # the row's padding is not ours


@pytest.mark.parametrize("m,dim", [(1, 7), (5, 576), (3, 1152), (2, 4097), (2, 8192)])
@pytest.mark.parametrize("pad", [0, 4])
def test_rmsnorm_add(gpu, rng, m: int, dim: int, pad: int) -> None:
    x = rng.standard_normal((m, dim + pad)).astype(np.float32)
    w = rng.standard_normal(dim).astype(np.float32)
    y0 = rng.standard_normal((m, dim + pad)).astype(np.float32)
    y = gpu.rmsnorm_add(x, w, 1e-6, y0)
    normed = rmsnorm_ref(x[:, :dim], w, 1e-6)
    ref = y0[:, :dim].astype(np.float64) + normed
    # Each term's error is relative to that term (the sum may cancel), plus the add's rounding.
    tol = NORM_RTOL * (np.abs(y0[:, :dim]) + np.abs(normed)) + NORM_ATOL
    assert np.all(np.abs(y[:, :dim] - ref) <= tol), np.max(np.abs(y[:, :dim] - ref) - tol)
    np.testing.assert_array_equal(y[:, dim:], y0[:, dim:])


@pytest.mark.parametrize("m,dim", [(1, 3), (4, 576), (3, 2049), (2, 4096), (17, 8192)])
@pytest.mark.parametrize("pad", [0, 1, 4])
def test_add_rmsnorm(gpu, rng, m: int, dim: int, pad: int) -> None:
    h0 = rng.standard_normal((m, dim + pad)).astype(np.float32)
    delta = rng.standard_normal((m, dim + 2 * pad)).astype(np.float32)
    w = rng.standard_normal(dim).astype(np.float32)
    h, y = gpu.add_rmsnorm(h0, delta, w, 1e-6)
    # The residual is one float32 add, correctly rounded on both sides: bit-exact.
    h_ref = h0[:, :dim] + delta[:, :dim]
    np.testing.assert_array_equal(h[:, :dim], h_ref)
    np.testing.assert_array_equal(h[:, dim:], h0[:, dim:])
    np.testing.assert_allclose(y, rmsnorm_ref(h_ref, w, 1e-6), rtol=NORM_RTOL, atol=NORM_ATOL)


@pytest.mark.parametrize("m,n_heads,head_dim", [(1, 1, 64), (3, 14, 64), (5, 8, 128), (2, 3, 256), (7, 5, 50),
                                                (1, 32, 128), (33, 2, 96)])
@pytest.mark.parametrize("pad", [0, 2, 4])
def test_rmsnorm_heads(gpu, rng, m: int, n_heads: int, head_dim: int, pad: int) -> None:
    x0 = rng.standard_normal((m, n_heads * head_dim + pad)).astype(np.float32)
    w = (1.0 + 0.1 * rng.standard_normal(head_dim)).astype(np.float32)
    x = gpu.rmsnorm_heads(x0, n_heads, head_dim, w, 1e-6)
    heads = x0[:, : n_heads * head_dim].reshape(m, n_heads, head_dim)
    ref = rmsnorm_ref(heads, w, 1e-6).reshape(m, n_heads * head_dim)
    np.testing.assert_allclose(x[:, : n_heads * head_dim], ref, rtol=NORM_RTOL, atol=NORM_ATOL)
    np.testing.assert_array_equal(x[:, n_heads * head_dim :], x0[:, n_heads * head_dim :])


# --- RoPE and the KV write -------------------------------------------------------------------------
#
# Tolerance: with the same float32 cos/sin as the kernel (rope_tables), each rotated value is two
# float32 products and a sum (maybe one FMA): a few ulp of |x| <= ~5, i.e. < 2e-6. The double cos
# may round to the neighbouring float32 in rare ties: 6e-8 * |x|. An angle computed in double, or a
# cos/sin in float32 at position 30000 (float32 spacing there is 2e-3 rad), is off by ~1e-3.
ROPE_ATOL = 4e-6


@pytest.mark.parametrize("m,n_heads,head_dim", [(1, 1, 64), (6, 9, 64), (5, 32, 128), (3, 4, 256), (19, 3, 6)])
@pytest.mark.parametrize("pad", [0, 5])
def test_rope(gpu, rng, m: int, n_heads: int, head_dim: int, pad: int) -> None:
    x0 = rng.standard_normal((m, n_heads * head_dim + pad)).astype(np.float32)
    positions = positions_for(m, rng)
    inv_freq = inv_freq_for(head_dim)
    x = gpu.rope(x0, n_heads, head_dim, positions, inv_freq)
    cos, sin = rope_tables(positions, inv_freq)
    ref = rope_ref(x0[:, : n_heads * head_dim].reshape(m, n_heads, head_dim), cos, sin)
    np.testing.assert_allclose(x[:, : n_heads * head_dim].reshape(m, n_heads, head_dim), ref, rtol=0,
                               atol=ROPE_ATOL)
    np.testing.assert_array_equal(x[:, n_heads * head_dim :], x0[:, n_heads * head_dim :])


@pytest.mark.parametrize("m, n_heads, head_dim, pad", [(1, 1, 64, 0), (7, 9, 128, 3), (33, 4, 256, 0)])
def test_rope_from_tables(gpu, rng, m: int, n_heads: int, head_dim: int, pad: int) -> None:
    """rope_table.cu: the rotation from the step's cos/sin tables (what the engine's layers run)."""
    x0 = rng.standard_normal((m, n_heads * head_dim + pad)).astype(np.float32)
    cos, sin = rope_tables(positions_for(m, rng), inv_freq_for(head_dim))
    cos32, sin32 = cos.astype(np.float32), sin.astype(np.float32)
    x = gpu.rope_table(x0, n_heads, head_dim, cos32, sin32)
    ref = rope_ref(x0[:, : n_heads * head_dim].reshape(m, n_heads, head_dim), cos32.astype(np.float64),
                   sin32.astype(np.float64))
    np.testing.assert_allclose(x[:, : n_heads * head_dim].reshape(m, n_heads, head_dim), ref, rtol=0, atol=ROPE_ATOL)
    np.testing.assert_array_equal(x[:, n_heads * head_dim :], x0[:, n_heads * head_dim :])


def test_rope_float32_angle_is_what_counts(gpu, rng) -> None:
    """At position 30000 the float32 angle differs from the exact one by up to ~1e-3 rad: the
    kernel must follow the float32 product (the CPU path and HF do), not the exact angle."""
    head_dim, m = 128, 4
    positions = np.array([30000, 30001, 65535, 100003], dtype=np.int32)
    inv_freq = inv_freq_for(head_dim)
    x0 = rng.standard_normal((m, head_dim)).astype(np.float32)
    x = gpu.rope(x0, 1, head_dim, positions, inv_freq)
    cos, sin = rope_tables(positions, inv_freq)
    ref = rope_ref(x0.reshape(m, 1, head_dim), cos, sin).reshape(m, head_dim)
    exact = positions.astype(np.float64)[:, None] * inv_freq.astype(np.float64)[None, :]
    ref_exact = rope_ref(x0.reshape(m, 1, head_dim), np.cos(exact), np.sin(exact)).reshape(m, head_dim)
    assert np.abs(ref - ref_exact).max() > 10 * ROPE_ATOL  # the test can tell the two apart
    np.testing.assert_allclose(x, ref, rtol=0, atol=ROPE_ATOL)


# (m, n_heads, n_kv_heads, head_dim, page_size, num_pages)
KV_CASES = [
    (1, 1, 1, 64, 16, 2),
    (5, 8, 2, 64, 16, 3),
    (9, 32, 8, 128, 16, 4),
    (3, 4, 4, 256, 8, 2),
    (17, 6, 3, 64, 5, 7),
    (40, 0, 2, 128, 32, 3),
]


@pytest.mark.parametrize("m,n_heads,n_kv,head_dim,page_size,num_pages", KV_CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_rope_write_kv(gpu, rng, m, n_heads, n_kv, head_dim, page_size, num_pages, dtype) -> None:
    q_dim, kv_dim = n_heads * head_dim, n_kv * head_dim
    width = q_dim + 2 * kv_dim
    qkv0 = rng.standard_normal((m, width + 3)).astype(np.float32)
    positions = positions_for(m, rng)
    inv_freq = inv_freq_for(head_dim)
    slots = slots_for(m, num_pages, page_size, rng)
    shape = (num_pages, n_kv, page_size, head_dim)
    k_cache0, v_cache0 = random_cache(shape, dtype, rng), random_cache(shape, dtype, rng)

    qkv, k_cache, v_cache = gpu.rope_write_kv(qkv0, n_heads, positions, inv_freq, slots, k_cache0, v_cache0)
    assert k_cache.dtype == dtype and v_cache.dtype == dtype

    cos, sin = rope_tables(positions, inv_freq)
    q_ref = rope_ref(qkv0[:, :q_dim].reshape(m, n_heads, head_dim), cos, sin)
    k_ref = rope_ref(qkv0[:, q_dim : q_dim + kv_dim].reshape(m, n_kv, head_dim), cos, sin)
    q_out = qkv[:, :q_dim].reshape(m, n_heads, head_dim)
    k_out = qkv[:, q_dim : q_dim + kv_dim].reshape(m, n_kv, head_dim)
    np.testing.assert_allclose(q_out, q_ref, rtol=0, atol=ROPE_ATOL)
    np.testing.assert_allclose(k_out, k_ref, rtol=0, atol=ROPE_ATOL)
    np.testing.assert_array_equal(qkv[:, q_dim + kv_dim :], qkv0[:, q_dim + kv_dim :])  # v and padding

    v = qkv0[:, q_dim + kv_dim : width].reshape(m, n_kv, head_dim)
    # V is copied (rounded to float16 by round-to-nearest-even on both sides): bit-exact.
    assert_same_bits(v_cache, store_ref(v_cache0, slots, v))
    # The cached K is the rotated k the kernel wrote back, rounded to the cache's type: bit-exact
    # against k_out; against the float64 reference, within ROPE_ATOL (float32) or one float16 ulp
    # (a float32 intermediate may round the other way at a float16 tie).
    assert_same_bits(k_cache, store_ref(k_cache0, slots, k_out))
    k_expect = store_ref(k_cache0, slots, k_ref)
    if dtype == np.float32:
        np.testing.assert_allclose(k_cache, k_expect, rtol=0, atol=ROPE_ATOL)
    else:
        np.testing.assert_allclose(k_cache.astype(np.float64), k_expect.astype(np.float64), rtol=2.0**-10,
                                   atol=2.0**-24)


@pytest.mark.parametrize("m,n_kv,head_dim,page_size,num_pages", [(1, 1, 64, 16, 1), (7, 2, 64, 4, 3),
                                                                  (20, 8, 128, 16, 2), (6, 3, 256, 3, 5),
                                                                  (11, 5, 10, 7, 3)])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_write_kv(gpu, rng, m, n_kv, head_dim, page_size, num_pages, dtype) -> None:
    ld = n_kv * head_dim + 2
    k = rng.standard_normal((m, ld)).astype(np.float32)
    v = rng.standard_normal((m, ld)).astype(np.float32)
    slots = slots_for(m, num_pages, page_size, rng)
    shape = (num_pages, n_kv, page_size, head_dim)
    k_cache0, v_cache0 = random_cache(shape, dtype, rng), random_cache(shape, dtype, rng)
    k_cache, v_cache = gpu.write_kv(k, v, slots, k_cache0, v_cache0)
    # A store is a copy (float16: one round-to-nearest-even, the same in numpy): bit-exact.
    kv_dim = n_kv * head_dim
    assert_same_bits(k_cache, store_ref(k_cache0, slots, k[:, :kv_dim].reshape(m, n_kv, head_dim)))
    assert_same_bits(v_cache, store_ref(v_cache0, slots, v[:, :kv_dim].reshape(m, n_kv, head_dim)))


def test_write_kv_skips_negative_slots(gpu, rng) -> None:
    m, n_kv, head_dim, page_size, num_pages = 6, 2, 64, 4, 3
    k = rng.standard_normal((m, n_kv * head_dim)).astype(np.float32)
    v = rng.standard_normal((m, n_kv * head_dim)).astype(np.float32)
    slots = np.array([3, -1, 4, 0, -1, 11], dtype=np.int64)
    shape = (num_pages, n_kv, page_size, head_dim)
    k_cache0, v_cache0 = random_cache(shape, np.float32, rng), random_cache(shape, np.float32, rng)
    k_cache, v_cache = gpu.write_kv(k, v, slots, k_cache0, v_cache0)
    assert_same_bits(k_cache, store_ref(k_cache0, slots, k.reshape(m, n_kv, head_dim)))
    assert_same_bits(v_cache, store_ref(v_cache0, slots, v.reshape(m, n_kv, head_dim)))


def test_rope_rejects_odd_head_dim(gpu, rng) -> None:
    x = rng.standard_normal((2, 15)).astype(np.float32)
    with pytest.raises(ValueError, match="even"):
        gpu.rope(x, 1, 15, np.zeros(2, np.int32), np.ones(7, np.float32))


# --- activations ---------------------------------------------------------------------------------------

ACT_SHAPES = [(1, 1), (3, 3), (2, 5), (4, 64), (5, 1536), (2, 8191), (3, 14336), (64, 96)]


@pytest.mark.parametrize("m,inter", ACT_SHAPES)
def test_silu_mul(gpu, rng, m: int, inter: int) -> None:
    gate_up = (3.0 * rng.standard_normal((m, 2 * inter))).astype(np.float32)
    out = gpu.silu_mul(gate_up)
    g, u = gate_up[:, :inter].astype(np.float64), gate_up[:, inter:].astype(np.float64)
    ref = g / (1.0 + np.exp(-g)) * u
    # expf and the division are a few ulp each, with no cancellation: a relative tolerance.
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-30)


@pytest.mark.parametrize("m,inter", ACT_SHAPES)
def test_gelu_tanh_mul(gpu, rng, m: int, inter: int) -> None:
    gate_up = (3.0 * rng.standard_normal((m, 2 * inter))).astype(np.float32)
    out = gpu.gelu_tanh_mul(gate_up)
    g, u = gate_up[:, :inter].astype(np.float64), gate_up[:, inter:].astype(np.float64)
    ref = 0.5 * g * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (g + 0.044715 * g**3))) * u
    # For g << 0, 1 + tanh(...) cancels: its float32 error is a few ulp of 1 (tanhf near -1), i.e.
    # an absolute error ~ 4 * 2^-24 * |g u| / 2 on the output; elsewhere a few ulp relative.
    tol = 1e-5 * np.abs(ref) + 8 * F32_EPS * np.abs(g * u)
    assert np.all(np.abs(out - ref) <= tol), np.max(np.abs(out - ref) - tol)


@pytest.mark.parametrize("n", [1, 3, 4, 17, 1024, 1000003])
@pytest.mark.parametrize("offset", [0, 1, 2, 3])
def test_scale(gpu, rng, n: int, offset: int) -> None:
    x0 = rng.standard_normal(n + offset).astype(np.float32)
    s = np.float32(rng.uniform(0.1, 3.0))
    x = gpu.scale(x0, float(s), offset=offset)
    # One float32 product, correctly rounded on both sides: bit-exact.
    np.testing.assert_array_equal(x[offset:], x0[offset:] * s)
    np.testing.assert_array_equal(x[:offset], x0[:offset])


# --- KV copies ------------------------------------------------------------------------------------------


# (num_layers, num_pages, page_elems, n): page sizes in bytes reach the 16-, 4- and 2-byte word paths.
PAGE_CASES = [(1, 2, 64, 1), (3, 8, 16 * 128, 3), (2, 6, 15, 2), (4, 9, 3 * 66, 4), (32, 4, 16 * 64, 2)]


@pytest.mark.parametrize("num_layers,num_pages,page_elems,n", PAGE_CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_copy_pages(gpu, rng, num_layers, num_pages, page_elems, n, dtype) -> None:
    cache0 = random_cache((num_layers, 2, num_pages, page_elems), dtype, rng)
    pages = rng.permutation(num_pages)
    src, dst = pages[:n].astype(np.int32), pages[n : 2 * n].astype(np.int32)  # disjoint, as forks are
    cache = gpu.copy_pages(cache0, src, dst)
    ref = cache0.copy()
    ref[:, :, dst] = cache0[:, :, src]
    assert_same_bits(cache, ref)


def test_copy_pages_skips_negative_ids(gpu, rng) -> None:
    cache0 = random_cache((2, 2, 5, 48), np.float32, rng)
    src = np.array([0, -1, 2], dtype=np.int32)
    dst = np.array([3, 4, -1], dtype=np.int32)
    ref = cache0.copy()
    ref[:, :, 3] = cache0[:, :, 0]
    assert_same_bits(gpu.copy_pages(cache0, src, dst), ref)


@pytest.mark.parametrize("n_kv,head_dim,page_size,num_pages", [(1, 64, 16, 2), (8, 128, 16, 3), (3, 256, 5, 4),
                                                              (2, 10, 3, 3)])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_copy_kv_slot(gpu, rng, n_kv, head_dim, page_size, num_pages, dtype) -> None:
    shape = (num_pages, n_kv, page_size, head_dim)
    k0, v0 = random_cache(shape, dtype, rng), random_cache(shape, dtype, rng)
    total = num_pages * page_size
    for src, dst in [(total - 1, 0), (page_size - 1, page_size), (int(rng.integers(total)), total - 1)]:
        if src == dst:
            continue
        k, v = gpu.copy_kv_slot(k0, v0, src, dst)
        k_ref, v_ref = k0.copy(), v0.copy()
        k_ref[dst // page_size, :, dst % page_size] = k0[src // page_size, :, src % page_size]
        v_ref[dst // page_size, :, dst % page_size] = v0[src // page_size, :, src % page_size]
        assert_same_bits(k, k_ref)
        assert_same_bits(v, v_ref)


@pytest.mark.parametrize("n", [16, 48, 4096, 16 * 100003])
def test_copy_bytes(gpu, rng, n: int) -> None:
    src = rng.integers(0, 256, size=n, dtype=np.uint8)
    np.testing.assert_array_equal(gpu.copy_bytes(src), src)


def test_copy_bytes_rejects_a_ragged_size(gpu, rng) -> None:
    with pytest.raises(ValueError):
        gpu.copy_bytes(rng.integers(0, 256, size=24, dtype=np.uint8))


def test_bench_copy_returns_a_time(gpu) -> None:
    ms = gpu.bench_copy(1 << 20, 3)
    assert np.isfinite(ms) and ms > 0
