// Token selection on the device (sampling.h): sample and argmax, one block per row, no sort.
//
// The CPU sampler's rule (engine/sampler.cpp), restated on weights w = exp(x - max), x = logit / T
// (x = logit * (1 / T) in float, as the CPU does it): order the tokens by (w descending, id
// ascending); top-k keeps the first k; top-p keeps the first n whose mass reaches top_p of the
// top-k mass; min-p drops w < min_p (the max has w = 1). Top-k and top-p both keep a prefix of the
// same order, so before min-p the kept set is
//     { w > cut } + the first `cut_ties` ids (lowest first) with w == cut,
// a value and a tie count found by a radix select on w's float bits: w is in (0, 1], so its bits
// order like its values and span bits 29..0; three passes of 1024-bin histograms (bits 29..20,
// 19..10, 9..0) pin one cut, each pass counting only the tokens inside the previous pass's bin.
// The draw is an inverse CDF at uniform * kept mass over token ids in increasing order (the CPU
// walks its candidates in the order its filters left them: the same distribution, not the same
// token for a given uniform once top-k or top-p is on).
//
// Masses are fixed point, round_down(w * 2^40) as uint64: sums are exact whatever the order of the
// additions (shared atomics included), so every pass sees the same totals and a run is
// deterministic. Tokens with w < 2^-40 (about 27.7 nats below the max) have mass 0: they are never
// drawn and never counted by top-k (top-k then keeps them all, which changes nothing).
//
// Every weight is computed by weight() from the same float inputs, so a token has the same w in
// every pass; the passes skip the expf of tokens whose x - max lies outside the range that can
// matter (with a margin far above expf's error), which is most of a large vocabulary.
#include <climits>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "backend/cuda/sampling.h"

namespace pyserve::gpu {
namespace {

using u64 = unsigned long long;  // the type the atomicAdd overloads take, on both vendors

constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kBins = 1024;  // 10 bits of w per histogram pass
static_assert(kBins == kThreads, "select_bin gives each thread one bin");
static_assert(kWarps <= kWarpSize, "block scans finish the per-warp totals in one warp");
constexpr int kSegment = 4 * kWarpSize;  // tokens one warp covers with one float4 per lane
constexpr int kUnroll = 4;               // segments a warp loads before using any (loads in flight)
constexpr int kMaxVocab = 1 << 24;       // fixed-point sums: vocab * 2^40 < 2^64

constexpr float kGreedyTemperature = 1e-5f;  // the CPU sampler's line: below it, greedy
constexpr float kMinWeight = 0x1p-40f;       // smallest w with a nonzero fixed-point mass
constexpr float kFixedOne = 0x1p40f;         // w = 1 as a fixed-point mass
constexpr float kLowestLogWeight = -28.f;    // < ln(2^-40) = -27.73: below it w has no mass
constexpr float kLogMargin = 1e-3f;          // widens every skip range (expf, logf err ~1e-6)

__device__ __forceinline__ u64 fixed_mass(float w) { return static_cast<u64>(w * kFixedOne); }

// --- the per-token arithmetic, identical in every pass ----------------------------------------------
// Contraction off: x * inv_t followed by x - max must not become one fma in some passes only.
__device__ __forceinline__ float scale_logit(float logit, float inv_t) {
#ifdef PYSERVE_GPU_HIP
#pragma clang fp contract(off)
#endif
  const float x = __fmul_rn(logit, inv_t);
  return x == x ? x : -INFINITY;  // NaN is never chosen
}
// w = exp(x - max) when x - max lies in [d_lo, d_hi]; 0 otherwise (the caller has shown that such
// a token cannot matter to it).
__device__ __forceinline__ float weight(float x, float max, float d_lo, float d_hi) {
#ifdef PYSERVE_GPU_HIP
#pragma clang fp contract(off)
#endif
  const float d = __fsub_rn(x, max);
  return d >= d_lo && d <= d_hi ? expf(d) : 0.f;
}
// The range of x - max holding every w in [w_lo, w_hi] (w_lo > 0).
struct LogRange {
  float lo, hi;
};
__device__ __forceinline__ LogRange log_range(float w_lo, float w_hi) {
  return {logf(w_lo) - kLogMargin, logf(w_hi) + kLogMargin};
}

// One row of logits as the passes read it.
struct Row {
  const float* logits;  // [vocab]
  int vocab;
  bool vec4;    // 16-byte aligned: float4 loads
  float inv_t;  // 1 / temperature (1 for greedy)
  float max;    // max of the scaled logits (set after the first pass)
};

// Logits [first, first + 4) (first a multiple of 4); -inf past the end of the row.
__device__ __forceinline__ void load4(const Row& r, int first, float (&v)[4]) {
  if (r.vec4 && first + 4 <= r.vocab) {
    const float4 q = *reinterpret_cast<const float4*>(r.logits + first);
    v[0] = q.x, v[1] = q.y, v[2] = q.z, v[3] = q.w;
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j) v[j] = first + j < r.vocab ? r.logits[first + j] : -INFINITY;
  }
}

// f(token, x) for every token of the row (and for padding past its end, with x = -inf). Warp w
// takes segments w, w + kWarps, ...; lane l the 4 tokens at 4 * l of each. All lanes of a warp run
// the same iterations.
template <typename F>
__device__ __forceinline__ void for_each_scaled(const Row& r, F&& f) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int n_seg = (r.vocab + kSegment - 1) / kSegment;
  for (int s0 = warp; s0 < n_seg; s0 += kWarps * kUnroll) {
    float v[kUnroll][4];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) load4(r, (s0 + u * kWarps) * kSegment + 4 * lane, v[u]);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int first = (s0 + u * kWarps) * kSegment + 4 * lane;
#pragma unroll
      for (int j = 0; j < 4; ++j) f(first + j, scale_logit(v[u][j], r.inv_t));
    }
  }
}

