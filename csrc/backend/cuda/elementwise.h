#pragma once
// Launchers of the small per-token kernels (norm.cu, rope_kv.cu, activation.cu, kv_copy.cu).
// Every pointer is device memory; every launch is asynchronous on `stream` and checks its launch.
// Shapes follow Backend (backend/backend.h): row-major, a row stride (ld*) where rows may be views
// into a wider buffer.
#include <cstdint>

#include "backend/cuda/gpu_compat.h"

namespace pyserve::gpu {

// The KV cache's element type. The layout of one layer's K (and, the same, V) block:
//   [num_pages, n_kv_heads, page_size, head_dim]
// so that one KV head's slice of a page is page_size * head_dim contiguous values (attention reads
// it in one sweep) and a page is one contiguous block (prefix-cache copies move whole pages).
// Slot s = page * page_size + offset.
enum class KVType { F32, F16 };

// --- norm.cu ---------------------------------------------------------------------------------------
// y: [m, dim] = x / rms(x) * weight   (rms over the row, float32 accumulation)
void rmsnorm(const float* x, int64_t ldx, const float* weight, int m, int dim, float eps, float* y, int64_t ldy,
             gpuStream_t stream);
// y: [m, dim] += x / rms(x) * weight   (Gemma's post-block norm before the residual add)
void rmsnorm_add(const float* x, int64_t ldx, const float* weight, int m, int dim, float eps, float* y,
                 int64_t ldy, gpuStream_t stream);
// Fused residual + norm: h: [m, dim] += delta, then y = h / rms(h) * weight (one pass over h).
void add_rmsnorm(float* h, int64_t ldh, const float* delta, int64_t ld_delta, const float* weight, int m, int dim,
                 float eps, float* y, int64_t ldy, gpuStream_t stream);
// In place on x: [m, n_heads, head_dim] at row stride ld; weight: [head_dim] shared by the heads.
void rmsnorm_heads(float* x, int64_t ld, int m, int n_heads, int head_dim, const float* weight, float eps,
                   gpuStream_t stream);

// --- rope_kv.cu ------------------------------------------------------------------------------------
// Rotate-half RoPE (HF Llama) on q: [m, n_heads, head_dim] and k: [m, n_kv_heads, head_dim] in place
// (both at row stride ld, k starting at q + q_dim as in a fused qkv row), with angle =
// float(positions[i]) * inv_freq[d] in float32 and cos/sin evaluated in double (as the CPU backend
// does), inv_freq: [head_dim / 2] (llama3 / linear scaling already folded in). Then stores the
// rotated k and v: [m, n_kv_heads, head_dim] (v at row stride ld too) at cache slots[i] of this
// layer's K and V blocks (layout above). One launch: RoPE fused with the KV write.
void rope_write_kv(float* q, float* k, const float* v, int64_t ld, int m, int n_heads, int n_kv_heads, int head_dim,
                   const int32_t* positions, const float* inv_freq, const int64_t* slots, int page_size,
                   void* k_cache, void* v_cache, KVType kv_type, gpuStream_t stream);
// RoPE only (no cache write), on x: [m, n_heads, head_dim] at row stride ld.
void rope(float* x, int64_t ld, int m, int n_heads, int head_dim, const int32_t* positions, const float* inv_freq,
          gpuStream_t stream);
// The KV write alone: k, v: [m, n_kv_heads, head_dim] at row stride ld to slots[i].
void write_kv(const float* k, const float* v, int64_t ld, int m, int n_kv_heads, int head_dim, const int64_t* slots,
              int page_size, void* k_cache, void* v_cache, KVType kv_type, gpuStream_t stream);

// --- activation.cu ---------------------------------------------------------------------------------
// out: [m, inter] = silu(gate_up[:, :inter]) * gate_up[:, inter:]   (gate_up: [m, 2 * inter])
void silu_mul(const float* gate_up, int m, int inter, float* out, gpuStream_t stream);
// out: [m, inter] = gelu_tanh(gate_up[:, :inter]) * gate_up[:, inter:]   (PyTorch's approximate="tanh")
void gelu_tanh_mul(const float* gate_up, int m, int inter, float* out, gpuStream_t stream);
// x: [n] *= s
void scale(float* x, int64_t n, float s, gpuStream_t stream);

// --- kv_copy.cu ------------------------------------------------------------------------------------
// For every layer: page dst[j] of K and of V becomes a copy of page src[j], j < n (prefix-cache
// forks and partial-page hits). `cache` is the whole cache: num_layers blocks of [K, V], each
// layer_elems elements of kv_type; page_elems = page_size * kv_dim.
void copy_pages(void* cache, KVType kv_type, int num_layers, int64_t layer_elems, int64_t page_elems,
                const int32_t* src, const int32_t* dst, int n, gpuStream_t stream);
// One layer: the K/V at slot src moves to slot dst (a kept draft-tree leaf).
void copy_kv_slot(void* k_cache, void* v_cache, KVType kv_type, int n_kv_heads, int head_dim, int page_size,
                  int64_t src, int64_t dst, gpuStream_t stream);

// --- copy_bandwidth.cu -----------------------------------------------------------------------------
// dst[i] = src[i] for n bytes (n a multiple of 16): the bandwidth peer of tools/bench_gpu.py.
void copy_bytes(const void* src, void* dst, int64_t n, gpuStream_t stream);

}  // namespace pyserve::gpu
