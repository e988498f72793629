"""Sampling kernels (csrc/backend/cuda/sampling.cu, verify.cu) against float64 numpy references.

The rule is the CPU sampler's (csrc/engine/sampler.cpp): temperature < 1e-5 or top_k == 1 is
greedy (the first maximum of logit * float32(1 / T)); otherwise weights w = exp(x - max), tokens
ordered by (w descending, id ascending), top-k keeps the first k, top-p the first n whose mass
reaches top_p of the top-k mass (at least one), min-p drops w < min_p, and the token is the first,
in increasing id order, whose running kept mass exceeds uniform * kept mass. (The CPU walks its
candidates in the order its filters left them; the kernel walks ids in increasing order -- the same
distribution, a different token for a given uniform once top-k or top-p is on.)

Tolerance, REL_TOL = 1e-6 of the kept mass: the reference repeats the float32 steps both samplers
share (x = logit * float32(1 / T), x - max), so the kernel differs only by expf (<= 2 ulp, 2.4e-7
relative per weight) and its fixed-point masses (truncation <= 2^-40 per token, <= 2.4e-7 of the
total at vocab 262144, the max weighing 1). Where a uniform, the top-p target or min_p lies within
REL_TOL of a boundary, the reference accepts either side (acceptable_tokens returns that set: one
token in most rows; at vocab 262144 on a flat row, where a token holds ~4e-6 of the mass, about a
quarter of the rows also accept a neighbour, so an off-by-one still fails most rows). Tokens with w < 2^-40 (28 nats under the max) have no mass on the device;
the reference drops them too.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest

GREEDY_T = 1e-5
MIN_WEIGHT = 2.0**-40
REL_TOL = 1e-6
CHI2_DRAWS = 200_000
SWEEP_ROWS = 4000  # rows of one logits row, uniforms sweeping [0, 1) evenly
# chi2.ppf(1 - 1e-6, df): each chi-square test fails by chance once in a million runs.
CHI2_CRITICAL = {1: 23.928, 2: 27.631, 3: 30.665, 4: 33.377, 5: 35.888, 6: 38.258, 7: 40.522}


# --- reference ------------------------------------------------------------------------------------
def scaled_logits(row: np.ndarray, t: float) -> np.ndarray:
    """x = logit * float32(1 / t) in float32, as both samplers; greedy temperatures leave the row."""
    if not t >= GREEDY_T:
        return row
    return (row * (np.float32(1.0) / np.float32(t))).astype(np.float32)


def kept_order(row, t, k):
    """(weights w: [vocab] float64, the top-k prefix of the (w desc, id asc) order)."""
    x = scaled_logits(row, t)
    with np.errstate(invalid="ignore"):
        d = (x - x.max()).astype(np.float32)  # float32, as both samplers
    w = np.exp(d.astype(np.float64))
    ids = np.nonzero(w >= MIN_WEIGHT)[0]
    order = ids[np.lexsort((ids, -w[ids]))]
    if 0 < k < len(order):
        order = order[:k]
    return w, order


def cut_lengths(w, order, p):
    """Top-p prefix lengths of `order` the device may pick: the exact one, and both sides of any
    running mass within REL_TOL of the target."""
    if not p < 1:
        return {len(order)}
    mass = np.cumsum(w[order])
    target = max(float(p), 0.0) * mass[-1]
    n = int(np.searchsorted(mass, target, side="left")) + 1
    near = np.nonzero(np.abs(mass - target) <= REL_TOL * mass[-1])[0]
    lengths = {n} | set((near + 1).tolist()) | set((near + 2).tolist())
    return {min(max(n, 1), len(order)) for n in lengths}


def min_p_thresholds(min_p):
    if not min_p > 0:
        return [0.0]
    m = min(float(min_p), 1.0)
    return [m * (1 - REL_TOL), min(m * (1 + REL_TOL), 1.0)]


def acceptable_tokens(row, t, k, p, min_p, u) -> set[int]:
    """The tokens the rule gives for this uniform, with either neighbour of a boundary closer than
    REL_TOL (see the module docstring)."""
    if not t >= GREEDY_T or k == 1:
        return {int(np.argmax(scaled_logits(row, t)))}  # numpy's argmax: the first maximum
    w, order = kept_order(row, t, k)
    out: set[int] = set()
    for n in cut_lengths(w, order, p):
        for m in min_p_thresholds(min_p):
            kept = np.sort(order[:n][w[order[:n]] >= m])
            if len(kept) == 0:
                continue
            wk = w[kept]
            inclusive = np.cumsum(wk)
            exclusive = inclusive - wk
            total = inclusive[-1]
            r = float(u) * total
            ok = (wk > 0) & (exclusive <= r + REL_TOL * total) & (inclusive > r - REL_TOL * total)
            out |= set(kept[ok].tolist())
    return out


def filtered_probs(row, t, k, p, min_p) -> np.ndarray:
    """The distribution the rule draws from (sort-based, float64); boundaries must not be ambiguous."""
    w, order = kept_order(row, t, k)
    (n,) = cut_lengths(w, order, p)
    kept = order[:n]
    kept = kept[w[kept] >= (min(float(np.float32(min_p)), 1.0) if min_p > 0 else 0.0)]
    probs = np.zeros(len(row))
    probs[kept] = w[kept] / w[kept].sum()
    return probs


def check_tokens(tokens, logits, t, k, p, min_p, u):
    assert tokens.shape == (len(logits),) and tokens.dtype == np.int32
    for r in range(len(logits)):
        ok = acceptable_tokens(logits[r], t[r], k[r], p[r], min_p[r], u[r])
        assert int(tokens[r]) in ok, (
            f"row {r}: token {tokens[r]}, expected one of {sorted(ok)} "
            f"(T={t[r]}, top_k={k[r]}, top_p={p[r]}, min_p={min_p[r]}, u={u[r]})")


def make_logits(rng, rows, vocab):
    """Normal logits at a per-row scale (flat to peaked), with a few much likelier tokens."""
    scale = rng.choice([1.0, 3.0, 8.0], size=(rows, 1))
    logits = rng.standard_normal((rows, vocab)) * scale
    for r in range(rows):
        spikes = rng.choice(vocab, size=min(5, vocab), replace=False)
        logits[r, spikes] += rng.uniform(1.0, 4.0, size=len(spikes)) * scale[r, 0]
    return logits.astype(np.float32)


def run_sample(gpu, logits, t, k, p, min_p, u):
    return gpu.sample(logits, np.asarray(t, np.float32), np.asarray(k, np.int32), np.asarray(p, np.float32),
                      np.asarray(min_p, np.float32), np.asarray(u, np.float32))


# --- sample against the reference ---------------------------------------------------------------------
TEMPERATURES = [0.0, 0.7, 1.5]
TOP_KS = [0, 1, 40, None]  # None: top_k = vocab (off)
TOP_PS = [0.1, 0.9, 1.0]
MIN_PS = [0.0, 0.05]


# 1000, 32000, 151936, 262144: real vocabularies (multiples of 4: float4 loads); 1001 and 50257:
# rows not 16-byte aligned and a ragged last segment.
@pytest.mark.parametrize("vocab", [1000, 1001, 32000, 50257, 151936, 262144])
def test_sample_matches_reference(gpu, rng, vocab):
    combos = list(itertools.product(TEMPERATURES, TOP_KS, TOP_PS, MIN_PS))
    combos = [combos[i] for i in rng.permutation(len(combos))]
    for start in range(0, len(combos), 16):  # batches of 16 rows, the last of 8
        batch = combos[start:start + 16]
        rows = len(batch)
        logits = make_logits(rng, rows, vocab)
        t = np.array([c[0] for c in batch], np.float32)
        k = np.array([vocab if c[1] is None else c[1] for c in batch], np.int32)
        p = np.array([c[2] for c in batch], np.float32)
        min_p = np.array([c[3] for c in batch], np.float32)
        u = rng.random(rows, dtype=np.float32)
        check_tokens(run_sample(gpu, logits, t, k, p, min_p, u), logits, t, k, p, min_p, u)


@pytest.mark.parametrize("rows", [1, 2, 3, 7, 16])
def test_sample_row_counts(gpu, rng, rows):
    vocab = 32000
    logits = make_logits(rng, rows, vocab)
    t = rng.choice([0.0, 0.5, 1.0, 2.0], size=rows).astype(np.float32)
    k = rng.choice([0, 1, 2, 20, 1000, vocab + 5], size=rows).astype(np.int32)
    p = rng.choice([0.05, 0.5, 0.95, 1.0], size=rows).astype(np.float32)
    min_p = rng.choice([0.0, 0.01, 0.2], size=rows).astype(np.float32)
    u = rng.random(rows, dtype=np.float32)
    check_tokens(run_sample(gpu, logits, t, k, p, min_p, u), logits, t, k, p, min_p, u)


def test_sample_extreme_uniforms(gpu, rng):
    # u = 0 draws the lowest kept id; u just under 1 the highest; out-of-range u is clamped.
    vocab, rows = 5000, 6
    logits = np.tile(make_logits(rng, 1, vocab), (rows, 1))
    t, k, p, min_p = [1.0] * rows, [50] * rows, [0.9] * rows, [0.0] * rows
    u = np.array([0.0, np.nextafter(np.float32(1), np.float32(0)), 0.5, 0.25, -1.0, 2.0], np.float32)
    tokens = run_sample(gpu, logits, t, k, p, min_p, u)
    check_tokens(tokens[:4], logits[:4], t, k, p, min_p, u)
    assert tokens[4] == tokens[0] and tokens[5] == tokens[1]


def test_sample_masked_logits(gpu, rng):
    # A grammar mask leaves a few finite logits among -inf: only those may come out.
    vocab, rows = 32000, 8
    logits = make_logits(rng, rows, vocab)
    mask = rng.random((rows, vocab)) < 0.995
    logits[mask] = -np.inf
    t = np.array([0.0, 0.7, 1.0, 1.5, 1.0, 0.7, 1.0, 2.0], np.float32)
    k = np.array([0, 0, 3, 40, 0, 1, 0, 0], np.int32)
    p = np.array([1.0, 0.9, 1.0, 0.5, 1.0, 1.0, 0.3, 1.0], np.float32)
    min_p = np.array([0.0, 0.0, 0.0, 0.05, 0.1, 0.0, 0.0, 0.0], np.float32)
    u = rng.random(rows, dtype=np.float32)
    tokens = run_sample(gpu, logits, t, k, p, min_p, u)
    assert np.isfinite(logits[np.arange(rows), tokens]).all()
    check_tokens(tokens, logits, t, k, p, min_p, u)
    # Nothing finite at all: the kernel falls back to token 0 (the CPU sampler's result is undefined).
    dead = np.full((1, 100), -np.inf, np.float32)
    assert run_sample(gpu, dead, [1.0], [0], [0.9], [0.0], [0.3])[0] == 0


# --- greedy and argmax -------------------------------------------------------------------------------
@pytest.mark.parametrize("vocab", [1, 31, 1000, 1001, 32003, 262144])
def test_argmax_first_maximum(gpu, rng, vocab):
    rows = 6
    logits = rng.integers(-3, 4, size=(rows, vocab)).astype(np.float32)  # many tied maxima
    logits[1] = rng.standard_normal(vocab).astype(np.float32)
    logits[1, -1] = 100.0  # the maximum at the last token only
    logits[2] = 0.5  # all tied: token 0
    logits[3] = -np.inf
    logits[3, rng.integers(vocab)] = -7.0  # one finite logit among -inf
    logits[4] = -np.inf  # all -inf: the first, token 0
    logits[5] = rng.standard_normal(vocab).astype(np.float32)
    hi = rng.integers(vocab, size=3)
    logits[5, hi] = 50.0  # the same maximum at up to 3 places
    expected = np.argmax(logits, axis=1)
    np.testing.assert_array_equal(gpu.argmax(logits), expected)
    # sample with temperature 0 is the same argmax, whatever else the row asks for
    u = rng.random(rows, dtype=np.float32)
    tokens = run_sample(gpu, logits, [0.0] * rows, [40] * rows, [0.5] * rows, [0.1] * rows, u)
    np.testing.assert_array_equal(tokens, expected)


def test_greedy_rows(gpu, rng):
    # Greedy as the CPU decides it: T = 0, T < 0, T < 1e-5 (argmax of the raw logits) and top_k = 1
    # (argmax of logit * float32(1 / T)), with duplicated maxima.
    vocab = 5000
    t = np.array([0.0, -1.0, 1e-6, 0.7, 1.5, 1.0], np.float32)
    rows = len(t)
    logits = make_logits(rng, rows, vocab)
    for r in range(rows):
        top = logits[r].max() + 1.0
        a, b = sorted(rng.choice(vocab, size=2, replace=False))
        logits[r, a] = logits[r, b] = top
    k = np.array([0, 0, 0, 1, 1, 1], np.int32)
    u = rng.random(rows, dtype=np.float32)
    tokens = run_sample(gpu, logits, t, k, [0.9] * rows, [0.0] * rows, u)
    expected = [int(np.argmax(scaled_logits(logits[r], t[r]))) for r in range(rows)]
    np.testing.assert_array_equal(tokens, expected)


# --- ties at the cuts ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "top_k,top_p,min_p",
    [(40, 1.0, 0.0),  # top-k cut inside the top tie group: the lowest 40 ids of it
     (200, 1.0, 0.0),  # the top group whole, the next one cut
     (0, 0.43, 0.0),  # top-p cut inside the top tie group
     (200, 0.8, 0.0),  # top-p after top-k, cut in the second group
     (300, 0.9, 0.3)])  # min-p drops the groups under 0.3 (w = e^-2 and less)
def test_ties_keep_lowest_ids(gpu, rng, top_k, top_p, min_p):
    vocab, rows = 1000, SWEEP_ROWS
    row = rng.integers(0, 6, size=vocab).astype(np.float32)  # 6 values, ~167 tokens each
    logits = np.tile(row, (rows, 1))
    u = ((np.arange(rows) + 0.5) / rows).astype(np.float32)  # an even sweep of the CDF
    t, k, p, mp = [1.0] * rows, [top_k] * rows, [top_p] * rows, [min_p] * rows
    tokens = run_sample(gpu, logits, t, k, p, mp, u)
    check_tokens(tokens, logits, t, k, p, mp, u)
    # The sweep reaches every kept token, and only those.
    w, order = kept_order(row, 1.0, top_k)
    (n,) = cut_lengths(w, order, top_p)
    kept = order[:n][w[order[:n]] >= min_p]
    assert set(tokens.tolist()) == set(kept.tolist())


def test_flat_rows(gpu, rng):
    # Every logit equal: every cut falls inside one tie group of the whole vocabulary (and every
    # token lands in the same histogram bin).
    vocab, rows = 32003, 6
    logits = np.full((rows, vocab), 0.25, np.float32)
    t = np.array([1.0, 0.7, 1.0, 1.5, 1.0, 1.0], np.float32)
    k = np.array([40, 0, 1000, 0, 7, 0], np.int32)
    p = np.array([1.0, 0.3, 0.77, 1.0, 0.5, 0.01], np.float32)
    min_p = np.array([0.0, 0.0, 0.0, 0.5, 0.0, 0.0], np.float32)
    u = rng.random(rows, dtype=np.float32)
    check_tokens(run_sample(gpu, logits, t, k, p, min_p, u), logits, t, k, p, min_p, u)


def test_top_k_tie_group_exact(gpu):
    # All 40 kept tokens weigh the same: u in [j/40, (j+1)/40) draws the j-th lowest id of the group.
    vocab, rows, k = 1000, SWEEP_ROWS, 40
    row = (np.arange(vocab) * 7919 % 6).astype(np.float32)
    logits = np.tile(row, (rows, 1))
    u = ((np.arange(rows) + 0.5) / rows).astype(np.float32)
    tokens = run_sample(gpu, logits, [1.0] * rows, [k] * rows, [1.0] * rows, [0.0] * rows, u)
    group = np.nonzero(row == row.max())[0][:k]
    np.testing.assert_array_equal(tokens, group[np.floor(u.astype(np.float64) * k).astype(int)])


# --- the distribution ---------------------------------------------------------------------------------
SMALL_LOGITS = np.array([2.0, 1.5, 0.3, -0.7, 1.1, -2.0, 0.0, 0.9], np.float32)
SMALL_CASES = [(1.0, 0, 1.0, 0.0), (0.8, 6, 0.9, 0.05), (1.5, 0, 0.95, 0.0), (0.7, 0, 1.0, 0.2)]


@pytest.mark.parametrize("t,k,p,min_p", SMALL_CASES)
def test_chi_square_small_vocab(gpu, rng, t, k, p, min_p):
    """Pearson's chi-square of CHI2_DRAWS random uniforms against the filtered softmax; the critical
    value is chi2's 1 - 1e-6 quantile, so a correct kernel fails once in a million runs."""
    n = CHI2_DRAWS
    probs = filtered_probs(SMALL_LOGITS, t, k, p, min_p)
    u = rng.random(n, dtype=np.float32)
    tokens = run_sample(gpu, np.tile(SMALL_LOGITS, (n, 1)), [t] * n, [k] * n, [p] * n, [min_p] * n, u)
    counts = np.bincount(tokens, minlength=len(SMALL_LOGITS))
    kept = probs > 0
    assert counts[~kept].sum() == 0, f"filtered-out tokens drawn: {counts}, expected {probs}"
    expected = n * probs[kept]
    chi2 = float(((counts[kept] - expected) ** 2 / expected).sum())
    df = int(kept.sum()) - 1
    assert df >= 1
    assert chi2 < CHI2_CRITICAL[df], f"chi2 = {chi2:.1f} (df {df}), counts {counts}, expected {n * probs}"