// --- warp and block primitives on 64-bit integers ----------------------------------------------------
__device__ __forceinline__ u64 join64(int lo, int hi) {
  return (static_cast<u64>(static_cast<uint32_t>(hi)) << 32) | static_cast<uint32_t>(lo);
}
__device__ __forceinline__ u64 shfl_u64(u64 v, int src_lane) {
  return join64(shfl(static_cast<int>(static_cast<uint32_t>(v)), src_lane),
                shfl(static_cast<int>(static_cast<uint32_t>(v >> 32)), src_lane));
}
__device__ __forceinline__ u64 shfl_xor_u64(u64 v, int lane_mask) {
  return join64(shfl_xor(static_cast<int>(static_cast<uint32_t>(v)), lane_mask),
                shfl_xor(static_cast<int>(static_cast<uint32_t>(v >> 32)), lane_mask));
}
__device__ __forceinline__ u64 warp_sum_u64(u64 v) {
  for (int o = kWarpSize / 2; o > 0; o >>= 1) v += shfl_xor_u64(v, o);
  return v;
}
__device__ __forceinline__ int warp_max_int(int v) {
  for (int o = kWarpSize / 2; o > 0; o >>= 1) v = max(v, shfl_xor(v, o));
  return v;
}
__device__ __forceinline__ u64 warp_inclusive_scan(u64 v) {
  const int lane = threadIdx.x % kWarpSize;
  for (int d = 1; d < kWarpSize; d <<= 1) {
    const u64 up = shfl_u64(v, lane >= d ? lane - d : lane);
    if (lane >= d) v += up;
  }
  return v;
}
// Exclusive prefix sum in thread order over the block (kThreads threads); `total` gets the sum.
// scratch: [kWarps + 1] in shared memory.
__device__ u64 block_exclusive_scan(u64 v, u64* scratch, u64& total) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const u64 inclusive = warp_inclusive_scan(v);
  __syncthreads();  // scratch may still be read by a previous scan
  if (lane == kWarpSize - 1) scratch[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    const u64 warp_total = lane < kWarps ? scratch[lane] : 0;
    const u64 warp_inclusive = warp_inclusive_scan(warp_total);
    if (lane < kWarps) scratch[lane] = warp_inclusive - warp_total;
    if (lane == kWarps - 1) scratch[kWarps] = warp_inclusive;
  }
  __syncthreads();
  total = scratch[kWarps];
  return scratch[warp] + inclusive - v;
}

