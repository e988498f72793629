#pragma once
// The GPU backend: the Backend interface (backend/backend.h) over the device kernels of this
// directory. One stream per backend; every op is queued on it, and the only waits are where data
// comes back to the host (to_host), so a step's kernels run back to back.
#include <memory>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "backend/cuda/device_memory.h"
#include "backend/cuda/matmul.h"

namespace pyserve::gpu {

// W: [rows, cols] in device memory, in its stored format (fused parts of one format are one
// matrix; a mix of formats is one DeviceWeights per part, computed into adjacent columns).
class DeviceWeights final : public Matrix {
 public:
  DeviceWeights(DType dtype, int64_t rows, int64_t cols, DeviceMemory memory)
      : memory_(std::move(memory)), view_{dtype, memory_.get(), rows, cols} {}
  int64_t rows() const override { return view_.rows; }
  int64_t cols() const override { return view_.cols; }
  size_t bytes() const override { return memory_.bytes(); }
  const DeviceMatrix& view() const { return view_; }

 private:
  DeviceMemory memory_;
  DeviceMatrix view_;
};

class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(int device);
  ~CudaBackend() override;
  CudaBackend(const CudaBackend&) = delete;
  CudaBackend& operator=(const CudaBackend&) = delete;

  std::string name() const override { return name_; }
  int num_threads() const override { return 1; }
  int device() const { return device_; }
  gpuStream_t stream() const { return stream_; }

  std::unique_ptr<Buffer> allocate(size_t n_floats) override;
  bool host_memory() const override { return false; }
  void to_device(float* dst, const float* host, size_t n) override;
  void to_host(float* host, const float* src, size_t n) override;
  void copy(float* dst, const float* src, size_t n) override;
  StepInputs prepare(const StepInputs& host) override;

  std::unique_ptr<Matrix> pack(const std::vector<const TensorView*>& parts) override;
  void matmul(const Matrix& w, const float* x, int64_t ldx, int m, float* y, int64_t ldy, const float* bias,
              bool accumulate) override;
  void gather_rows(const Matrix& w, const int32_t* ids, int m, float* out) override;
  void rmsnorm(const float* x, int64_t ldx, const float* weight, int m, int dim, float eps, float* y,
               int64_t ldy) override;
  void rope(float* x, int64_t ld, int m, int n_heads, int head_dim, const float* cos, const float* sin) override;
  void write_kv(const float* k, const float* v, int64_t ld, int m, int n_kv_heads, int head_dim, int page_size,
                const int64_t* slots, float* k_cache, float* v_cache) override;
  void attention(const AttentionBatch& b) override;
  void copy_kv_slot(int n_kv_heads, int head_dim, int page_size, int64_t src, int64_t dst, float* k_cache,
                    float* v_cache) override;
  void silu_mul(const float* gate_up, int m, int inter, float* out) override;
  void gelu_tanh_mul(const float* gate_up, int m, int inter, float* out) override;
  void rmsnorm_heads(float* x, int64_t ld, int m, int n_heads, int head_dim, const float* weight,
                     float eps) override;
  void rmsnorm_add(const float* x, int64_t ldx, const float* weight, int m, int dim, float eps, float* y,
                   int64_t ldy) override;
  void scale(float* x, int64_t n, float s) override;

 private:
  void use_device() const;  // the engine thread is not the thread that made the backend
  void* workspace(size_t bytes);
  void matmul_part(const DeviceWeights& w, const float* x, int64_t ldx, int m, float* y, int64_t ldy,
                   const float* bias, bool accumulate);

  int device_;
  std::string name_;
  gpuStream_t stream_ = nullptr;
  gpuEvent_t staged_ = nullptr;   // the last prepare()'s copy out of the pinned staging buffer
  void* staging_ = nullptr;       // pinned host memory, staging_bytes_ long
  size_t staging_bytes_ = 0;
  DeviceMemory step_;             // prepare()'s arrays on the device
  DeviceMemory workspace_;        // matmul's and attention's scratch, grown to the largest asked
};

}  // namespace pyserve::gpu