@pytest.mark.parametrize("t,k,p,min_p", SMALL_CASES)
def test_inverse_cdf_sweep(gpu, t, k, p, min_p):
    # An even sweep of uniforms: tokens in increasing id order, each drawn n * prob times (+-1).
    n = SWEEP_ROWS
    probs = filtered_probs(SMALL_LOGITS, t, k, p, min_p)
    u = ((np.arange(n) + 0.5) / n).astype(np.float32)
    tokens = run_sample(gpu, np.tile(SMALL_LOGITS, (n, 1)), [t] * n, [k] * n, [p] * n, [min_p] * n, u)
    assert (np.diff(tokens) >= 0).all(), "the CDF is not walked in increasing id order"
    counts = np.bincount(tokens, minlength=len(SMALL_LOGITS))
    np.testing.assert_allclose(counts, n * probs, atol=1.01)


# --- verify_greedy ------------------------------------------------------------------------------------
def verify_reference(target, drafts, offsets):
    accepted, nxt = [], []
    for s in range(len(offsets) - 1):
        t = target[offsets[s]:offsets[s + 1]]
        d = drafts[offsets[s] - s:offsets[s + 1] - s - 1]
        a = 0
        while a < len(d) and d[a] == t[a]:
            a += 1
        accepted.append(a)
        nxt.append(t[a])
    return np.array(accepted, np.int32), np.array(nxt, np.int32)