// --- argmax ------------------------------------------------------------------------------------------
struct ArgMax {
  float value;
  int index;
};
__device__ __forceinline__ void take_better(ArgMax& a, float value, int index) {
  if (value > a.value || (value == a.value && index < a.index)) a = {value, index};  // first maximum
}
// The first maximum of the row's scaled logits, on every thread. scratch: [kWarps] (shared).
__device__ ArgMax row_argmax(const Row& r, ArgMax* scratch) {
  ArgMax best{-INFINITY, INT_MAX};
  for_each_scaled(r, [&](int token, float x) { take_better(best, x, token); });
  for (int o = kWarpSize / 2; o > 0; o >>= 1) take_better(best, shfl_xor(best.value, o), shfl_xor(best.index, o));
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  __syncthreads();
  if (lane == 0) scratch[warp] = best;
  __syncthreads();
  best = lane < kWarps ? scratch[lane] : ArgMax{-INFINITY, INT_MAX};
  for (int o = kWarpSize / 2; o > 0; o >>= 1) take_better(best, shfl_xor(best.value, o), shfl_xor(best.index, o));
  if (best.index >= r.vocab) best.index = 0;  // a row of NaN only: token 0
  return best;
}

// --- radix select on w's bits ----------------------------------------------------------------------
// Shared memory of the sampling kernel (about 25 KB).
struct SampleShared {
  u64 masses1[kBins];  // first-pass histogram, kept for both cuts
  u64 masses2[kBins];  // the refining passes' histogram
  u64 scan[kWarps + 1];
  unsigned counts1[kBins];
  unsigned counts2[kBins];
  ArgMax argmax[kWarps];
  struct {
    int bin;
    u64 count_above, mass_above, count_here;
    u64 count_total, mass_total;
  } pick;
  int seg;  // the segment the draw falls in
  u64 seg_before, seg_ties_before;
};

// counts/masses[digit] over the tokens with w >= kMinWeight whose w bits >> prefix_shift equal
// `prefix`, by the 10-bit digit of w at digit_shift. `range` bounds x - max for those tokens.
__device__ void histogram_pass(const Row& r, LogRange range, int prefix_shift, uint32_t prefix, int digit_shift,
                               unsigned* counts, u64* masses) {
  __syncthreads();  // the previous pass's histogram may still be read
  for (int b = threadIdx.x; b < kBins; b += kThreads) counts[b] = 0, masses[b] = 0;
  __syncthreads();
  // Neighbouring tokens often share a digit (a flat row: all of them): one atomic per run.
  int run_digit = -1;
  unsigned run_count = 0;
  u64 run_mass = 0;
  for_each_scaled(r, [&](int, float x) {
    const float w = weight(x, r.max, range.lo, range.hi);
    if (!(w >= kMinWeight)) return;
    const uint32_t bits = __float_as_uint(w);
    if ((bits >> prefix_shift) != prefix) return;
    const int digit = static_cast<int>((bits >> digit_shift) & (kBins - 1));
    if (digit != run_digit) {
      if (run_count > 0) {
        atomicAdd(&counts[run_digit], run_count);
        atomicAdd(&masses[run_digit], run_mass);
      }
      run_digit = digit, run_count = 0, run_mass = 0;
    }
    ++run_count;
    run_mass += fixed_mass(w);
  });
  if (run_count > 0) {
    atomicAdd(&counts[run_digit], run_count);
    atomicAdd(&masses[run_digit], run_mass);
  }
  __syncthreads();
}

