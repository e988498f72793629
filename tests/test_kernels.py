"""CPU kernels against float64 numpy references, on fresh random inputs, for every ISA this CPU has."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from pyserve import _C
from pyserve.model.quantize import bf16_bits
from pyserve.model.tensor import TensorRecord

ISAS = ["scalar"] + [isa for isa in ("avx2", "avx512") if _C.cpu_features()[isa]]


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> np.random.Generator:
    """Fresh inputs per test case, the same on every run: seeded from the test's id (crc32, not
    hash(), which changes with PYTHONHASHSEED)."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


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


# --- paged attention ----------------------------------------------------------------------------
#
# What the kernels do (csrc/backend/cpu/kernels_simd.inc, kernels_scalar.cpp, cpu_backend.cpp), and
# what the cases below are chosen to reach:
# - K is stored transposed inside a page ([kv_heads][head_dim][page_size]), so q·K runs as vector
#   FMAs across a page's slots, a chunk of W slots at a time (W = 8 on AVX2, 16 on AVX-512) -- when
#   page_size is a multiple of W. Other page sizes take plain loops. Page sizes 1, 3, 15, 17, 33 are
#   off every vector width; 8 is on it for AVX2 only; 16 and 32 for both.
# - Within a vector chunk, only the slots in [lo, hi] are kept: a sequence's partly filled last
#   page (ragged length) and a window that starts mid-page cut a chunk at either end.
# - Queries are scored in register tiles (6 on AVX2, 12 on AVX-512) with a remainder tile; the
#   `n_tokens * group` queries of one call decide how many.
# - Consecutive tokens of one sequence (same page table, consecutive positions) form a block of up
#   to min(8, 128 / group) tokens sharing every K/V load; a decode token is a block of one. Blocks
#   of 1, 2, 5 and 11 (= 8 + 3) tokens below. Their queries share a score range: each one's own
#   range must come out of it (causal within the block; per-token window starts).
# - out += p·V runs vectorised when head_dim is a multiple of W and at most 8 W (AVX2: 8..64,
#   AVX-512: 16..128), in tiles of 16 / (head_dim / W) queries; else plain loops (head_dim 20 on
#   both; 24 on AVX-512; 128 on AVX2).
# - GQA: `group` query heads share a KV head (1, 2, 3, 5 and 8 below).

PAGE_SIZES = [1, 3, 8, 15, 16, 17, 32, 33]
HEAD_CONFIGS = [  # (head_dim, heads, kv_heads)
    (16, 4, 4),
    (24, 6, 2),
    (64, 8, 1),
    (128, 4, 2),
    (20, 6, 3),
    (32, 10, 2),
]
WINDOWS = {"none": lambda ps: 0, "1": lambda ps: 1, "6": lambda ps: 6, "2pages+3": lambda ps: 2 * ps + 3}


