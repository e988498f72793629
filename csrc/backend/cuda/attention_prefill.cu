// Paged attention, tiled prefill kernel (flash-attention's online softmax, in float32 on the CUDA
// cores). One block per (tile of consecutive batch tokens, KV head, chunk of that KV head's query
// heads): its query rows (token, head) stay in shared memory while tiles of keys stream through.
// The batch's tokens are arbitrary, so the block walks its tokens in *runs*: consecutive tokens of
// one sequence (a prefill chunk: one run for the whole tile, its keys loaded once for all its rows),
// or a single draft-tree leaf (its path, then its own slot as a one-key tile). Every row keeps its
// own mask (causal, window, sink), so any positions are handled.
#include <algorithm>
#include <climits>
#include <cmath>

#include "backend/cuda/attention.h"
#include "backend/cuda/attention_common.cuh"

namespace pyserve::gpu {

namespace {

using namespace attn;

constexpr int kPrefillThreads = 128;

// hipcc unrolls the score loop over head_dim completely and spills at head_dim 256 on gfx90a;
// nvcc's own choice spills nothing.
#ifdef PYSERVE_GPU_HIP
#define PREFILL_SCORE_UNROLL _Pragma("unroll 4")
#else
#define PREFILL_SCORE_UNROLL
#endif

// Query rows (token, head) and keys per tile: shared memory stays under 48 KiB (AMD's LDS is 64).
template <int HD>
struct PrefillShape;
template <>
struct PrefillShape<64> {
  static constexpr int kRows = 64, kKeys = 32;
};
template <>
struct PrefillShape<128> {
  static constexpr int kRows = 32, kKeys = 32;
};
template <>
struct PrefillShape<256> {
  static constexpr int kRows = 16, kKeys = 16;
};

struct PrefillArgs {
  PagedAttention a;
  int group;             // query heads per KV head
  int head_chunk;        // query heads per block (the last chunk may have fewer)
  int n_chunks;          // blocks per KV head: ceil(group / head_chunk)
  int tokens_per_block;  // kRows / head_chunk
};

// Grid: (ceil(n_tokens / tokens_per_block), n_kv_heads * n_chunks). Row r of a block is token
// r / head_chunk, query head g0 + r % head_chunk.
template <int HD, typename KV>
__global__ void __launch_bounds__(kPrefillThreads) prefill_kernel(const PrefillArgs p) {
  constexpr int R = PrefillShape<HD>::kRows, TK = PrefillShape<HD>::kKeys;
  constexpr int kChunks = HD / 4;  // four-value chunks in a row
  constexpr int kPitch4 = kChunks + 1;  // float4s per shared row: 8 rows read at once hit 8 bank groups
  // Scores: a thread holds RM rows x KM keys (keys kl + 8 kk, rows rl + 16 rr).
  constexpr int KM = TK / 8, RM = R / (kPrefillThreads / 8);
  // P.V: a thread holds RM2 rows x DM chunks (chunks dl + DT dm, rows rl2 + RTH rr).
  constexpr int DT = kChunks < 32 ? kChunks : 32, DM = kChunks / DT;
  constexpr int RTH = kPrefillThreads / DT, RM2 = R / RTH;
  static_assert(KM >= 1 && RM >= 1 && RM2 >= 1 && DM >= 1 && R % RTH == 0 && kChunks % DT == 0, "shapes");

  __shared__ float4 q_s[R * kPitch4];    // q_s: [R, HD] (row pitch kPitch4 float4s)
  __shared__ float4 kv_s[TK * kPitch4];  // the tile's K, then its V: [TK, HD]
  __shared__ float s_s[R][TK + 1];       // scores, then exp(score - max)
  __shared__ float m_s[R], l_s[R], alpha_s[R];  // per row: running max, sum of exp, rescale
  __shared__ int64_t row_s[TK];                 // cache offset of each tile key's row
  __shared__ int tok_seq_s[R];
  __shared__ int64_t tok_own_s[R];
  __shared__ KeySpan tok_span_s[R];

  const PagedAttention& a = p.a;
  const int tid = threadIdx.x;
  const int t0 = blockIdx.x * p.tokens_per_block;
  const int n_tok = imin(p.tokens_per_block, a.n_tokens - t0);
  const int kvh = blockIdx.y / p.n_chunks;
  const int g0 = (blockIdx.y % p.n_chunks) * p.head_chunk;
  const int n_g = imin(p.head_chunk, p.group - g0);
  const int head0 = kvh * p.group + g0;  // first query head of the block
  auto row_token = [&](int r) { return r / p.head_chunk; };
  auto row_valid = [&](int r) { return row_token(r) < n_tok && r % p.head_chunk < n_g; };

  if (tid < n_tok) {
    const int t = t0 + tid;
    const int64_t own = a.own_slots ? a.own_slots[t] : -1;
    tok_seq_s[tid] = a.token_seq[t];
    tok_own_s[tid] = own;
    tok_span_s[tid] = key_span(a.positions[t], own >= 0, a.window, a.sink);
  }
  float* q_f = reinterpret_cast<float*>(q_s);
  for (int i = tid; i < R * HD; i += kPrefillThreads) {
    const int r = i / HD, e = i % HD;
    q_f[r * 4 * kPitch4 + e] =
        row_valid(r) ? a.q[(t0 + row_token(r)) * a.q_stride + static_cast<int64_t>(head0 + r % p.head_chunk) * HD + e]
                     : 0.f;
  }
  if (tid < R) {
    m_s[tid] = -INFINITY;
    l_s[tid] = 0.f;
  }
  __syncthreads();

  const KV* k_cache = static_cast<const KV*>(a.k_cache);
  const KV* v_cache = static_cast<const KV*>(a.v_cache);
  const int kl = tid % 8, rl = tid / 8;      // score phase
  const int dl = tid % DT, rl2 = tid / DT;   // P.V phase
  float4 acc[RM2][DM];
#pragma unroll
  for (int rr = 0; rr < RM2; ++rr)
#pragma unroll
    for (int dm = 0; dm < DM; ++dm) acc[rr][dm] = make_float4(0.f, 0.f, 0.f, 0.f);

  // Loads TK rows of `cache` (row_s; -1: zeros) into kv_s.
  auto load_tile = [&](const KV* cache) {
    for (int i = tid; i < TK * kChunks; i += kPrefillThreads) {
      const int k = i / kChunks, c = i % kChunks;
      const int64_t row = row_s[k];
      kv_s[k * kPitch4 + c] = row >= 0 ? load4(cache + row + 4 * c) : make_float4(0.f, 0.f, 0.f, 0.f);
    }
  };

  for (int ra = 0; ra < n_tok;) {
    // The run [ra, rb): one leaf, or consecutive non-leaf tokens of one sequence.
    const bool leaf_run = tok_own_s[ra] >= 0;
    int rb = ra + 1;
    if (!leaf_run)
      while (rb < n_tok && tok_seq_s[rb] == tok_seq_s[ra] && tok_own_s[rb] < 0) ++rb;
    const int seq = tok_seq_s[ra];
    int hi = -1, lo = INT_MAX, a_end = 0;  // the keys any row of the run attends to
    for (int x = ra; x < rb; ++x) {
      hi = imax(hi, tok_span_s[x].b_hi);
      lo = imin(lo, tok_span_s[x].b_lo);
      a_end = imax(a_end, tok_span_s[x].a_end);
    }
    // Three segments of keys: the sink [0, a_end), the causal range [max(lo, a_end), hi], and a
    // leaf's own slot (one key). Rows mask what they do not attend to.
    for (int seg = 0; seg < 3; ++seg) {
      const int seg_begin = seg == 1 ? imax(lo, a_end) : 0;
      const int seg_end = seg == 0 ? a_end : seg == 1 ? hi + 1 : (leaf_run ? 1 : 0);
      for (int kb = seg_begin; kb < seg_end; kb += TK) {
        const int n = imin(TK, seg_end - kb);
        if (tid < TK)
          row_s[tid] = tid >= n ? -1 : seg == 2 ? slot_row(a, tok_own_s[ra], kvh) : position_row(a, seq, kb + tid, kvh);
        __syncthreads();
        load_tile(k_cache);
        __syncthreads();
        // 1. Scores of the block's rows against the tile; rows outside the run and keys a row does
        //    not attend to get -inf.
        {
          float s[RM][KM];
#pragma unroll
          for (int rr = 0; rr < RM; ++rr)
#pragma unroll
            for (int kk = 0; kk < KM; ++kk) s[rr][kk] = 0.f;
          PREFILL_SCORE_UNROLL
          for (int c = 0; c < kChunks; ++c) {
            float4 qv[RM], kv[KM];
#pragma unroll
            for (int rr = 0; rr < RM; ++rr) qv[rr] = q_s[(rl + 16 * rr) * kPitch4 + c];
#pragma unroll
            for (int kk = 0; kk < KM; ++kk) kv[kk] = kv_s[(kl + 8 * kk) * kPitch4 + c];
#pragma unroll
            for (int rr = 0; rr < RM; ++rr)
#pragma unroll
              for (int kk = 0; kk < KM; ++kk) s[rr][kk] += dot4(qv[rr], kv[kk]);
          }
#pragma unroll
          for (int rr = 0; rr < RM; ++rr) {
            const int r = rl + 16 * rr;
            const int tl = row_token(r);
            const bool in_run = row_valid(r) && tl >= ra && tl < rb;
#pragma unroll
            for (int kk = 0; kk < KM; ++kk) {
              const int k = kl + 8 * kk;
              const bool ok = in_run && k < n && (seg == 2 || attends(tok_span_s[tl], kb + k));
              s_s[r][k] = ok ? s[rr][kk] * a.scale : -INFINITY;
            }
          }
        }
        __syncthreads();
        // 2. The tile's V into kv_s; meanwhile the online softmax, a thread per row. A row with no
        //    key yet keeps max -inf: its exps and rescale are 0 (m_use avoids -inf - -inf).
        load_tile(v_cache);
        if (tid < R) {
          float mx = -INFINITY;
#pragma unroll
          for (int k = 0; k < TK; ++k) mx = fmaxf(mx, s_s[tid][k]);
          const float m_old = m_s[tid];
          const float m_new = fmaxf(m_old, mx);
          const float m_use = m_new == -INFINITY ? 0.f : m_new;
          float sum = 0.f;
#pragma unroll
          for (int k = 0; k < TK; ++k) {
            const float e = expf(s_s[tid][k] - m_use);
            s_s[tid][k] = e;
            sum += e;
          }
          const float alpha = expf(m_old - m_use);
          alpha_s[tid] = alpha;
          l_s[tid] = l_s[tid] * alpha + sum;
          m_s[tid] = m_new;
        }
        __syncthreads();
        // 3. acc = acc * alpha + P.V (keys past n: p = 0 and v = 0).
#pragma unroll
        for (int rr = 0; rr < RM2; ++rr) {
          const float alpha = alpha_s[rl2 + RTH * rr];
#pragma unroll
          for (int dm = 0; dm < DM; ++dm) scale4(alpha, acc[rr][dm]);
        }
        for (int k = 0; k < TK; ++k) {
          float pr[RM2];
#pragma unroll
          for (int rr = 0; rr < RM2; ++rr) pr[rr] = s_s[rl2 + RTH * rr][k];
#pragma unroll
          for (int dm = 0; dm < DM; ++dm) {
            const float4 v = kv_s[k * kPitch4 + dl + DT * dm];
#pragma unroll
            for (int rr = 0; rr < RM2; ++rr) axpy4(pr[rr], v, acc[rr][dm]);
          }
        }
        __syncthreads();  // kv_s, s_s and row_s are rewritten by the next tile
      }
    }
    ra = rb;
  }

  // Every valid row attended to at least one key (its own position or its own slot): l > 0.
#pragma unroll
  for (int rr = 0; rr < RM2; ++rr) {
    const int r = rl2 + RTH * rr;
    if (!row_valid(r)) continue;
    const float inv = 1.f / l_s[r];
    float* o = a.out + (t0 + row_token(r)) * a.out_stride + static_cast<int64_t>(head0 + r % p.head_chunk) * HD;
#pragma unroll
    for (int dm = 0; dm < DM; ++dm) {
      const int c = dl + DT * dm;
      o[4 * c] = acc[rr][dm].x * inv;
      o[4 * c + 1] = acc[rr][dm].y * inv;
      o[4 * c + 2] = acc[rr][dm].z * inv;
      o[4 * c + 3] = acc[rr][dm].w * inv;
    }
  }
}

template <typename KV>
void launch_prefill(const PrefillArgs& p, dim3 grid, gpuStream_t stream) {
  switch (p.a.head_dim) {
    case 64: prefill_kernel<64, KV><<<grid, kPrefillThreads, 0, stream>>>(p); break;
    case 128: prefill_kernel<128, KV><<<grid, kPrefillThreads, 0, stream>>>(p); break;
    default: prefill_kernel<256, KV><<<grid, kPrefillThreads, 0, stream>>>(p); break;
  }
}

int prefill_rows(int head_dim) {
  switch (head_dim) {
    case 64: return PrefillShape<64>::kRows;
    case 128: return PrefillShape<128>::kRows;
    default: return PrefillShape<256>::kRows;
  }
}

}  // namespace

void attention_prefill(const PagedAttention& a, gpuStream_t stream) {
  if (a.n_tokens < 0) throw std::invalid_argument("attention_prefill: n_tokens must be >= 0");
  if (a.n_tokens == 0) return;
  check_batch(a, "attention_prefill");
  const int rows = prefill_rows(a.head_dim);
  PrefillArgs p{};
  p.a = a;
  p.group = a.n_heads / a.n_kv_heads;
  p.n_chunks = ceil_div(p.group, rows);
  p.head_chunk = ceil_div(p.group, p.n_chunks);
  p.tokens_per_block = rows / p.head_chunk;
  const dim3 grid(static_cast<unsigned>(ceil_div(a.n_tokens, p.tokens_per_block)),
                  static_cast<unsigned>(a.n_kv_heads * p.n_chunks));
  if (a.kv_type == KVType::F32)
    launch_prefill<float>(p, grid, stream);
  else
    launch_prefill<uint16_t>(p, grid, stream);
  PYSERVE_GPU_CHECK_LAUNCH();
}

}  // namespace pyserve::gpu