struct Pick {
  int bin;  // -1: target is past the total
  u64 count_above, mass_above;  // over the bins above `bin`
  u64 count_here;               // in `bin`
  u64 count_total, mass_total;  // over all bins
};
// Walking the bins from the highest down, the bin where the running count (by_mass: mass) first
// reaches `target` (>= 1). One bin per thread, highest first; every thread gets the answer.
__device__ Pick select_bin(const unsigned* counts, const u64* masses, bool by_mass, u64 target, SampleShared& sm) {
  __syncthreads();  // sm.pick may still be read
  if (threadIdx.x == 0) sm.pick.bin = -1;
  const int bin = kBins - 1 - static_cast<int>(threadIdx.x);
  const u64 count = counts[bin], mass = masses[bin];
  u64 count_total, mass_total;
  const u64 count_above = block_exclusive_scan(count, sm.scan, count_total);
  const u64 mass_above = block_exclusive_scan(mass, sm.scan, mass_total);
  const u64 above = by_mass ? mass_above : count_above, here = by_mass ? mass : count;
  if (above < target && target - above <= here) {  // exactly one bin
    sm.pick.bin = bin;
    sm.pick.count_above = count_above;
    sm.pick.mass_above = mass_above;
    sm.pick.count_here = count;
  }
  if (threadIdx.x == 0) sm.pick.count_total = count_total, sm.pick.mass_total = mass_total;
  __syncthreads();
  return {sm.pick.bin, sm.pick.count_above, sm.pick.mass_above, sm.pick.count_here, sm.pick.count_total,
          sm.pick.mass_total};
}

// The w of the token where the running count (by_mass: mass) over the (w desc) order first reaches
// `target`, refined from `first`, the pick on the first-pass histogram: two more passes.
struct Boundary {
  bool found;
  float value;
  u64 count_above, mass_above;  // tokens with w > value
  u64 count_at;                 // tokens with w == value
};
__device__ Boundary find_boundary(const Row& r, const Pick& first, bool by_mass, u64 target, SampleShared& sm) {
  Boundary b{false, 0.f, first.count_above, first.mass_above, 0};
  if (first.bin < 0) return b;
  uint32_t prefix = static_cast<uint32_t>(first.bin);
  for (int prefix_shift = 20; prefix_shift > 0; prefix_shift -= 10) {
    const uint32_t lo_bits = prefix << prefix_shift, hi_bits = lo_bits + ((1u << prefix_shift) - 1);
    histogram_pass(r, log_range(__uint_as_float(lo_bits), __uint_as_float(hi_bits)), prefix_shift, prefix,
                   prefix_shift - 10, sm.counts2, sm.masses2);
    const Pick p = select_bin(sm.counts2, sm.masses2, by_mass, target - (by_mass ? b.mass_above : b.count_above), sm);
    if (p.bin < 0) return b;  // cannot happen: the bin's tokens are counted again, identically
    b.count_above += p.count_above;
    b.mass_above += p.mass_above;
    b.count_at = p.count_here;
    prefix = (prefix << 10) | static_cast<uint32_t>(p.bin);
  }
  b.found = true;
  b.value = __uint_as_float(prefix);
  return b;
}

// Which tokens the draw sees: w >= min_w and (w > above, or w == tie_value and among the first
// tie_limit such ids).
struct KeepRule {
  float min_w;
  float above;
  float tie_value;  // -2: no tie group
  u64 tie_limit;
};

