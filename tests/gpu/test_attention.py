"""Paged attention on the device (attention_decode.cu, attention_prefill.cu) against a float64 numpy
reference that reads the same paged cache.

Caches are built with their pages shuffled; every slot no sequence has written (the tail of a last
page, free pages, the page-table padding) holds NaN, so a kernel that reads a key it must not see
returns NaN instead of a close answer. Both kernels are valid for any batch and are checked on the
same batches.

Tolerance: the kernels accumulate in float32 (dot products over head_dim <= 256, online softmax
over up to 5,000 keys, split-K partials merged by their statistics); with q and the cache drawn
from N(0, 1) and scale 1/sqrt(head_dim) the scores are O(1) and the outputs convex combinations
of O(1) values, so float32 rounding stays below ~1e-5. rtol = atol = 1e-4 leaves room for that and
still catches a key dropped or counted twice out of 5,000 (an error ~2e-4 on some element) and
any masking or indexing mistake (errors O(0.1)). f16 caches: the reference reads the same
f16-rounded values, so the tolerance is the same.
"""
from __future__ import annotations

import numpy as np
import pytest

RTOL = 1e-4
ATOL = 1e-4


# --- the paged cache and the reference ------------------------------------------------------------


class PagedCache:
    """K and V: [num_pages, n_kv_heads, page_size, head_dim] float32 with shuffled pages. Sequence s
    owns ceil(seq_lens[s] / page_size) pages; unwritten slots and a poison page (the page-table
    padding) hold NaN. `free_slots` are slots of spare pages, for draft-tree leaves' own K/V."""

    def __init__(self, rng, seq_lens, n_kv_heads, head_dim, page_size, spare_pages=2):
        self.page_size = page_size
        pages = [-(-length // page_size) for length in seq_lens]
        num_pages = sum(pages) + spare_pages + 1
        shape = (num_pages, n_kv_heads, page_size, head_dim)
        self.k = rng.standard_normal(shape).astype(np.float32)
        self.v = rng.standard_normal(shape).astype(np.float32)
        written = np.zeros((num_pages, page_size), dtype=bool)
        order = [int(p) for p in rng.permutation(num_pages)]
        poison = order.pop()
        self.page_table = np.full((len(seq_lens), max(pages) + 1), poison, dtype=np.int32)
        for s, length in enumerate(seq_lens):
            for j in range(pages[s]):
                page = order.pop()
                self.page_table[s, j] = page
                written[page, : min(page_size, length - j * page_size)] = True
        self.free_slots = [p * page_size + o for p in order for o in range(page_size)]
        self.written = written

    def take_slot(self, rng):
        """A spare slot, written with fresh K/V (a draft-tree leaf's own)."""
        slot = self.free_slots.pop(int(rng.integers(len(self.free_slots))))
        page, off = divmod(slot, self.page_size)
        self.written[page, off] = True
        return slot

    def caches(self, kv_type):
        """(k, v) as uploaded: NaN in every unwritten slot; f16 as numpy float16."""
        written = self.written[:, None, :, None]  # broadcast over KV heads and head_dim
        k = np.where(written, self.k, np.float32(np.nan))
        v = np.where(written, self.v, np.float32(np.nan))
        if kv_type == "f16":
            return k.astype(np.float16), v.astype(np.float16)
        return k, v


def reference(q, k, v, page_table, token_seq, positions, n_kv_heads, scale, page_size, window=0, sink=0,
              own_slots=None):
    """float64 attention straight from the definition: token i attends to positions j <= positions[i]
    (j < positions[i] for a tree leaf, plus its own slot), with a window only j > positions[i] -
    window, with a sink (and a window) also j < sink."""
    q = q.astype(np.float64)
    k = k.astype(np.float64)
    v = v.astype(np.float64)
    n_tokens, n_heads, head_dim = q.shape
    kv_of_head = np.arange(n_heads) // (n_heads // n_kv_heads)
    out = np.empty((n_tokens, n_heads, head_dim))
    for i in range(n_tokens):
        pos = int(positions[i])
        leaf = own_slots is not None and own_slots[i] >= 0
        j = np.arange(pos if leaf else pos + 1)
        if window > 0:
            keep = j > pos - window
            if sink > 0:
                keep |= j < sink
            j = j[keep]
        pages = page_table[token_seq[i], j // page_size]
        kj = k[pages, :, j % page_size, :]  # [n, n_kv_heads, head_dim]
        vj = v[pages, :, j % page_size, :]
        if leaf:
            page, off = divmod(int(own_slots[i]), page_size)
            kj = np.concatenate([kj, k[page, :, off, :][None]])
            vj = np.concatenate([vj, v[page, :, off, :][None]])
        scores = np.einsum("nhd,hd->hn", kj[:, kv_of_head, :], q[i]) * scale
        scores -= scores.max(axis=1, keepdims=True)
        w = np.exp(scores)
        w /= w.sum(axis=1, keepdims=True)
        out[i] = np.einsum("hn,nhd->hd", w, vj[:, kv_of_head, :])
    return out


def run_and_check(gpu, rng, cache, token_seq, positions, n_heads, n_kv_heads, head_dim, kv_type, window=0, sink=0,
                  own_slots=None, kernels=("decode", "prefill", "auto"), **kwargs):
    token_seq = np.asarray(token_seq, dtype=np.int32)
    positions = np.asarray(positions, dtype=np.int32)
    if own_slots is not None:
        own_slots = np.asarray(own_slots, dtype=np.int64)
    q = rng.standard_normal((len(token_seq), n_heads, head_dim)).astype(np.float32)
    k, v = cache.caches(kv_type)
    scale = 1.0 / np.sqrt(head_dim)
    ref = reference(q, k, v, cache.page_table, token_seq, positions, n_kv_heads, scale, cache.page_size, window,
                    sink, own_slots)
    assert np.isfinite(ref).all()  # the reference itself never reads an unwritten slot
    for kernel in kernels:
        out = gpu.attention(q, k, v, cache.page_table, token_seq, positions, n_kv_heads, scale, cache.page_size,
                            window=window, sink=sink, own_slots=own_slots, kv_type=kv_type, kernel=kernel, **kwargs)
        assert out.shape == ref.shape
        assert np.isfinite(out).all(), f"{kernel}: non-finite output (an unwritten slot was read)"
        np.testing.assert_allclose(out, ref, rtol=RTOL, atol=ATOL, err_msg=f"kernel={kernel}")


def decode_batch(rng, seq_lens):
    """One token per sequence at its last position, in a shuffled order."""
    token_seq = rng.permutation(len(seq_lens)).astype(np.int32)
    positions = np.array([seq_lens[s] - 1 for s in token_seq], dtype=np.int32)
    return token_seq, positions


# --- decode batches -------------------------------------------------------------------------------


@pytest.mark.parametrize("kv_type", ["f32", "f16"])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("group", [1, 4, 8])
def test_decode_batch_ragged(gpu, rng, kv_type, head_dim, group):
    # lengths around page boundaries (16), a single token, a few pages
    seq_lens = [1, 15, 16, 17, 100, 300]
    n_kv = 2
    cache = PagedCache(rng, seq_lens, n_kv, head_dim, page_size=16)
    token_seq, positions = decode_batch(rng, seq_lens)
    run_and_check(gpu, rng, cache, token_seq, positions, n_kv * group, n_kv, head_dim, kv_type)


@pytest.mark.parametrize("kv_type", ["f32", "f16"])
@pytest.mark.parametrize("head_dim,page_size", [(128, 16), (64, 32), (256, 8)])
def test_long_context_split_k(gpu, rng, kv_type, head_dim, page_size):
    # contexts of many splits (>= 256 keys each), one just past a split, short ones whose extra
    # splits are empty
    seq_lens = [5000, 4097, 257, 1]
    cache = PagedCache(rng, seq_lens, 2, head_dim, page_size)
    token_seq, positions = decode_batch(rng, seq_lens)
    run_and_check(gpu, rng, cache, token_seq, positions, 8, 2, head_dim, kv_type, kernels=("decode", "prefill"))
    # a batch of one: the most splits
    run_and_check(gpu, rng, cache, [0], [4999], 8, 2, head_dim, kv_type, kernels=("decode",))


@pytest.mark.parametrize("workspace_bytes", [0, 1000, 3 * 4 * 8 * (128 + 2) * 4])
def test_decode_with_a_short_workspace(gpu, rng, workspace_bytes):
    # fewer splits than the context allows (none, or as many as fit): the same answer
    seq_lens = [3000, 1200, 40, 700]
    cache = PagedCache(rng, seq_lens, 2, 128, 16)
    token_seq, positions = decode_batch(rng, seq_lens)
    run_and_check(gpu, rng, cache, token_seq, positions, 8, 2, 128, "f32", kernels=("decode",),
                  workspace_bytes=workspace_bytes)


def test_workspace_bytes(gpu):
    assert gpu.attention_workspace_bytes(4, 8, 128, 256) == 0  # one split: written directly
    assert gpu.attention_workspace_bytes(4, 8, 128, 5000) == 20 * 4 * 8 * (128 + 2) * 4  # ceil(5000 / 256) splits
    assert gpu.attention_workspace_bytes(4, 8, 128, 10**6) == 32 * 4 * 8 * (128 + 2) * 4  # capped
    assert gpu.attention_workspace_bytes(0, 8, 128, 5000) == 0


@pytest.mark.parametrize("n_heads,head_dim", [(4, 256), (8, 256), (12, 256), (16, 256), (32, 64), (40, 128)])
def test_mqa_and_large_groups(gpu, rng, n_heads, head_dim):
    # one KV head (Gemma 3's 1B: 4 heads of 256); groups above a block's query heads (decode: 8,
    # prefill: 64 / 32 / 16 rows) are split into chunks
    seq_lens = [3, 40, 700]
    cache = PagedCache(rng, seq_lens, 1, head_dim, 16)
    token_seq, positions = decode_batch(rng, seq_lens)
    run_and_check(gpu, rng, cache, token_seq, positions, n_heads, 1, head_dim, "f16")
    # a prefill chunk of sequence 1 (positions 10..39) and a decode token of sequence 2
    run_and_check(gpu, rng, cache, [1] * 30 + [2], list(range(10, 40)) + [699], n_heads, 1, head_dim, "f32",
                  kernels=("prefill", "decode"))


# --- prefill and mixed batches --------------------------------------------------------------------


@pytest.mark.parametrize("kv_type", ["f32", "f16"])
@pytest.mark.parametrize("head_dim,n_heads,n_kv", [(64, 8, 8), (128, 16, 4), (256, 8, 2), (128, 8, 1)])
def test_prefill_mixed_batch(gpu, rng, kv_type, head_dim, n_heads, n_kv):
    # A: 37 tokens cached + a chunk of 70 (positions 37..106); B: a decode token at 200; C: a chunk
    # from position 0 (45 tokens); D: its first token. Block boundaries fall inside the chunks.
    seq_lens = [107, 201, 45, 1]
    cache = PagedCache(rng, seq_lens, n_kv, head_dim, 16)
    token_seq = [1] + [0] * 70 + [3] + [2] * 45
    positions = [200] + list(range(37, 107)) + [0] + list(range(45))
    run_and_check(gpu, rng, cache, token_seq, positions, n_heads, n_kv, head_dim, kv_type)


def test_prefill_long_chunk(gpu, rng):
    # a 600-token chunk after 1,500 cached tokens, pages of 32
    seq_lens = [2100]
    cache = PagedCache(rng, seq_lens, 2, 128, 32)
    run_and_check(gpu, rng, cache, [0] * 600, list(range(1500, 2100)), 8, 2, 128, "f16", kernels=("prefill",))


def test_scattered_positions(gpu, rng):
    # tokens of one sequence next to each other in the batch, at positions in any order
    seq_lens = [300, 50]
    cache = PagedCache(rng, seq_lens, 2, 128, 16)
    token_seq = [0, 0, 0, 0, 0, 0, 1, 0]
    positions = [5, 7, 100, 99, 299, 0, 49, 150]
    run_and_check(gpu, rng, cache, token_seq, positions, 8, 2, 128, "f32")


@pytest.mark.parametrize("row_pad", [4, 16])
def test_row_strides(gpu, rng, row_pad):
    # q and out rows wider than n_heads * head_dim; the probe checks the padding is untouched
    seq_lens = [20, 300]
    cache = PagedCache(rng, seq_lens, 2, 64, 16)
    run_and_check(gpu, rng, cache, [1, 0, 0, 0], [299, 17, 18, 19], 4, 2, 64, "f32", row_pad=row_pad)


# --- windows, sinks, draft trees ------------------------------------------------------------------


@pytest.mark.parametrize("kv_type", ["f32", "f16"])
@pytest.mark.parametrize("window,sink", [(16, 0), (100, 0), (1, 0), (16, 4), (100, 4), (1, 3), (0, 4)])
def test_window_and_sink(gpu, rng, kv_type, window, sink):
    # decode tokens inside and past the window, and a 130-token chunk (positions 20..149) longer
    # than the window; sink without a window changes nothing
    seq_lens = [1, 10, 90, 150, 700]
    cache = PagedCache(rng, seq_lens, 2, 128, 16)
    token_seq, positions = decode_batch(rng, seq_lens)
    run_and_check(gpu, rng, cache, token_seq, positions, 8, 2, 128, kv_type, window=window, sink=sink)
    token_seq = [3] * 130 + [4]
    positions = list(range(20, 150)) + [699]
    run_and_check(gpu, rng, cache, token_seq, positions, 8, 2, 128, kv_type, window=window, sink=sink,
                  kernels=("prefill", "decode"))


@pytest.mark.parametrize("kv_type", ["f32", "f16"])
@pytest.mark.parametrize("window,sink", [(0, 0), (8, 0), (8, 2)])
def test_tree_leaves(gpu, rng, kv_type, window, sink):
    # Sequence 0: 60 committed tokens, a path at positions 60..62 in this batch, leaves at 63 (past
    # the written positions: that slot is NaN) and at 61 (beside the path token there, which they
    # must not see). Sequence 1: 30 tokens and only leaves at 30. Own K/V in spare pages.
    # (The CPU backend refuses trees with a sink; the kernels' rule covers it and is checked too.)
    seq_lens = [63, 30]
    cache = PagedCache(rng, seq_lens, 2, 64, 16, spare_pages=2)
    slot = lambda: cache.take_slot(rng)  # noqa: E731
    rows = [  # (seq, position, own slot)
        (0, 60, -1), (0, 63, slot()), (0, 61, -1), (0, 61, slot()), (0, 62, -1),
        (0, 63, slot()), (0, 61, slot()), (0, 63, slot()), (1, 30, slot()), (1, 30, slot()),
    ]
    token_seq, positions, own = zip(*rows)
    run_and_check(gpu, rng, cache, token_seq, positions, 4, 2, 64, kv_type, window=window, sink=sink,
                  own_slots=own, kernels=("decode", "prefill"))


# --- arguments ------------------------------------------------------------------------------------


def _tiny(rng, head_dim=64, n_heads=4, n_kv=2):
    cache = PagedCache(rng, [5], n_kv, head_dim, 16)
    q = rng.standard_normal((1, n_heads, head_dim)).astype(np.float32)
    k, v = cache.caches("f32")
    return q, k, v, cache.page_table


def test_empty_batch(gpu, rng):
    q, k, v, table = _tiny(rng)
    none = np.zeros(0, dtype=np.int32)
    out = gpu.attention(q[:0], k, v, table, none, none, 2, 0.125, 16)
    assert out.shape == (0, 4, 64)


def test_rejects_bad_arguments(gpu, rng):
    seq, pos = np.array([0], np.int32), np.array([4], np.int32)
    q, k, v, table = _tiny(rng, head_dim=96)
    with pytest.raises(ValueError, match="head_dim"):
        gpu.attention(q, k, v, table, seq, pos, 2, 0.1, 16, kernel="decode")
    with pytest.raises(ValueError, match="head_dim"):
        gpu.attention(q, k, v, table, seq, pos, 2, 0.1, 16, kernel="prefill")
    q, k, v, table = _tiny(rng, n_heads=6, n_kv=4)
    with pytest.raises(ValueError, match="multiple"):
        gpu.attention(q, k, v, table, seq, pos, 4, 0.1, 16)
    q, k, v, table = _tiny(rng)
    with pytest.raises(ValueError):
        gpu.attention(q, k, v, table, seq, pos, 2, 0.1, 16, kv_type="bf16")
    with pytest.raises(ValueError):
        gpu.attention(q, k, v, table, seq, pos, 2, 0.1, 16, kernel="flash")
    with pytest.raises(ValueError):  # a position past the page table
        gpu.attention(q, k, v, table, seq, np.array([40], np.int32), 2, 0.1, 16)
