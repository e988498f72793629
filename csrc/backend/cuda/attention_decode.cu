// Paged attention, decode kernel (flash-decoding). One block per (token, KV head, chunk of that KV
// head's query heads, split of the token's keys): the block reads each of its keys' K and V rows
// once for all its query heads (GQA), keeps an online softmax per query head, and either writes
// the normalised output (one split) or its partial (sum, max, sum of exp) to the workspace, which
// a second kernel merges. Valid for any batch; fastest when each token is its sequence's only one.
#include <algorithm>
#include <cmath>
#include <map>
#include <mutex>

#include "backend/cuda/attention.h"
#include "backend/cuda/attention_common.cuh"
#include "backend/cuda/reduce.cuh"

namespace pyserve::gpu {

namespace {

using namespace attn;

constexpr int kDecodeThreads = 128;
constexpr int kLanesPerKey = 8;                            // lanes that share one key's dot products
constexpr int kKeySlots = kDecodeThreads / kLanesPerKey;  // keys whose K rows are read at once
constexpr int kMaxGroup = 8;                               // query heads per block at most

struct DecodeArgs {
  PagedAttention a;
  int group;       // query heads per KV head
  int head_chunk;  // query heads per block (the last chunk may have fewer)
  int n_chunks;    // blocks per KV head: ceil(group / head_chunk)
  int splits;      // blocks per (token, KV head, chunk) along the keys
  float* part_out;    // part_out: [n_tokens, n_heads, splits, head_dim] unnormalised sums (splits > 1)
  float* part_stats;  // part_stats: [n_tokens, n_heads, splits, 2] (max score, sum of exp(score - max))
};

// Grid: (n_tokens, n_kv_heads * n_chunks, splits); GMAX >= head_chunk.
template <int HD, typename KV, int GMAX>
__global__ void __launch_bounds__(kDecodeThreads) decode_split_kernel(const DecodeArgs d) {
  constexpr int kKeysPerSlot = 256 / HD;                  // 4, 2, 1: 32 K values in registers per lane
  constexpr int kTile = kKeySlots * kKeysPerSlot;         // keys per tile: 64, 32, 16
  constexpr int kChunks = HD / 4;                         // four-value chunks in a row
  constexpr int kLaneChunks = kChunks / kLanesPerKey;     // a lane's chunks of a K row: 2, 4, 8
  constexpr int kParts = kDecodeThreads / kChunks;        // V phase: threads per chunk (key partitions)
  constexpr int kVPerThread = kTile / kParts;             // V rows a thread reads per tile (8)
  constexpr int kWarps = kDecodeThreads / kWarpSize;
  static_assert(kChunks % kLanesPerKey == 0 && kDecodeThreads % kChunks == 0 && kTile % kParts == 0, "shapes");

  __shared__ float4 q_s[GMAX][kChunks];        // the block's query heads
  __shared__ float p_s[GMAX][kTile];           // scores, then exp(score - max), of the tile
  __shared__ int64_t row_s[kTile];             // cache offset of each tile key's row
  __shared__ float m_s[GMAX], l_s[GMAX], alpha_s[GMAX];  // running max, sum of exp, rescale
  __shared__ float4 red_s[kParts][GMAX][kChunks];        // partitions' sums at the end

  const PagedAttention& a = d.a;
  const int tid = threadIdx.x;
  const int t = blockIdx.x;
  const int kvh = blockIdx.y / d.n_chunks;
  const int g0 = (blockIdx.y % d.n_chunks) * d.head_chunk;
  const int n_g = imin(d.head_chunk, d.group - g0);
  const int head0 = kvh * d.group + g0;  // first query head of the block
  const int split = blockIdx.z;

  const int seq = a.token_seq[t];
  const int pos = a.positions[t];
  const int64_t own = a.own_slots ? a.own_slots[t] : -1;
  const KeySpan span = key_span(pos, own >= 0, a.window, a.sink);
  // The token's keys as one index range [0, n_keys): the sink part, the causal part, its own slot.
  const int a_len = span.a_end;
  const int b_len = imax(0, span.b_hi - span.b_lo + 1);
  const int n_keys = a_len + b_len + (own >= 0 ? 1 : 0);
  const int per_split = ((imax((n_keys + d.splits - 1) / d.splits, kMinSplitKeys) + kTile - 1) / kTile) * kTile;
  const int begin = split * per_split;
  const int end = imin(n_keys, begin + per_split);
  if (begin >= end) {  // a short context's unused split (only when splits > 1): an empty part
    if (tid < n_g) {
      const int64_t at = (static_cast<int64_t>(t) * a.n_heads + head0 + tid) * d.splits + split;
      d.part_stats[2 * at] = -INFINITY;
      d.part_stats[2 * at + 1] = 0.f;
    }
    return;
  }

  for (int i = tid; i < GMAX * HD; i += kDecodeThreads) {
    const int g = i / HD, e = i % HD;
    reinterpret_cast<float*>(&q_s[0][0])[i] =
        g < n_g ? a.q[t * a.q_stride + static_cast<int64_t>(head0 + g) * HD + e] : 0.f;
  }
  if (tid < GMAX) {
    m_s[tid] = -INFINITY;
    l_s[tid] = 0.f;
  }
  __syncthreads();

  const KV* k_cache = static_cast<const KV*>(a.k_cache);
  const KV* v_cache = static_cast<const KV*>(a.v_cache);
  auto key_row = [&](int i) -> int64_t {
    if (i < a_len) return position_row(a, seq, i, kvh);
    if (i < a_len + b_len) return position_row(a, seq, span.b_lo + (i - a_len), kvh);
    return slot_row(a, own, kvh);
  };

  const int lane = tid % kLanesPerKey, key_slot = tid / kLanesPerKey;  // score phase
  const int chunk = tid % kChunks, part = tid / kChunks;               // V phase
  const int warp = tid / kWarpSize, warp_lane = tid % kWarpSize;       // softmax phase
  float4 acc[GMAX];
#pragma unroll
  for (int g = 0; g < GMAX; ++g) acc[g] = make_float4(0.f, 0.f, 0.f, 0.f);

  for (int i0 = begin; i0 < end; i0 += kTile) {
    const int n = imin(kTile, end - i0);
    // 1. Scores: 8 lanes per key, each holding an eighth of its K row in registers; every query
    //    head of the block against it, the partial dots summed across the 8 lanes.
    float4 k_reg[kKeysPerSlot][kLaneChunks];
#pragma unroll
    for (int kk = 0; kk < kKeysPerSlot; ++kk) {
      const int k = key_slot + kKeySlots * kk;
      const int64_t row = k < n ? key_row(i0 + k) : -1;
      if (lane == 0) row_s[k] = row;
#pragma unroll
      for (int c = 0; c < kLaneChunks; ++c)
        k_reg[kk][c] = row >= 0 ? load4(k_cache + row + 4 * (lane + kLanesPerKey * c)) : make_float4(0.f, 0.f, 0.f, 0.f);
    }
#pragma unroll
    for (int kk = 0; kk < kKeysPerSlot; ++kk) {
      const int k = key_slot + kKeySlots * kk;
#pragma unroll
      for (int g = 0; g < GMAX; ++g) {
        if (g < n_g) {  // the same for the whole block: the shuffles below see every lane
          float dot = 0.f;
#pragma unroll
          for (int c = 0; c < kLaneChunks; ++c) dot += dot4(q_s[g][lane + kLanesPerKey * c], k_reg[kk][c]);
#pragma unroll
          for (int o = kLanesPerKey / 2; o > 0; o >>= 1) dot += shfl_xor(dot, o);
          if (lane == 0) p_s[g][k] = k < n ? dot * a.scale : -INFINITY;
        }
      }
    }
    __syncthreads();
    // 2. Online softmax, one warp per query head: every key of the tile is attended (finite score).
    for (int g = warp; g < n_g; g += kWarps) {
      float mx = -INFINITY;
      for (int k = warp_lane; k < n; k += kWarpSize) mx = fmaxf(mx, p_s[g][k]);
      mx = warp_max(mx);
      const float m_old = m_s[g];
      const float m_new = fmaxf(m_old, mx);
      float sum = 0.f;
      for (int k = warp_lane; k < n; k += kWarpSize) {
        const float e = expf(p_s[g][k] - m_new);
        p_s[g][k] = e;
        sum += e;
      }
      sum = warp_sum(sum);
      if (warp_lane == 0) {
        const float alpha = expf(m_old - m_new);  // 0 on the first tile (m_old = -inf)
        alpha_s[g] = alpha;
        l_s[g] = l_s[g] * alpha + sum;
        m_s[g] = m_new;
      }
    }
    __syncthreads();
    // 3. acc = acc * alpha + sum_k p_k v_k, a thread per (four-value chunk, key partition).
    float4 v_reg[kVPerThread];
#pragma unroll
    for (int j = 0; j < kVPerThread; ++j) {
      const int k = part + kParts * j;
      v_reg[j] = k < n ? load4(v_cache + row_s[k] + 4 * chunk) : make_float4(0.f, 0.f, 0.f, 0.f);
    }
#pragma unroll
    for (int g = 0; g < GMAX; ++g) {
      if (g < n_g) {
        scale4(alpha_s[g], acc[g]);
#pragma unroll
        for (int j = 0; j < kVPerThread; ++j) {
          const int k = part + kParts * j;
          if (k < n) axpy4(p_s[g][k], v_reg[j], acc[g]);  // p_s past n holds -inf scores
        }
      }
    }
    __syncthreads();  // p_s and row_s are rewritten by the next tile
  }

  // The partitions' sums, added up; then the output (one split) or this split's part.
#pragma unroll
  for (int g = 0; g < GMAX; ++g) red_s[part][g][chunk] = acc[g];
  __syncthreads();
  for (int i = tid; i < n_g * HD; i += kDecodeThreads) {
    const int g = i / HD, e = i % HD;
    float s = 0.f;
#pragma unroll
    for (int p = 0; p < kParts; ++p) s += reinterpret_cast<const float*>(&red_s[p][g][0])[e];
    const int h = head0 + g;
    if (d.splits == 1) {
      a.out[t * a.out_stride + static_cast<int64_t>(h) * HD + e] = s / l_s[g];
    } else {
      const int64_t at = (static_cast<int64_t>(t) * a.n_heads + h) * d.splits + split;
      d.part_out[at * HD + e] = s;
      if (e == 0) {
        d.part_stats[2 * at] = m_s[g];
        d.part_stats[2 * at + 1] = l_s[g];
      }
    }
  }
}

// out = sum_s w_s sum_s_out / sum_s w_s l_s, w_s = exp(m_s - max_s m_s), over the splits with keys.
// Grid: (n_tokens, n_heads); block: head_dim threads.
__global__ void combine_splits_kernel(const DecodeArgs d) {
  const PagedAttention& a = d.a;
  const int t = blockIdx.x, h = blockIdx.y;
  const int64_t base = (static_cast<int64_t>(t) * a.n_heads + h) * d.splits;
  float m = -INFINITY;
  for (int s = 0; s < d.splits; ++s)
    if (d.part_stats[2 * (base + s) + 1] > 0.f) m = fmaxf(m, d.part_stats[2 * (base + s)]);
  for (int e = threadIdx.x; e < a.head_dim; e += blockDim.x) {
    float num = 0.f, den = 0.f;
    for (int s = 0; s < d.splits; ++s) {
      const float l = d.part_stats[2 * (base + s) + 1];
      if (l == 0.f) continue;  // an empty split: its sums were never written
      const float w = expf(d.part_stats[2 * (base + s)] - m);
      num += w * d.part_out[(base + s) * a.head_dim + e];
      den += w * l;
    }
    a.out[t * a.out_stride + static_cast<int64_t>(h) * a.head_dim + e] = num / den;
  }
}

template <int HD, typename KV>
void launch_split(const DecodeArgs& d, dim3 grid, gpuStream_t stream) {
  if (d.head_chunk <= 1)
    decode_split_kernel<HD, KV, 1><<<grid, kDecodeThreads, 0, stream>>>(d);
  else if (d.head_chunk <= 2)
    decode_split_kernel<HD, KV, 2><<<grid, kDecodeThreads, 0, stream>>>(d);
  else if (d.head_chunk <= 4)
    decode_split_kernel<HD, KV, 4><<<grid, kDecodeThreads, 0, stream>>>(d);
  else
    decode_split_kernel<HD, KV, kMaxGroup><<<grid, kDecodeThreads, 0, stream>>>(d);
}

template <typename KV>
void launch_split(const DecodeArgs& d, dim3 grid, gpuStream_t stream) {
  switch (d.a.head_dim) {
    case 64: launch_split<64, KV>(d, grid, stream); break;
    case 128: launch_split<128, KV>(d, grid, stream); break;
    default: launch_split<256, KV>(d, grid, stream); break;
  }
}

// Streaming multiprocessors (compute units) of the current device, asked once per device.
int multiprocessor_count() {
  int device = 0;
  PYSERVE_GPU_CHECK(gpuGetDevice(&device));
  static std::mutex mutex;
  static std::map<int, int> counts;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = counts.find(device);
  if (it != counts.end()) return it->second;
  gpuDeviceProp prop{};
  PYSERVE_GPU_CHECK(gpuGetDeviceProperties(&prop, device));
  counts[device] = std::max(1, prop.multiProcessorCount);
  return counts[device];
}

}  // namespace

void attention_decode(const PagedAttention& a, void* workspace, size_t workspace_bytes, gpuStream_t stream) {
  if (a.n_tokens < 0) throw std::invalid_argument("attention_decode: n_tokens must be >= 0");
  if (a.n_tokens == 0) return;
  check_batch(a, "attention_decode");
  DecodeArgs d{};
  d.a = a;
  d.group = a.n_heads / a.n_kv_heads;
  d.n_chunks = ceil_div(d.group, kMaxGroup);
  d.head_chunk = ceil_div(d.group, d.n_chunks);
  // Splits: enough for the longest context the page table holds, only while the other grid
  // dimensions leave the device idle, and as many as the workspace holds.
  const int64_t blocks = static_cast<int64_t>(a.n_tokens) * a.n_kv_heads * d.n_chunks;
  const int64_t want_blocks = 4 * static_cast<int64_t>(multiprocessor_count());
  int splits = decode_split_limit(static_cast<int64_t>(a.max_pages) * a.page_size);
  splits = static_cast<int>(std::min<int64_t>(splits, std::max<int64_t>(1, (want_blocks + blocks - 1) / blocks)));
  const size_t per_split = split_partial_bytes(a.n_tokens, a.n_heads, a.head_dim);
  if (workspace == nullptr) workspace_bytes = 0;
  splits = static_cast<int>(std::min<size_t>(static_cast<size_t>(splits), workspace_bytes / per_split));
  d.splits = std::max(1, splits);
  if (d.splits > 1) {
    // part_out first, then part_stats
    d.part_out = static_cast<float*>(workspace);
    d.part_stats = d.part_out + static_cast<size_t>(a.n_tokens) * a.n_heads * d.splits * a.head_dim;
  }
  const dim3 grid(static_cast<unsigned>(a.n_tokens), static_cast<unsigned>(a.n_kv_heads * d.n_chunks),
                  static_cast<unsigned>(d.splits));
  if (a.kv_type == KVType::F32)
    launch_split<float>(d, grid, stream);
  else
    launch_split<uint16_t>(d, grid, stream);
  PYSERVE_GPU_CHECK_LAUNCH();
  if (d.splits > 1) {
    combine_splits_kernel<<<dim3(static_cast<unsigned>(a.n_tokens), static_cast<unsigned>(a.n_heads)),
                            static_cast<unsigned>(a.head_dim), 0, stream>>>(d);
    PYSERVE_GPU_CHECK_LAUNCH();
  }
}

}  // namespace pyserve::gpu
