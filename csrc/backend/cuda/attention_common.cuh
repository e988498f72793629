#pragma once
// What the two attention kernels (attention_decode.cu, attention_prefill.cu) share: which keys a
// query attends to, where a key's row lives in the paged cache, loads of four cache values as
// float, and the host-side argument checks.
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "backend/cuda/attention.h"
#include "backend/cuda/gpu_compat.h"

namespace pyserve::gpu::attn {

// Split-K of the decode kernel: a split covers at least this many keys, and a token uses at most
// kMaxSplits of them (the combine kernel merges them).
constexpr int kMinSplitKeys = 256;
constexpr int kMaxSplits = 32;

// The most splits a context of max_context keys can use (1: no workspace needed).
inline int decode_split_limit(int64_t max_context) {
  if (max_context <= kMinSplitKeys) return 1;
  const int64_t want = (max_context + kMinSplitKeys - 1) / kMinSplitKeys;
  return static_cast<int>(want < kMaxSplits ? want : kMaxSplits);
}

// Bytes of one split's partial results for a batch: per (token, query head) head_dim unnormalised
// sums and (max, sum of exp).
inline size_t split_partial_bytes(int n_tokens, int n_heads, int head_dim) {
  return static_cast<size_t>(n_tokens) * static_cast<size_t>(n_heads) * (static_cast<size_t>(head_dim) + 2) *
         sizeof(float);
}

inline int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Throws std::invalid_argument unless `a` describes a batch the kernels can run (n_tokens > 0).
inline void check_batch(const PagedAttention& a, const char* who) {
  auto fail = [&](const std::string& why) { throw std::invalid_argument(std::string(who) + ": " + why); };
  if (a.n_heads <= 0 || a.n_kv_heads <= 0) fail("n_heads and n_kv_heads must be positive");
  if (a.n_heads % a.n_kv_heads != 0)
    fail("n_heads (" + std::to_string(a.n_heads) + ") must be a multiple of n_kv_heads (" +
         std::to_string(a.n_kv_heads) + ")");
  if (a.head_dim != 64 && a.head_dim != 128 && a.head_dim != 256)
    fail("head_dim " + std::to_string(a.head_dim) + " is not supported (64, 128 or 256)");
  if (a.page_size <= 0 || a.max_pages <= 0) fail("page_size and max_pages must be positive");
  if (a.window < 0 || a.sink < 0) fail("window and sink must be >= 0");
  if (!a.q || !a.out || !a.k_cache || !a.v_cache || !a.page_table || !a.token_seq || !a.positions)
    fail("a device pointer is null");
  const int64_t row = static_cast<int64_t>(a.n_heads) * a.head_dim;
  if (a.q_stride < row || a.out_stride < row) fail("q_stride and out_stride must be >= n_heads * head_dim");
  if (a.kv_type != KVType::F32 && a.kv_type != KVType::F16) fail("unknown KV cache type");
  // The kernels read four cache values at once (16 bytes of f32, 8 of f16).
  const uintptr_t align = a.kv_type == KVType::F32 ? 16 : 8;
  if (reinterpret_cast<uintptr_t>(a.k_cache) % align != 0 || reinterpret_cast<uintptr_t>(a.v_cache) % align != 0)
    fail("the K and V caches must be " + std::to_string(align) + "-byte aligned");
}

#if defined(__CUDACC__) || defined(__HIPCC__)

__device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }
__device__ __forceinline__ int imax(int a, int b) { return a > b ? a : b; }

// The positions one query attends to: [0, a_end) (the attention sink) and [b_lo, b_hi] (causal,
// possibly a sliding window), disjoint, a_end <= b_lo. A draft-tree leaf stops before its own
// position (b_hi = pos - 1) and attends to its own slot besides.
struct KeySpan {
  int a_end, b_lo, b_hi;
};

__device__ __forceinline__ KeySpan key_span(int pos, bool leaf, int window, int sink) {
  KeySpan s;
  s.b_hi = leaf ? pos - 1 : pos;
  s.b_lo = window > 0 ? imax(0, pos - window + 1) : 0;
  // A sink only matters with a window; the part of it inside the window is already in [b_lo, b_hi].
  s.a_end = (window > 0 && sink > 0) ? imin(sink, s.b_lo) : 0;
  return s;
}
__device__ __forceinline__ bool attends(const KeySpan& s, int j) { return j <= s.b_hi && (j >= s.b_lo || j < s.a_end); }

// Element offset of the head_dim values of KV head kvh at cache slot `slot`
// (layout [num_pages, n_kv_heads, page_size, head_dim]).
__device__ __forceinline__ int64_t slot_row(const PagedAttention& a, int64_t slot, int kvh) {
  const int64_t page = slot / a.page_size, off = slot % a.page_size;
  return ((page * a.n_kv_heads + kvh) * a.page_size + off) * a.head_dim;
}
// The same for position `pos` of the sequence whose page-table row is `seq`.
__device__ __forceinline__ int64_t position_row(const PagedAttention& a, int seq, int pos, int kvh) {
  const int64_t page = a.page_table[static_cast<int64_t>(seq) * a.max_pages + pos / a.page_size];
  return ((page * a.n_kv_heads + kvh) * a.page_size + pos % a.page_size) * a.head_dim;
}

// Four consecutive cache values as float (p 16-byte aligned for f32, 8-byte for f16).
__device__ __forceinline__ float4 load4(const float* p) { return *reinterpret_cast<const float4*>(p); }
__device__ __forceinline__ float4 load4(const uint16_t* p) {
  const uint2 u = *reinterpret_cast<const uint2*>(p);  // little-endian: element 0 is the low half of u.x
  return make_float4(f16_bits_to_float(static_cast<uint16_t>(u.x & 0xffffu)),
                     f16_bits_to_float(static_cast<uint16_t>(u.x >> 16)),
                     f16_bits_to_float(static_cast<uint16_t>(u.y & 0xffffu)),
                     f16_bits_to_float(static_cast<uint16_t>(u.y >> 16)));
}

__device__ __forceinline__ float dot4(const float4& a, const float4& b) {
  return a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w;
}
__device__ __forceinline__ void axpy4(float p, const float4& v, float4& acc) {
  acc.x += p * v.x;
  acc.y += p * v.y;
  acc.z += p * v.z;
  acc.w += p * v.w;
}
__device__ __forceinline__ void scale4(float s, float4& v) {
  v.x *= s;
  v.y *= s;
  v.z *= s;
  v.w *= s;
}

#endif

}  // namespace pyserve::gpu::attn
