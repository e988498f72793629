// Rotary position embedding and the paged KV cache's writer: rope, write_kv and the two fused
// (rope_write_kv). One kernel serves all three: one block per token, which
//   1. evaluates the token's cos/sin table once into shared memory ([head_dim / 2], in double as
//      the CPU path does in model/llama.cpp, then rounded to float),
//   2. rotates its q heads and k heads in place, a thread per (head, d < half) pair, consecutive
//      threads on consecutive d (coalesced), writing each rotated k pair to the cache as well,
//   3. copies its v (and, without RoPE, its k) to the cache.
// Cache layout (elementwise.h): [num_pages, n_kv_heads, page_size, head_dim], slot = page *
// page_size + offset, so one token's head vector is head_dim contiguous values.
#include <stdexcept>
#include <string>

#include "backend/cuda/elementwise.h"

namespace pyserve::gpu {
namespace {

constexpr int kThreads = 256;

template <bool kF16>
__device__ __forceinline__ void store_kv(void* cache, int64_t index, float value) {
  if constexpr (kF16) {
    static_cast<uint16_t*>(cache)[index] = float_to_f16_bits(value);  // round to nearest even
  } else {
    static_cast<float*>(cache)[index] = value;
  }
}

// q: [m, n_heads, head_dim], k and v: [m, n_kv_heads, head_dim], all at row stride ld (q and k may
// be two column ranges of one fused row). kRope: rotate q and k; kStore: write k and v to the
// cache at slots[i] (a negative slot is a padding token: nothing is written for it).
template <bool kRope, bool kStore, bool kF16>
__global__ void rope_kv_kernel(float* q, float* k, const float* v, int64_t ld, int n_heads, int n_kv_heads,
                               int head_dim, const int32_t* positions, const float* inv_freq, const int64_t* slots,
                               int page_size, void* k_cache, void* v_cache) {
  extern __shared__ float cos_sin[];  // [2, half]: cos then sin of this token's angles
  const int64_t token = blockIdx.x;
  const int half = head_dim / 2;
  // Cache index of (this token, kv head h, d) = base(h) + d.
  int64_t page = 0, offset = 0;
  bool store = kStore;
  if constexpr (kStore) {
    const int64_t slot = slots[token];
    store = slot >= 0;
    page = slot / page_size;
    offset = slot % page_size;
  }
  auto cache_base = [&](int h) { return ((page * n_kv_heads + h) * page_size + offset) * head_dim; };

  if constexpr (kRope) {
    float* cos_t = cos_sin;
    float* sin_t = cos_sin + half;
    const float position = static_cast<float>(positions[token]);
    for (int d = threadIdx.x; d < half; d += blockDim.x) {
      const float angle = position * inv_freq[d];  // float32, as HF computes it
      cos_t[d] = static_cast<float>(cos(static_cast<double>(angle)));
      sin_t[d] = static_cast<float>(sin(static_cast<double>(angle)));
    }
    __syncthreads();
    const int n_pairs = (n_heads + n_kv_heads) * half;
    for (int t = threadIdx.x; t < n_pairs; t += blockDim.x) {
      const int head = t / half, d = t - head * half;  // heads [0, n_heads) are q's, the rest k's
      const bool is_k = head >= n_heads;
      float* x = is_k ? k + token * ld + static_cast<int64_t>(head - n_heads) * head_dim
                      : q + token * ld + static_cast<int64_t>(head) * head_dim;
      const float x0 = x[d], x1 = x[d + half];
      const float c = cos_t[d], s = sin_t[d];
      const float y0 = x0 * c - x1 * s;
      const float y1 = x1 * c + x0 * s;
      x[d] = y0;
      x[d + half] = y1;
      if (kStore && is_k && store) {
        const int64_t base = cache_base(head - n_heads);
        store_kv<kF16>(k_cache, base + d, y0);
        store_kv<kF16>(k_cache, base + d + half, y1);
      }
    }
  }

  if constexpr (kStore) {
    if (!store) return;
    // Without RoPE the k vectors are copied here too: items [0, kv_elems) are v's, then k's.
    const int kv_elems = n_kv_heads * head_dim;
    const int n_items = kRope ? kv_elems : 2 * kv_elems;
    for (int t = threadIdx.x; t < n_items; t += blockDim.x) {
      const bool is_k = t >= kv_elems;
      const int e = is_k ? t - kv_elems : t;
      const int h = e / head_dim, d = e - h * head_dim;
      const float value = is_k ? k[token * ld + e] : v[token * ld + e];
      store_kv<kF16>(is_k ? k_cache : v_cache, cache_base(h) + d, value);
    }
  }
}

void check_ptr(const char* what, const void* p, const char* name) {
  if (p == nullptr) throw std::invalid_argument(std::string(what) + ": " + name + " is null");
}

// The checks every entry shares; false when there is nothing to do.
bool check_shape(const char* what, int m, int n_heads, int head_dim, int64_t ld, int64_t row_width) {
  if (m < 0 || n_heads < 0 || head_dim < 0)
    throw std::invalid_argument(std::string(what) + ": negative m, head count or head_dim");
  if (m == 0 || n_heads == 0 || head_dim == 0) return false;
  if (ld < row_width)
    throw std::invalid_argument(std::string(what) + ": row stride ld = " + std::to_string(ld) +
                                " is smaller than the row's " + std::to_string(row_width) + " values");
  return true;
}
void check_rope(const char* what, int head_dim, const int32_t* positions, const float* inv_freq) {
  if (head_dim % 2 != 0 || head_dim > 4096)
    throw std::invalid_argument(std::string(what) + ": head_dim must be even and at most 4096, got " +
                                std::to_string(head_dim));
  check_ptr(what, positions, "positions");
  check_ptr(what, inv_freq, "inv_freq");
}
void check_store(const char* what, const int64_t* slots, int page_size, const void* k_cache, const void* v_cache) {
  if (page_size <= 0) throw std::invalid_argument(std::string(what) + ": page_size must be positive");
  check_ptr(what, slots, "slots");
  check_ptr(what, k_cache, "k_cache");
  check_ptr(what, v_cache, "v_cache");
}

template <bool kRope, bool kStore>
void launch(int m, int head_dim, KVType kv_type, gpuStream_t stream, float* q, float* k, const float* v, int64_t ld,
            int n_heads, int n_kv_heads, const int32_t* positions, const float* inv_freq, const int64_t* slots,
            int page_size, void* k_cache, void* v_cache) {
  const size_t smem = kRope ? sizeof(float) * static_cast<size_t>(head_dim) : 0;  // cos and sin: 2 * half
  if (kv_type == KVType::F16) {
    rope_kv_kernel<kRope, kStore, true><<<m, kThreads, smem, stream>>>(
        q, k, v, ld, n_heads, n_kv_heads, head_dim, positions, inv_freq, slots, page_size, k_cache, v_cache);
  } else {
    rope_kv_kernel<kRope, kStore, false><<<m, kThreads, smem, stream>>>(
        q, k, v, ld, n_heads, n_kv_heads, head_dim, positions, inv_freq, slots, page_size, k_cache, v_cache);
  }
  PYSERVE_GPU_CHECK_LAUNCH();
}

}  // namespace

void rope_write_kv(float* q, float* k, const float* v, int64_t ld, int m, int n_heads, int n_kv_heads, int head_dim,
                   const int32_t* positions, const float* inv_freq, const int64_t* slots, int page_size,
                   void* k_cache, void* v_cache, KVType kv_type, gpuStream_t stream) {
  const char* what = "rope_write_kv";
  if (n_heads < 0) throw std::invalid_argument("rope_write_kv: negative n_heads");
  if (m > 0 && n_kv_heads == 0) throw std::invalid_argument("rope_write_kv: n_kv_heads must be positive");
  // The row stride covers the widest of the three views (q has n_heads, k and v n_kv_heads).
  const int widest = n_heads > n_kv_heads ? n_heads : n_kv_heads;
  if (!check_shape(what, m, n_kv_heads, head_dim, ld, static_cast<int64_t>(widest) * head_dim)) return;
  check_rope(what, head_dim, positions, inv_freq);
  check_store(what, slots, page_size, k_cache, v_cache);
  if (n_heads > 0) check_ptr(what, q, "q");
  check_ptr(what, k, "k");
  check_ptr(what, v, "v");
  launch<true, true>(m, head_dim, kv_type, stream, q, k, v, ld, n_heads, n_kv_heads, positions, inv_freq, slots,
                     page_size, k_cache, v_cache);
}

void rope(float* x, int64_t ld, int m, int n_heads, int head_dim, const int32_t* positions, const float* inv_freq,
          gpuStream_t stream) {
  const char* what = "rope";
  if (!check_shape(what, m, n_heads, head_dim, ld, static_cast<int64_t>(n_heads) * head_dim)) return;
  check_rope(what, head_dim, positions, inv_freq);
  check_ptr(what, x, "x");
  launch<true, false>(m, head_dim, KVType::F32, stream, x, nullptr, nullptr, ld, n_heads, 0, positions, inv_freq,
                      nullptr, 1, nullptr, nullptr);
}

void write_kv(const float* k, const float* v, int64_t ld, int m, int n_kv_heads, int head_dim, const int64_t* slots,
              int page_size, void* k_cache, void* v_cache, KVType kv_type, gpuStream_t stream) {
  const char* what = "write_kv";
  if (!check_shape(what, m, n_kv_heads, head_dim, ld, static_cast<int64_t>(n_kv_heads) * head_dim)) return;
  check_store(what, slots, page_size, k_cache, v_cache);
  check_ptr(what, k, "k");
  check_ptr(what, v, "v");
  // The kernel only reads k when it does not rotate it.
  launch<false, true>(m, head_dim, kv_type, stream, nullptr, const_cast<float*>(k), v, ld, 0, n_kv_heads, nullptr,
                      nullptr, slots, page_size, k_cache, v_cache);
}

}  // namespace pyserve::gpu
