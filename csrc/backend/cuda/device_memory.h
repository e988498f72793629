#pragma once
// Device memory with an owner: freed when the owner goes, never leaked by an exception.
#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

#include "backend/cuda/gpu_compat.h"

namespace pyserve::gpu {

class DeviceMemory {
 public:
  DeviceMemory() = default;
  explicit DeviceMemory(size_t bytes) : bytes_(bytes) {
    if (bytes_ > 0) PYSERVE_GPU_CHECK(gpuMalloc(&ptr_, bytes_));
  }
  ~DeviceMemory() {
    if (ptr_) (void)gpuFree(ptr_);  // a destructor reports nothing; the pointer is gone either way
  }
  DeviceMemory(DeviceMemory&& o) noexcept : ptr_(std::exchange(o.ptr_, nullptr)), bytes_(std::exchange(o.bytes_, 0)) {}
  DeviceMemory& operator=(DeviceMemory&& o) noexcept {
    if (this != &o) {
      if (ptr_) (void)gpuFree(ptr_);
      ptr_ = std::exchange(o.ptr_, nullptr);
      bytes_ = std::exchange(o.bytes_, 0);
    }
    return *this;
  }
  DeviceMemory(const DeviceMemory&) = delete;
  DeviceMemory& operator=(const DeviceMemory&) = delete;

  void* get() const { return ptr_; }
  template <typename T>
  T* as() const { return static_cast<T*>(ptr_); }
  size_t bytes() const { return bytes_; }

  // Synchronous copies, for set-up and tests (the engine's per-step copies go through a stream).
  void upload(const void* host, size_t bytes, size_t offset = 0) {
    if (offset + bytes > bytes_) throw std::out_of_range("DeviceMemory::upload past the end");
    PYSERVE_GPU_CHECK(gpuMemcpy(static_cast<char*>(ptr_) + offset, host, bytes, gpuMemcpyHostToDevice));
  }
  void download(void* host, size_t bytes, size_t offset = 0) const {
    if (offset + bytes > bytes_) throw std::out_of_range("DeviceMemory::download past the end");
    PYSERVE_GPU_CHECK(gpuMemcpy(host, static_cast<const char*>(ptr_) + offset, bytes, gpuMemcpyDeviceToHost));
  }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

template <typename T>
DeviceMemory to_device(const std::vector<T>& host) {
  DeviceMemory m(host.size() * sizeof(T));
  if (!host.empty()) m.upload(host.data(), m.bytes());
  return m;
}

// Elapsed device time between two points on a stream (benchmarks and probes).
class DeviceTimer {
 public:
  explicit DeviceTimer(gpuStream_t stream = nullptr) : stream_(stream) {
    PYSERVE_GPU_CHECK(gpuEventCreate(&start_));
    PYSERVE_GPU_CHECK(gpuEventCreate(&stop_));
  }
  ~DeviceTimer() {
    (void)gpuEventDestroy(start_);
    (void)gpuEventDestroy(stop_);
  }
  DeviceTimer(const DeviceTimer&) = delete;
  DeviceTimer& operator=(const DeviceTimer&) = delete;
  void start() { PYSERVE_GPU_CHECK(gpuEventRecord(start_, stream_)); }
  float stop_ms() {
    PYSERVE_GPU_CHECK(gpuEventRecord(stop_, stream_));
    PYSERVE_GPU_CHECK(gpuEventSynchronize(stop_));
    float ms = 0.f;
    PYSERVE_GPU_CHECK(gpuEventElapsedTime(&ms, start_, stop_));
    return ms;
  }

 private:
  gpuStream_t stream_;
  gpuEvent_t start_{}, stop_{};
};

}  // namespace pyserve::gpu
