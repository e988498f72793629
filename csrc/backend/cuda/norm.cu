// RMSNorm on the device: rmsnorm, rmsnorm_add, add_rmsnorm (one block per row) and rmsnorm_heads
// (one warp per head vector). The same formula as the CPU backend (cpu_backend.cpp rms_row):
//   inv = 1 / sqrt(sum(x^2) / dim + eps),  y = weight * (x * inv)
// with the sum of squares in float32 (a block reduction) where the CPU sums in double.
#include <stdexcept>
#include <string>

#include "backend/cuda/elementwise.h"
#include "backend/cuda/reduce.cuh"

namespace pyserve::gpu {
namespace {

constexpr int kMaxThreads = 1024;
constexpr int kMaxWarps = kMaxThreads / kWarpSize;  // block_sum's scratch: one float per warp

// N consecutive floats moved as one load / store (N = 4: a 16-byte float4 access, so the caller
// guarantees 16-byte alignment).
template <int N>
struct Floats {
  float v[N];
};
template <int N>
__device__ __forceinline__ Floats<N> load(const float* p) {
  Floats<N> f;
  if constexpr (N == 4) {
    const float4 q = *reinterpret_cast<const float4*>(p);
    f.v[0] = q.x, f.v[1] = q.y, f.v[2] = q.z, f.v[3] = q.w;
  } else {
#pragma unroll
    for (int e = 0; e < N; ++e) f.v[e] = p[e];
  }
  return f;
}
template <int N>
__device__ __forceinline__ void store(float* p, const Floats<N>& f) {
  if constexpr (N == 4) {
    *reinterpret_cast<float4*>(p) = make_float4(f.v[0], f.v[1], f.v[2], f.v[3]);
  } else {
#pragma unroll
    for (int e = 0; e < N; ++e) p[e] = f.v[e];
  }
}

// 1 / rms with the CPU backend's placement of eps (inside the root, after the mean).
__device__ __forceinline__ float inv_rms(float sum_sq, int dim, float eps) {
  return 1.f / sqrtf(sum_sq / static_cast<float>(dim) + eps);
}

// One block per row. x: [m, dim] at row stride ldx; y: [m, dim] at ldy (y = ... or y += ...).
// Both passes give thread t the same vectors, so y may alias x.
template <int kVec, bool kAccumulate>
__global__ void rmsnorm_kernel(const float* x, int64_t ldx, const float* weight, int dim, float eps, float* y,
                               int64_t ldy) {
  __shared__ float scratch[kMaxWarps];
  const int64_t row = blockIdx.x;
  const float* x_row = x + row * ldx;
  float* y_row = y + row * ldy;
  const int n_vec = dim / kVec;
  float sum_sq = 0.f;
  for (int j = threadIdx.x; j < n_vec; j += blockDim.x) {
    const Floats<kVec> xv = load<kVec>(x_row + j * kVec);
#pragma unroll
    for (int e = 0; e < kVec; ++e) sum_sq += xv.v[e] * xv.v[e];
  }
  const float inv = inv_rms(block_sum(sum_sq, scratch), dim, eps);
  for (int j = threadIdx.x; j < n_vec; j += blockDim.x) {
    const Floats<kVec> xv = load<kVec>(x_row + j * kVec);
    const Floats<kVec> wv = load<kVec>(weight + j * kVec);
    Floats<kVec> yv;
    if constexpr (kAccumulate) {
      yv = load<kVec>(y_row + j * kVec);
#pragma unroll
      for (int e = 0; e < kVec; ++e) yv.v[e] += wv.v[e] * (xv.v[e] * inv);
    } else {
#pragma unroll
      for (int e = 0; e < kVec; ++e) yv.v[e] = wv.v[e] * (xv.v[e] * inv);
    }
    store<kVec>(y_row + j * kVec, yv);
  }
}

// One block per row: h: [m, dim] (ldh) += delta: [m, dim] (ld_delta), then y = norm(h) (ldy).
// Pass 2 re-reads the h values this same thread stored in pass 1 (a thread sees its own writes).
template <int kVec>
__global__ void add_rmsnorm_kernel(float* h, int64_t ldh, const float* delta, int64_t ld_delta, const float* weight,
                                   int dim, float eps, float* y, int64_t ldy) {
  __shared__ float scratch[kMaxWarps];
  const int64_t row = blockIdx.x;
  float* h_row = h + row * ldh;
  const float* delta_row = delta + row * ld_delta;
  float* y_row = y + row * ldy;
  const int n_vec = dim / kVec;
  float sum_sq = 0.f;
  for (int j = threadIdx.x; j < n_vec; j += blockDim.x) {
    Floats<kVec> hv = load<kVec>(h_row + j * kVec);
    const Floats<kVec> dv = load<kVec>(delta_row + j * kVec);
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      hv.v[e] += dv.v[e];
      sum_sq += hv.v[e] * hv.v[e];
    }
    store<kVec>(h_row + j * kVec, hv);
  }
  const float inv = inv_rms(block_sum(sum_sq, scratch), dim, eps);
  for (int j = threadIdx.x; j < n_vec; j += blockDim.x) {
    const Floats<kVec> hv = load<kVec>(h_row + j * kVec);
    const Floats<kVec> wv = load<kVec>(weight + j * kVec);
    Floats<kVec> yv;
#pragma unroll
    for (int e = 0; e < kVec; ++e) yv.v[e] = wv.v[e] * (hv.v[e] * inv);
    store<kVec>(y_row + j * kVec, yv);
  }
}

// One warp per (row, head): head vectors are short (64..256), so a warp reduction replaces the
// block's two barriers. x: [m, n_heads, head_dim] at row stride ld, in place.
template <int kVec>
__global__ void rmsnorm_heads_kernel(float* x, int64_t ld, int64_t n_vectors, int n_heads, int head_dim,
                                     const float* weight, float eps) {
  const int warps_per_block = blockDim.x / kWarpSize;
  const int64_t vector = static_cast<int64_t>(blockIdx.x) * warps_per_block + threadIdx.x / kWarpSize;
  if (vector >= n_vectors) return;  // the whole warp leaves together: no shuffle is left half-done
  const int lane = threadIdx.x % kWarpSize;
  const int64_t row = vector / n_heads;
  const int head = static_cast<int>(vector % n_heads);
  float* v = x + row * ld + static_cast<int64_t>(head) * head_dim;
  const int n_vec = head_dim / kVec;
  float sum_sq = 0.f;
  for (int j = lane; j < n_vec; j += kWarpSize) {
    const Floats<kVec> xv = load<kVec>(v + j * kVec);
#pragma unroll
    for (int e = 0; e < kVec; ++e) sum_sq += xv.v[e] * xv.v[e];
  }
  const float inv = inv_rms(warp_sum(sum_sq), head_dim, eps);
  for (int j = lane; j < n_vec; j += kWarpSize) {
    Floats<kVec> xv = load<kVec>(v + j * kVec);
    const Floats<kVec> wv = load<kVec>(weight + j * kVec);
#pragma unroll
    for (int e = 0; e < kVec; ++e) xv.v[e] = wv.v[e] * (xv.v[e] * inv);
    store<kVec>(v + j * kVec, xv);
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Threads for a row of n_vec vectors: one vector each up to 1024, a whole number of warps.
int row_threads(int n_vec) {
  const int t = n_vec < kMaxThreads ? n_vec : kMaxThreads;
  return (t + kWarpSize - 1) / kWarpSize * kWarpSize;
}

void check_rows(const char* what, int m, int dim, float eps) {
  if (m < 0 || dim < 0) throw std::invalid_argument(std::string(what) + ": negative m or dim");
  if (!(eps >= 0.f)) throw std::invalid_argument(std::string(what) + ": eps must be >= 0");
}
void check_stride(const char* what, const char* name, int64_t ld, int dim) {
  if (ld < dim)
    throw std::invalid_argument(std::string(what) + ": row stride " + name + " = " + std::to_string(ld) +
                                " is smaller than dim = " + std::to_string(dim));
}
void check_ptr(const char* what, const void* p, const char* name) {
  if (p == nullptr) throw std::invalid_argument(std::string(what) + ": " + name + " is null");
}

template <bool kAccumulate>
void launch_rmsnorm(const char* what, const float* x, int64_t ldx, const float* weight, int m, int dim, float eps,
                    float* y, int64_t ldy, gpuStream_t stream) {
  check_rows(what, m, dim, eps);
  if (m == 0 || dim == 0) return;
  check_stride(what, "ldx", ldx, dim);
  check_stride(what, "ldy", ldy, dim);
  check_ptr(what, x, "x");
  check_ptr(what, weight, "weight");
  check_ptr(what, y, "y");
  const bool vec4 = dim % 4 == 0 && ldx % 4 == 0 && ldy % 4 == 0 && aligned16(x) && aligned16(weight) && aligned16(y);
  if (vec4) {
    rmsnorm_kernel<4, kAccumulate><<<m, row_threads(dim / 4), 0, stream>>>(x, ldx, weight, dim, eps, y, ldy);
  } else {
    rmsnorm_kernel<1, kAccumulate><<<m, row_threads(dim), 0, stream>>>(x, ldx, weight, dim, eps, y, ldy);
  }
  PYSERVE_GPU_CHECK_LAUNCH();
}

}  // namespace

void rmsnorm(const float* x, int64_t ldx, const float* weight, int m, int dim, float eps, float* y, int64_t ldy,
             gpuStream_t stream) {
  launch_rmsnorm<false>("rmsnorm", x, ldx, weight, m, dim, eps, y, ldy, stream);
}

void rmsnorm_add(const float* x, int64_t ldx, const float* weight, int m, int dim, float eps, float* y,
                 int64_t ldy, gpuStream_t stream) {
  launch_rmsnorm<true>("rmsnorm_add", x, ldx, weight, m, dim, eps, y, ldy, stream);
}

void add_rmsnorm(float* h, int64_t ldh, const float* delta, int64_t ld_delta, const float* weight, int m, int dim,
                 float eps, float* y, int64_t ldy, gpuStream_t stream) {
  const char* what = "add_rmsnorm";
  check_rows(what, m, dim, eps);
  if (m == 0 || dim == 0) return;
  check_stride(what, "ldh", ldh, dim);
  check_stride(what, "ld_delta", ld_delta, dim);
  check_stride(what, "ldy", ldy, dim);
  check_ptr(what, h, "h");
  check_ptr(what, delta, "delta");
  check_ptr(what, weight, "weight");
  check_ptr(what, y, "y");
  const bool vec4 = dim % 4 == 0 && ldh % 4 == 0 && ld_delta % 4 == 0 && ldy % 4 == 0 && aligned16(h) &&
                    aligned16(delta) && aligned16(weight) && aligned16(y);
  if (vec4) {
    add_rmsnorm_kernel<4><<<m, row_threads(dim / 4), 0, stream>>>(h, ldh, delta, ld_delta, weight, dim, eps, y, ldy);
  } else {
    add_rmsnorm_kernel<1><<<m, row_threads(dim), 0, stream>>>(h, ldh, delta, ld_delta, weight, dim, eps, y, ldy);
  }
  PYSERVE_GPU_CHECK_LAUNCH();
}

void rmsnorm_heads(float* x, int64_t ld, int m, int n_heads, int head_dim, const float* weight, float eps,
                   gpuStream_t stream) {
  const char* what = "rmsnorm_heads";
  if (m < 0 || n_heads < 0 || head_dim < 0)
    throw std::invalid_argument("rmsnorm_heads: negative m, n_heads or head_dim");
  if (!(eps >= 0.f)) throw std::invalid_argument("rmsnorm_heads: eps must be >= 0");
  if (m == 0 || n_heads == 0 || head_dim == 0) return;
  if (ld < static_cast<int64_t>(n_heads) * head_dim)
    throw std::invalid_argument("rmsnorm_heads: row stride ld = " + std::to_string(ld) +
                                " is smaller than n_heads * head_dim = " +
                                std::to_string(static_cast<int64_t>(n_heads) * head_dim));
  check_ptr(what, x, "x");
  check_ptr(what, weight, "weight");
  constexpr int kWarpsPerBlock = 4;
  const int64_t n_vectors = static_cast<int64_t>(m) * n_heads;
  const int64_t blocks = (n_vectors + kWarpsPerBlock - 1) / kWarpsPerBlock;
  if (blocks > 0x7fffffff) throw std::invalid_argument("rmsnorm_heads: m * n_heads too large for one launch");
  const bool vec4 = head_dim % 4 == 0 && ld % 4 == 0 && aligned16(x) && aligned16(weight);
  if (vec4) {
    rmsnorm_heads_kernel<4><<<static_cast<unsigned>(blocks), kWarpsPerBlock * kWarpSize, 0, stream>>>(
        x, ld, n_vectors, n_heads, head_dim, weight, eps);
  } else {
    rmsnorm_heads_kernel<1><<<static_cast<unsigned>(blocks), kWarpsPerBlock * kWarpSize, 0, stream>>>(
        x, ld, n_vectors, n_heads, head_dim, weight, eps);
  }
  PYSERVE_GPU_CHECK_LAUNCH();
}

}  // namespace pyserve::gpu