// --- the kernel --------------------------------------------------------------------------------------
// One block per row. logits: [rows, vocab]; tokens: [rows]; seg_mass: [rows, n_seg] and
// seg_ties: [rows, n_seg] (workspace): per segment of kSegment tokens, the mass of its kept tokens
// outside the tie group and the size of its part of the tie group.
__global__ __launch_bounds__(kThreads) void sample_kernel(const float* logits, int vocab, SamplingParams params,
                                                          int32_t* tokens, u64* seg_mass_all,
                                                          uint32_t* seg_ties_all) {
  __shared__ SampleShared sm;
  const int row = blockIdx.x;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const float temperature = params.temperature[row];
  const int top_k = params.top_k[row];
  const bool greedy_t = !(temperature >= kGreedyTemperature);  // <= 0, tiny or NaN
  Row r{logits + static_cast<int64_t>(row) * vocab, vocab, reinterpret_cast<uintptr_t>(logits) % 16 == 0 && vocab % 4 == 0,
        greedy_t ? 1.f : 1.f / temperature, 0.f};
  const ArgMax best = row_argmax(r, sm.argmax);
  // Greedy as the CPU sampler decides it (temperature 0 or top_k 1: argmax of the scaled row); also
  // a row whose max is +-inf, where softmax is undefined.
  if (greedy_t || top_k == 1 || !(best.value > -INFINITY && best.value < INFINITY)) {
    if (threadIdx.x == 0) tokens[row] = best.index;
    return;
  }
  r.max = best.value;

  // 1. The cut: top-k, then top-p on the top-k mass (a shorter prefix of the same order).
  KeepRule keep{0.f, -1.f, -2.f, 0};
  const float top_p = params.top_p[row];
  const bool topk_on = top_k > 0 && top_k < vocab, topp_on = top_p < 1.f;
  if (topk_on || topp_on) {
    histogram_pass(r, {kLowestLogWeight, 1.f}, 30, 0u, 20, sm.counts1, sm.masses1);
    const u64 k = topk_on ? static_cast<u64>(top_k) : 1;
    const Pick k_pick = select_bin(sm.counts1, sm.masses1, false, k, sm);
    u64 kept_mass = k_pick.mass_total;
    if (topk_on && k < k_pick.count_total) {
      const Boundary b = find_boundary(r, k_pick, false, k, sm);
      if (b.found) {
        const u64 ties = k - b.count_above;  // in [1, count_at]
        keep.above = keep.tie_value = b.value;
        keep.tie_limit = ties;
        kept_mass = b.mass_above + ties * fixed_mass(b.value);
      }
    }
    if (topp_on) {
      // The smallest prefix whose mass reaches top_p * kept_mass; since target <= kept_mass it ends
      // inside the top-k prefix, so searching the whole order is the same.
      double t = ceil(static_cast<double>(top_p) * static_cast<double>(kept_mass));
      u64 target = t >= 1.0 ? static_cast<u64>(t) : 1;
      if (target > kept_mass) target = kept_mass;
      const Pick p_pick = select_bin(sm.counts1, sm.masses1, true, target, sm);
      const Boundary b = find_boundary(r, p_pick, true, target, sm);
      if (b.found) {
        const u64 at = fixed_mass(b.value);  // >= 1: b.value >= kMinWeight
        u64 ties = (target - b.mass_above + at - 1) / at;
        ties = ties < 1 ? 1 : ties > b.count_at ? b.count_at : ties;
        keep.above = keep.tie_value = b.value;
        keep.tie_limit = ties;
      }
    }
  }
  // 2. min-p (w is relative to the max already); the max (w = 1) always stays.
  const float min_p = params.min_p[row];
  keep.min_w = fmaxf(kMinWeight, min_p > 0.f ? fminf(min_p, 1.f) : 0.f);
  const LogRange kept_range{logf(fmaxf(keep.min_w, keep.tie_value)) - kLogMargin, 1.f};

  // 3. Per segment: kept mass outside the tie group, and the tie group's members.
  const int n_seg = (vocab + kSegment - 1) / kSegment;
  u64* seg_mass = seg_mass_all + static_cast<int64_t>(row) * n_seg;
  uint32_t* seg_ties = seg_ties_all + static_cast<int64_t>(row) * n_seg;
  for (int s0 = warp; s0 < n_seg; s0 += kWarps * kUnroll) {
    float v[kUnroll][4];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) load4(r, (s0 + u * kWarps) * kSegment + 4 * lane, v[u]);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      u64 mass = 0;
      int ties = 0;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float w = weight(scale_logit(v[u][j], r.inv_t), r.max, kept_range.lo, kept_range.hi);
        if (!(w >= keep.min_w)) continue;
        if (w > keep.above) mass += fixed_mass(w);
        else if (w == keep.tie_value) ++ties;
      }
      mass = warp_sum_u64(mass);
      for (int o = kWarpSize / 2; o > 0; o >>= 1) ties += shfl_xor(ties, o);
      const int s = s0 + u * kWarps;
      if (lane == 0 && s < n_seg) seg_mass[s] = mass, seg_ties[s] = static_cast<uint32_t>(ties);
    }
  }
  __syncthreads();  // the segment sums are visible to the whole block

  // 4. Which segment the draw falls in: each thread scans a run of consecutive segments.
  const u64 tie_mass = keep.tie_value >= keep.min_w ? fixed_mass(keep.tie_value) : 0;
  auto kept_in = [&](int s, u64 ties_before) {  // the segment's kept mass, tie members included
    const u64 left = ties_before < keep.tie_limit ? keep.tie_limit - ties_before : 0;
    const u64 ties = seg_ties[s] < left ? seg_ties[s] : left;
    return seg_mass[s] + ties * tie_mass;
  };
  const int per_thread = (n_seg + kThreads - 1) / kThreads;
  const int s_begin = min(static_cast<int>(threadIdx.x) * per_thread, n_seg);
  const int s_end = min(s_begin + per_thread, n_seg);
  if (threadIdx.x == 0) sm.seg = -1;
  u64 my_ties = 0;
  for (int s = s_begin; s < s_end; ++s) my_ties += seg_ties[s];
  u64 all_ties;
  const u64 ties_before = block_exclusive_scan(my_ties, sm.scan, all_ties);
  u64 my_mass = 0, tb = ties_before;
  for (int s = s_begin; s < s_end; ++s) {
    my_mass += kept_in(s, tb);
    tb += seg_ties[s];
  }
  u64 total;
  const u64 mass_before = block_exclusive_scan(my_mass, sm.scan, total);
  // r = floor(uniform * total): the first token whose inclusive running mass exceeds r, as the
  // CPU's "first token where uniform * total - running mass < 0".
  const float uniform = params.uniform[row];
  const double u = uniform > 0.f ? static_cast<double>(uniform) : 0.0;
  u64 target = static_cast<u64>(u * static_cast<double>(total));
  if (target >= total) target = total > 0 ? total - 1 : 0;
  {
    u64 before = mass_before;
    tb = ties_before;
    for (int s = s_begin; s < s_end; ++s) {
      const u64 kept = kept_in(s, tb);
      if (before <= target && target - before < kept) sm.seg = s, sm.seg_before = before, sm.seg_ties_before = tb;
      before += kept;
      tb += seg_ties[s];
    }
  }
  __syncthreads();

  // 5. One warp walks that segment: the same kept masses, token by token in id order.
  if (warp != 0) return;
  int chosen = -1;
  const int s = sm.seg;
  if (s >= 0) {
    float v[4];
    const int first = s * kSegment + 4 * lane;
    load4(r, first, v);
    float w[4];
    int my_seg_ties = 0;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      w[j] = weight(scale_logit(v[j], r.inv_t), r.max, kept_range.lo, kept_range.hi);
      if (w[j] >= keep.min_w && !(w[j] > keep.above) && w[j] == keep.tie_value) ++my_seg_ties;
    }
    u64 tie_rank = sm.seg_ties_before + warp_inclusive_scan(static_cast<u64>(my_seg_ties)) - my_seg_ties;
    u64 mass[4], lane_mass = 0;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      mass[j] = 0;
      if (w[j] >= keep.min_w) {
        if (w[j] > keep.above) {
          mass[j] = fixed_mass(w[j]);
        } else if (w[j] == keep.tie_value) {
          if (tie_rank < keep.tie_limit) mass[j] = fixed_mass(w[j]);
          ++tie_rank;
        }
      }
      lane_mass += mass[j];
    }
    u64 before = sm.seg_before + warp_inclusive_scan(lane_mass) - lane_mass;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (before <= target && target - before < mass[j]) chosen = first + j;
      before += mass[j];
    }
  }
  chosen = warp_max_int(chosen);
  if (lane == 0) tokens[row] = chosen >= 0 ? chosen : best.index;  // no kept mass: cannot happen
}

