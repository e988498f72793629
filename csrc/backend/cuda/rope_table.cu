// RoPE from per-token angle tables (the Backend::rope seam: the model builds cos/sin once per
// step on the host, prepare() moves them over, and every layer's q and k rotate from them).
#include "backend/cuda/rope_table.h"

#include <stdexcept>

namespace pyserve::gpu {

namespace {

// x: [m, n_heads, head_dim] at row stride ld; cos/sin: [m, half]. One thread per (token, head, d < half):
// rotate-half, as HF Llama: (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin).
__global__ void rope_table_kernel(float* x, int64_t ld, int m, int n_heads, int half, const float* cos,
                                  const float* sin) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t total = static_cast<int64_t>(m) * n_heads * half;
  if (i >= total) return;
  const int d = static_cast<int>(i % half);
  const int64_t th = i / half;
  const int h = static_cast<int>(th % n_heads);
  const int64_t t = th / n_heads;
  float* row = x + t * ld + static_cast<int64_t>(h) * 2 * half;
  const float c = cos[t * half + d], s = sin[t * half + d];
  const float x0 = row[d], x1 = row[d + half];
  row[d] = x0 * c - x1 * s;
  row[d + half] = x1 * c + x0 * s;
}

}  // namespace

void rope_table(float* x, int64_t ld, int m, int n_heads, int head_dim, const float* cos, const float* sin,
                gpuStream_t stream) {
  if (m <= 0 || n_heads <= 0) return;
  if (head_dim <= 0 || head_dim % 2 != 0) throw std::invalid_argument("rope_table: head_dim must be even");
  const int half = head_dim / 2;
  const int64_t total = static_cast<int64_t>(m) * n_heads * half;
  const int block = 256;
  rope_table_kernel<<<static_cast<unsigned>((total + block - 1) / block), block, 0, stream>>>(x, ld, m, n_heads, half,
                                                                                               cos, sin);
  PYSERVE_GPU_CHECK_LAUNCH();
}

}  // namespace pyserve::gpu