def attention_reference(q, k_cache, v_cache, page_size, tables, positions, window, sink=0):
    """float64 attention over the caller's [slots, kv_heads, head_dim] cache, token by token: a
    token at pos attends to its window and, with a sink, to positions [0, sink) too."""
    t, h, d = q.shape
    group = h // k_cache.shape[1]
    out = np.zeros((t, h, d))
    for i in range(t):
        pos = positions[i]
        lo = max(0, pos - window + 1) if window else 0
        p = np.arange(lo, pos + 1)
        if window and sink:
            p = np.union1d(np.arange(min(sink, pos + 1)), p)
        slots = tables[i][p // page_size].astype(np.int64) * page_size + p % page_size
        keys = np.repeat(k_cache[slots].astype(np.float64), group, axis=1)  # [n, h, d]
        vals = np.repeat(v_cache[slots].astype(np.float64), group, axis=1)
        s = np.einsum("nhd,hd->hn", keys, q[i].astype(np.float64)) / np.sqrt(d)
        w = np.exp(s - s.max(axis=1, keepdims=True))
        out[i] = np.einsum("hn,nhd->hd", w / w.sum(axis=1, keepdims=True), vals)
    return out


def attention_batch(page_size: int, rng: np.random.Generator):
    """One call's worth of tokens from six sequences, as the engine batches a prefill chunk with
    decode tokens: (page tables per token, positions, pages in the pool). Each sequence owns
    scattered pages of a shared pool; spare pages hold data no token may read."""
    ps = page_size
    long_len = max(3 * ps + ps // 2 + 1, 13)  # ragged: its last page is partly filled
    seqs = [  # (sequence length, the positions its tokens in this batch query)
        (2 * ps, [2 * ps - 1]),  # decode at the last slot of a full page
        (long_len, list(range(long_len - 11, long_len))),  # a prefill chunk of 11: blocks of 8 + 3
        (ps + 1, [ps]),  # decode at the first slot of a new page
        (max(ps, 5), [0, 1, 2, 3, 4]),  # the start of a prompt: a block of 5 from position 0
        (1, [0]),  # a one-token prompt
        (long_len, [long_len - 2, long_len - 1]),  # a block of 2 at the ragged end
    ]
    need = [-(-length // ps) for length, _ in seqs]
    num_pages = sum(need) + 3
    pool = rng.permutation(num_pages).astype(np.int32)
    tables, positions, first = [], [], 0
    for (length, pos), n in zip(seqs, need):
        table = pool[first : first + n]  # one array per sequence: its tokens share the pointer
        first += n
        assert max(pos) < length
        tables += [table] * len(pos)
        positions += pos
    return tables, positions, num_pages


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("page_size", PAGE_SIZES)
@pytest.mark.parametrize("window", list(WINDOWS), ids=lambda w: f"window={w}")
def test_paged_attention_matches_float64(isa, page_size, window, rng) -> None:
    tables, positions, num_pages = attention_batch(page_size, rng)
    win = WINDOWS[window](page_size)
    for head_dim, heads, kv_heads in HEAD_CONFIGS:
        slots = num_pages * page_size
        # Every slot holds random data, used or not: a read outside a token's range shows.
        k_cache = rng.standard_normal((slots, kv_heads, head_dim)).astype(np.float32)
        v_cache = rng.standard_normal((slots, kv_heads, head_dim)).astype(np.float32)
        q = rng.standard_normal((len(positions), heads, head_dim)).astype(np.float32)
        out = _C.kernels.attention(q, k_cache, v_cache, page_size, tables, positions, win, isa=isa, threads=2)
        ref = attention_reference(q, k_cache, v_cache, page_size, tables, positions, win)
        np.testing.assert_allclose(
            out, ref, rtol=0, atol=2e-5 * np.abs(ref).max(), err_msg=f"head_dim={head_dim} heads={heads} kv_heads={kv_heads}"
        )


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("page_size", PAGE_SIZES)
@pytest.mark.parametrize("window,sink", [(1, 1), (6, 4), (4, 7), (5, 21), (12, 3)], ids=lambda v: str(v))
def test_attention_sink_matches_float64(isa, page_size, window, sink, rng) -> None:
    """StreamingLLM: a token attends to the first `sink` positions and to its window. Windows
    shorter and longer than the sink, sinks inside one page and across several, tokens before,
    at and after the sink's end, prefill blocks that straddle it."""
    tables, positions, num_pages = attention_batch(page_size, rng)
    for head_dim, heads, kv_heads in HEAD_CONFIGS:
        slots = num_pages * page_size
        k_cache = rng.standard_normal((slots, kv_heads, head_dim)).astype(np.float32)
        v_cache = rng.standard_normal((slots, kv_heads, head_dim)).astype(np.float32)
        q = 2 * rng.standard_normal((len(positions), heads, head_dim)).astype(np.float32)
        out = _C.kernels.attention(q, k_cache, v_cache, page_size, tables, positions, window, sink=sink, isa=isa, threads=2)
        ref = attention_reference(q, k_cache, v_cache, page_size, tables, positions, window, sink)
        np.testing.assert_allclose(
            out, ref, rtol=0, atol=2e-5 * np.abs(ref).max(), err_msg=f"head_dim={head_dim} heads={heads} kv_heads={kv_heads}"
        )
        # The sink really counts: without it the answer differs wherever the window has moved on.
        plain = attention_reference(q, k_cache, v_cache, page_size, tables, positions, window)
        moved = [i for i, p in enumerate(positions) if p - window + 1 > 0]
        assert np.abs(plain[moved] - ref[moved]).max() > 1e-2


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("window", [0, 200], ids=lambda w: f"window={w}")
def test_split_decode_attention_matches_float64(isa, window, rng) -> None:
    """A decode batch too small to keep the threads busy (two sequences, long contexts) is split
    over positions (flash-decoding) and merged: the same answer as one pass."""
    page_size, head_dim, heads, kv_heads = 16, 64, 9, 3
    lengths = [777, 150]  # the short one has fewer positions than segments of the long one
    need = [-(-n // page_size) for n in lengths]
    pool = rng.permutation(sum(need) + 2).astype(np.int32)
    tables = [pool[: need[0]], pool[need[0] : need[0] + need[1]]]
    positions = [n - 1 for n in lengths]
    slots = len(pool) * page_size
    k_cache = rng.standard_normal((slots, kv_heads, head_dim)).astype(np.float32)
    v_cache = rng.standard_normal((slots, kv_heads, head_dim)).astype(np.float32)
    q = 3 * rng.standard_normal((2, heads, head_dim)).astype(np.float32)  # peaked softmaxes too
    ref = attention_reference(q, k_cache, v_cache, page_size, tables, positions, window)
    for threads in (1, 2):
        out = _C.kernels.attention(q, k_cache, v_cache, page_size, tables, positions, window, isa=isa, threads=threads)
        np.testing.assert_allclose(out, ref, rtol=0, atol=2e-5 * np.abs(ref).max(), err_msg=f"threads={threads}")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", ["f16", "bf16"])
@pytest.mark.parametrize("m", [1, 3, 7, 13])
def test_16bit_weights_match_float64(isa, dtype, m, rng) -> None:
    """f16 / bf16 checkpoints keep their dtype in the float panels (half the bytes of float32) and
    are widened in registers: the result is the float32 path's on the same (rounded) weights."""
    n, k = 101, 80  # n across a partial group and a partial panel
    w32 = rng.standard_normal((n, k)).astype(np.float32)
    if dtype == "f16":
        raw = w32.astype(np.float16)
        w = raw.astype(np.float64)
    else:
        raw = bf16_bits(w32)
        w = TensorRecord("bf16", raw, raw.shape).to_float32().astype(np.float64)
    x = rng.standard_normal((m, k)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    y0 = rng.standard_normal((m, n)).astype(np.float32)
    got = _C.kernels.qgemm(dtype, raw, n, k, x, bias=bias, y=y0, isa=isa, threads=2)
    ref = x.astype(np.float64) @ w.T + bias + y0
    scale = np.abs(x.astype(np.float64)) @ np.abs(w.T) + np.abs(bias) + np.abs(y0)
    assert np.max(np.abs(got - ref) / scale) < 1e-6
    # The same weights packed as float32 give the same answer (same kernel, widened loads).
    same = _C.kernels.qgemm("f32", w.astype(np.float32), n, k, x, bias=bias, y=y0, isa=isa, threads=2)
    np.testing.assert_array_equal(got, same)
    # The embedding gather reads them back exactly.
    ids = [0, 50, 100, 17]
    np.testing.assert_array_equal(_C.kernels.qgather(dtype, raw, n, k, ids, isa=isa), w[ids].astype(np.float32))


@pytest.mark.parametrize("isa", ISAS)
def test_silu_mul_matches_float64(isa, rng) -> None:
    """SwiGLU's activation, SIMD exp included, over the whole float range a gate can take (far
    tails saturate to 0 and to the identity), with rows of a width that leaves a scalar tail."""
    m, inter = 5, 77
    gate = rng.standard_normal((m, inter)).astype(np.float32) * 6
    gate[0, :8] = [-200, -100, -88.5, -87, 0, 87, 88.5, 200]
    up = rng.standard_normal((m, inter)).astype(np.float32)
    out = _C.kernels.silu_mul(np.concatenate([gate, up], axis=1), isa=isa, threads=2)
    g = gate.astype(np.float64)
    ref = g / (1 + np.exp(-g)) * up
    np.testing.assert_allclose(out, ref, rtol=4e-6, atol=1e-30)


def test_attention_reference_is_not_trivial() -> None:
    """The inputs really vary by position: a kernel that read the wrong slot would be caught."""
    rng = np.random.default_rng(0)
    tables, positions, num_pages = attention_batch(8, rng)
    k = rng.standard_normal((num_pages * 8, 1, 16)).astype(np.float32)
    v = rng.standard_normal((num_pages * 8, 1, 16)).astype(np.float32)
    q = rng.standard_normal((len(positions), 2, 16)).astype(np.float32)
    ref = attention_reference(q, k, v, 8, tables, positions, 0)
    shifted = attention_reference(q, k, v, 8, tables, [p - 1 if p else 1 for p in positions], 0)
    assert np.abs(ref - shifted).max(axis=(1, 2)).min() > 1e-3


def test_unknown_isa_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown ISA"):
        _C.kernels.gemm(np.ones((2, 2), np.float32), np.ones((1, 2), np.float32), isa="sse9")