// One block per row: the first maximum. logits: [rows, vocab]; tokens: [rows].
__global__ __launch_bounds__(kThreads) void argmax_kernel(const float* logits, int vocab, int32_t* tokens) {
  __shared__ ArgMax scratch[kWarps];
  const int row = blockIdx.x;
  const Row r{logits + static_cast<int64_t>(row) * vocab, vocab,
              reinterpret_cast<uintptr_t>(logits) % 16 == 0 && vocab % 4 == 0, 1.f, 0.f};
  const ArgMax best = row_argmax(r, scratch);
  if (threadIdx.x == 0) tokens[row] = best.index;
}

size_t segments(int vocab) { return (static_cast<size_t>(vocab) + kSegment - 1) / kSegment; }

void check_rows(const char* what, int rows, int vocab) {
  if (rows < 0 || vocab < 0) throw std::invalid_argument(std::string(what) + ": rows and vocab must be >= 0");
  if (rows > 0 && vocab == 0) throw std::invalid_argument(std::string(what) + ": vocab must be > 0");
  if (vocab > kMaxVocab)
    throw std::invalid_argument(std::string(what) + ": vocab " + std::to_string(vocab) + " is over the limit of " +
                                std::to_string(kMaxVocab));
}
void check_ptr(const char* what, const void* p, const char* name) {
  if (p == nullptr) throw std::invalid_argument(std::string(what) + ": " + name + " is null");
}

}  // namespace

