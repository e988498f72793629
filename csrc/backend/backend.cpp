#include "backend/backend.h"

#include <cstring>
#include <stdexcept>

namespace pyserve {

// The defaults serve backends whose memory is host memory (host_memory() true); a device
// backend overrides the three copies.
void Backend::to_device(float* dst, const float* host, size_t n) {
  if (n > 0 && dst != host) std::memcpy(dst, host, n * sizeof(float));
}
void Backend::to_host(float* host, const float* src, size_t n) {
  if (n > 0 && host != src) std::memcpy(host, src, n * sizeof(float));
}
void Backend::copy(float* dst, const float* src, size_t n) {
  if (n > 0 && dst != src) std::memmove(dst, src, n * sizeof(float));
}

std::unique_ptr<Buffer> Backend::upload(const float* host, size_t n) {
  std::unique_ptr<Buffer> b = allocate(n);
  to_device(b->data(), host, n);
  return b;
}

#ifndef PYSERVE_GPU
// A CPU-only build: backend/cuda/cuda_backend.cu defines these in GPU builds.
std::shared_ptr<Backend> make_gpu_backend(int) {
  throw std::invalid_argument(
      "this build of pyserve has no GPU backend: reinstall with PYSERVE_CUDA=1 (NVIDIA) or PYSERVE_HIP=1 (AMD)");
}
int gpu_device_count() { return 0; }
std::string gpu_device_kind() { return "none"; }
#endif

}  // namespace pyserve
