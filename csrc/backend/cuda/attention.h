#pragma once
// Paged attention on the device (attention_decode.cu, attention_prefill.cu).
#include <cstdint>

#include "backend/cuda/elementwise.h"  // KVType and the cache layout
#include "backend/cuda/gpu_compat.h"

namespace pyserve::gpu {

// A batch of query tokens, each attending over its own sequence in the paged cache. The same
// meaning as backend.h's AttentionBatch, with the per-token page-table pointers replaced by one
// padded table built once per step (all pointers are device memory):
struct PagedAttention {
  const float* q = nullptr;  // q: [n_tokens, n_heads, head_dim] at row stride q_stride
  int64_t q_stride = 0;
  int n_tokens = 0, n_heads = 0, n_kv_heads = 0, head_dim = 0;
  float scale = 1.f;
  const void* k_cache = nullptr;  // this layer's K and V: [num_pages, n_kv_heads, page_size, head_dim]
  const void* v_cache = nullptr;
  KVType kv_type = KVType::F32;
  int page_size = 0;
  const int32_t* page_table = nullptr;  // [n_seqs, max_pages]: row s is sequence s's pages
  int max_pages = 0;
  const int32_t* token_seq = nullptr;   // [n_tokens]: the page-table row of each token
  const int32_t* positions = nullptr;   // [n_tokens]: token i attends to its sequence's positions <= positions[i]
  int window = 0;  // > 0: only positions > positions[i] - window (sliding window)
  int sink = 0;    // with a window: positions [0, sink) too (attention sink)
  // null, or per token -1 / the cache slot of a draft-tree leaf's own K/V: a leaf attends to its
  // sequence's positions < positions[i] and to that slot instead of position positions[i].
  const int64_t* own_slots = nullptr;
  float* out = nullptr;  // out: [n_tokens, n_heads, head_dim] at row stride out_stride
  int64_t out_stride = 0;
};

// Workspace bytes attention() needs for a batch of n_tokens whose longest context is max_context
// (the split-K partial results); the caller owns it.
size_t attention_workspace_bytes(int n_tokens, int n_heads, int head_dim, int max_context);
// Chooses the kernel: decode (one query row per sequence, split-K over long contexts, GQA: a KV
// head's pages are read once for all its query heads) when every token of the batch is the only one
// of its sequence, else the tiled prefill kernel (causal, window, sink, tree leaves). Either is valid
// for any batch: the choice is speed only. head_dim: 64, 128 or 256.
void attention(const PagedAttention& a, void* workspace, size_t workspace_bytes, bool decode_only,
               gpuStream_t stream);
// The two kernels, for tests and benchmarks.
void attention_decode(const PagedAttention& a, void* workspace, size_t workspace_bytes, gpuStream_t stream);
void attention_prefill(const PagedAttention& a, gpuStream_t stream);

}  // namespace pyserve::gpu