size_t sample_workspace_bytes(int rows, int vocab) {
  if (rows <= 0 || vocab <= 0) return 0;
  return static_cast<size_t>(rows) * segments(vocab) * (sizeof(u64) + sizeof(uint32_t));
}

void sample(const float* logits, int rows, int vocab, const SamplingParams& params, int32_t* tokens,
            void* workspace, size_t workspace_bytes, gpuStream_t stream) {
  const char* what = "sample";
  check_rows(what, rows, vocab);
  if (rows == 0) return;
  check_ptr(what, logits, "logits");
  check_ptr(what, tokens, "tokens");
  check_ptr(what, params.temperature, "params.temperature");
  check_ptr(what, params.top_k, "params.top_k");
  check_ptr(what, params.top_p, "params.top_p");
  check_ptr(what, params.min_p, "params.min_p");
  check_ptr(what, params.uniform, "params.uniform");
  check_ptr(what, workspace, "workspace");
  const size_t need = sample_workspace_bytes(rows, vocab);
  if (workspace_bytes < need)
    throw std::invalid_argument("sample: workspace of " + std::to_string(workspace_bytes) + " bytes, " +
                                std::to_string(need) + " needed (sample_workspace_bytes)");
  if (reinterpret_cast<uintptr_t>(workspace) % alignof(u64) != 0)
    throw std::invalid_argument("sample: workspace must be 8-byte aligned");
  u64* seg_mass = static_cast<u64*>(workspace);
  uint32_t* seg_ties = reinterpret_cast<uint32_t*>(seg_mass + static_cast<size_t>(rows) * segments(vocab));
  sample_kernel<<<rows, kThreads, 0, stream>>>(logits, vocab, params, tokens, seg_mass, seg_ties);
  PYSERVE_GPU_CHECK_LAUNCH();
}

void argmax(const float* logits, int rows, int vocab, int32_t* tokens, gpuStream_t stream) {
  const char* what = "argmax";
  check_rows(what, rows, vocab);
  if (rows == 0) return;
  check_ptr(what, logits, "logits");
  check_ptr(what, tokens, "tokens");
  argmax_kernel<<<rows, kThreads, 0, stream>>>(logits, vocab, tokens);
  PYSERVE_GPU_CHECK_LAUNCH();
}

}  // namespace pyserve::gpu
