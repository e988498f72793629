// A plain device-to-device copy: the memory-bandwidth peer that kernel benchmarks compare against
// (a memory-bound kernel's GB/s over this copy's GB/s says how close it runs to the roof).
#include <stdexcept>
#include <string>

#include "backend/cuda/elementwise.h"

namespace pyserve::gpu {
namespace {

constexpr int kThreads = 256;
// Enough blocks to fill any current device several times over; the grid-stride loop covers the
// rest, so each thread keeps a few 16-byte loads in flight instead of one.
constexpr int64_t kMaxBlocks = 8192;

// src, dst: [n_vec] 16-byte words.
__global__ void copy_kernel(const uint4* __restrict__ src, uint4* __restrict__ dst, int64_t n_vec) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n_vec; i += stride)
    dst[i] = src[i];
}

}  // namespace

void copy_bytes(const void* src, void* dst, int64_t n, gpuStream_t stream) {
  if (n < 0) throw std::invalid_argument("copy_bytes: negative n");
  if (n % 16 != 0) throw std::invalid_argument("copy_bytes: n = " + std::to_string(n) + " is not a multiple of 16");
  if (n == 0) return;
  if (src == nullptr || dst == nullptr) throw std::invalid_argument("copy_bytes: null src or dst");
  if (reinterpret_cast<uintptr_t>(src) % 16 != 0 || reinterpret_cast<uintptr_t>(dst) % 16 != 0)
    throw std::invalid_argument("copy_bytes: src and dst must be 16-byte aligned");
  const int64_t n_vec = n / 16;
  int64_t blocks = (n_vec + kThreads - 1) / kThreads;
  if (blocks > kMaxBlocks) blocks = kMaxBlocks;
  copy_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(static_cast<const uint4*>(src),
                                                                      static_cast<uint4*>(dst), n_vec);
  PYSERVE_GPU_CHECK_LAUNCH();
}

}  // namespace pyserve::gpu