def test_verify_greedy_hand_made(gpu):
    seqs = [  # (drafts, target argmax rows: one more than drafts) -> (accepted, next)
        ([5, 6, 7], [5, 6, 7, 8], 3, 8),  # all accepted: next is the bonus token
        ([1, 2], [9, 2, 3], 0, 9),  # none: the first disagrees, even though the second agrees
        ([4, 4, 4, 4], [4, 4, 0, 4, 1], 2, 0),  # partial
        ([], [11], 0, 11),  # no drafts: the target's token
        ([3], [3, 12], 1, 12),
    ]
    drafts = np.array([x for s in seqs for x in s[0]], np.int32)
    target = np.array([x for s in seqs for x in s[1]], np.int32)
    offsets = np.concatenate([[0], np.cumsum([len(s[1]) for s in seqs])]).astype(np.int32)
    accepted, nxt = gpu.verify_greedy(target, drafts, offsets)
    np.testing.assert_array_equal(accepted, [s[2] for s in seqs])
    np.testing.assert_array_equal(nxt, [s[3] for s in seqs])


def test_verify_greedy_random(gpu, rng):
    n_seqs = 1000  # several blocks of threads
    n_drafts = rng.integers(0, 9, size=n_seqs)
    offsets = np.concatenate([[0], np.cumsum(n_drafts + 1)]).astype(np.int32)
    target = rng.integers(0, 4, size=offsets[-1]).astype(np.int32)  # few ids: long agreeing runs
    drafts = np.concatenate([target[offsets[s]:offsets[s] + n_drafts[s]] for s in range(n_seqs)]).astype(np.int32)
    flip = rng.random(len(drafts)) < 0.2
    drafts[flip] = rng.integers(0, 4, size=int(flip.sum()))
    accepted, nxt = gpu.verify_greedy(target, drafts, offsets)
    ref_accepted, ref_next = verify_reference(target, drafts, offsets)
    np.testing.assert_array_equal(accepted, ref_accepted)
    np.testing.assert_array_equal(nxt, ref_next)


