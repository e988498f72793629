"""CPU kernels against float64 numpy references, on fresh random inputs, for every ISA this CPU has."""

from __future__ import annotations

import numpy as np
import pytest

from pyserve import _C

ISAS = ["scalar"] + [isa for isa in ("avx2", "avx512") if _C.cpu_features()[isa]]


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(
    "m,n,k",
    [(1, 1, 1), (1, 100, 37), (7, 48, 64), (6, 96, 576), (13, 200, 129), (3, 17, 1536), (40, 250, 64)],
)
def test_gemm_matches_float64(isa: str, m: int, n: int, k: int, rng: np.random.Generator) -> None:
    w = rng.standard_normal((n, k)).astype(np.float32)
    x = rng.standard_normal((m, k)).astype(np.float32)
    ref = x.astype(np.float64) @ w.T.astype(np.float64)
    y = _C.kernels.gemm(w, x, isa=isa, threads=2)
    assert y.shape == (m, n)
    tol = 2e-6 * np.sqrt(k) * np.abs(ref).max()
    np.testing.assert_allclose(y, ref, rtol=0, atol=tol)


@pytest.mark.parametrize("isa", ISAS)
def test_gemm_bias_and_accumulate(isa: str, rng: np.random.Generator) -> None:
    m, n, k = 5, 61, 80
    w = rng.standard_normal((n, k)).astype(np.float32)
    x = rng.standard_normal((m, k)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    y0 = rng.standard_normal((m, n)).astype(np.float32)
    ref = x.astype(np.float64) @ w.T.astype(np.float64) + b + y0
    y = _C.kernels.gemm(w, x, bias=b, y=y0, isa=isa, threads=1)
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-4 * np.abs(ref).max())


def attention_reference(q, k_cache, v_cache, page_size, tables, positions, window):
    t, h, d = q.shape
    kvh = k_cache.shape[1]
    out = np.zeros((t, h, d))
    for i in range(t):
        pos = positions[i]
        lo = max(0, pos - window + 1) if window else 0
        slots = [tables[i][p // page_size] * page_size + p % page_size for p in range(lo, pos + 1)]
        for head in range(h):
            g = head // (h // kvh)
            keys = k_cache[slots, g].astype(np.float64)
            vals = v_cache[slots, g].astype(np.float64)
            s = keys @ q[i, head].astype(np.float64) / np.sqrt(d)
            p = np.exp(s - s.max())
            out[i, head] = (p / p.sum()) @ vals
    return out


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("head_dim,heads,kv_heads,window", [(64, 9, 3, 0), (16, 4, 2, 0), (20, 4, 4, 5), (128, 2, 1, 0)])
def test_paged_attention_matches_float64(isa, head_dim, heads, kv_heads, window, rng) -> None:
    page_size, num_pages = 4, 12
    k_cache = rng.standard_normal((num_pages * page_size, kv_heads, head_dim)).astype(np.float32)
    v_cache = rng.standard_normal((num_pages * page_size, kv_heads, head_dim)).astype(np.float32)
    # Two sequences with scattered, non-identity page tables.
    pages = rng.permutation(num_pages).astype(np.int32)
    tables = [pages[:6], pages[6:]]
    positions = [0, 5, 23, 1, 17]
    per_token = [tables[0], tables[0], tables[0], tables[1], tables[1]]
    q = rng.standard_normal((len(positions), heads, head_dim)).astype(np.float32)
    out = _C.kernels.attention(q, k_cache, v_cache, page_size, per_token, positions, window, isa=isa, threads=2)
    ref = attention_reference(q, k_cache, v_cache, page_size, per_token, positions, window)
    np.testing.assert_allclose(out, ref, rtol=0, atol=2e-5 * np.abs(ref).max())


def test_unknown_isa_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown ISA"):
        _C.kernels.gemm(np.ones((2, 2), np.float32), np.ones((1, 2), np.float32), isa="sse9")