def test_verify_greedy_no_sequences(gpu):
    accepted, nxt = gpu.verify_greedy(np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(1, np.int32))
    assert accepted.shape == (0,) and nxt.shape == (0,)


# --- arguments ----------------------------------------------------------------------------------------
def test_empty_and_bad_arguments(gpu):
    none = np.zeros(0, np.float32)
    assert run_sample(gpu, np.zeros((0, 100), np.float32), none, none, none, none, none).shape == (0,)
    assert gpu.argmax(np.zeros((0, 100), np.float32)).shape == (0,)
    logits = np.zeros((2, 10), np.float32)
    with pytest.raises(ValueError):  # a parameter array of the wrong length
        run_sample(gpu, logits, [1.0], [0, 0], [1.0, 1.0], [0.0, 0.0], [0.5, 0.5])
    with pytest.raises(ValueError):  # vocab 0
        run_sample(gpu, np.zeros((2, 0), np.float32), [1.0] * 2, [0] * 2, [1.0] * 2, [0.0] * 2, [0.5] * 2)
    with pytest.raises(ValueError):  # a sequence without a target row
        gpu.verify_greedy(np.zeros(2, np.int32), np.zeros(0, np.int32), np.array([0, 2, 2], np.int32))


def test_bench_sample_runs(gpu):
    ms = gpu.bench_sample(2, 1000, 3)
    assert np.isfinite(ms) and ms > 0
