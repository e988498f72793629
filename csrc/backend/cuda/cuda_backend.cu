#include "backend/cuda/cuda_backend.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>

#include "backend/cuda/attention.h"
#include "backend/cuda/elementwise.h"
#include "backend/cuda/rope_table.h"

namespace pyserve::gpu {

namespace {

class DeviceBuffer final : public Buffer {
 public:
  explicit DeviceBuffer(size_t n_floats) : memory_(n_floats * sizeof(float)) {}
  float* data() override { return memory_.as<float>(); }
  size_t bytes() const override { return memory_.bytes(); }

 private:
  DeviceMemory memory_;
};

// Parts of different formats (a Q4_K_M file's q|k|v, say), one DeviceWeights each.
class StackedWeights final : public Matrix {
 public:
  explicit StackedWeights(std::vector<std::unique_ptr<DeviceWeights>> parts) : parts_(std::move(parts)) {
    for (const auto& p : parts_) rows_ += p->rows();
  }
  int64_t rows() const override { return rows_; }
  int64_t cols() const override { return parts_.front()->cols(); }
  size_t bytes() const override {
    size_t b = 0;
    for (const auto& p : parts_) b += p->bytes();
    return b;
  }
  const std::vector<std::unique_ptr<DeviceWeights>>& parts() const { return parts_; }

 private:
  std::vector<std::unique_ptr<DeviceWeights>> parts_;
  int64_t rows_ = 0;
};

// Rows of parts that share one format, concatenated into one device matrix.
std::unique_ptr<DeviceWeights> upload_rows(const std::vector<const TensorView*>& parts) {
  const DType t = parts.front()->dtype;
  const int64_t cols = parts.front()->shape.back();
  int64_t rows = 0;
  size_t bytes = 0;
  for (const TensorView* p : parts) {
    rows += p->numel() / cols;
    bytes += static_cast<size_t>(p->bytes());
  }
  DeviceMemory memory(bytes);
  size_t offset = 0;
  for (const TensorView* p : parts) {
    memory.upload(p->data, static_cast<size_t>(p->bytes()), offset);
    offset += static_cast<size_t>(p->bytes());
  }
  return std::make_unique<DeviceWeights>(t, rows, cols, std::move(memory));
}

size_t align16(size_t n) { return (n + 15) & ~static_cast<size_t>(15); }

}  // namespace

CudaBackend::CudaBackend(int device) : device_(device) {
  int count = 0;
  if (gpuGetDeviceCount(&count) != gpuSuccess) {
    (void)gpuGetLastError();
    count = 0;
  }
  if (device < 0 || device >= count)
    throw std::invalid_argument("GPU device " + std::to_string(device) + " is not present (" + std::to_string(count) +
                                " visible)");
  PYSERVE_GPU_CHECK(gpuSetDevice(device_));
  gpuDeviceProp p{};
  PYSERVE_GPU_CHECK(gpuGetDeviceProperties(&p, device_));
  if (p.warpSize != kWarpSize)
    throw std::invalid_argument("this build's kernels assume a warp of " + std::to_string(kWarpSize) + " lanes, but " +
                                std::string(p.name) + " has " + std::to_string(p.warpSize) +
                                " (rebuild with -DPYSERVE_WARP_SIZE=" + std::to_string(p.warpSize) + ")");
#ifdef PYSERVE_GPU_HIP
  name_ = "rocm:" + std::to_string(device_) + " (" + p.name + ")";
#else
  name_ = "cuda:" + std::to_string(device_) + " (" + p.name + ")";
#endif
  PYSERVE_GPU_CHECK(gpuStreamCreate(&stream_));
  PYSERVE_GPU_CHECK(gpuEventCreate(&staged_));
}

CudaBackend::~CudaBackend() {
  (void)gpuSetDevice(device_);
  (void)gpuStreamSynchronize(stream_);
  if (staging_) (void)gpuFreeHost(staging_);
  (void)gpuEventDestroy(staged_);
  (void)gpuStreamDestroy(stream_);
}

void CudaBackend::use_device() const { PYSERVE_GPU_CHECK(gpuSetDevice(device_)); }

std::unique_ptr<Buffer> CudaBackend::allocate(size_t n_floats) {
  use_device();
  auto b = std::make_unique<DeviceBuffer>(n_floats);
  // Zeros, not whatever the allocator left: a masked-out key of the prefill attention is still
  // multiplied by 0, and 0 * NaN from never-written cache memory would be NaN.
  if (n_floats > 0) PYSERVE_GPU_CHECK(gpuMemsetAsync(b->data(), 0, n_floats * sizeof(float), stream_));
  return b;
}

void CudaBackend::to_device(float* dst, const float* host, size_t n) {
  if (n == 0) return;
  // Waits for the copy: `host` is often a temporary (Backend::upload), and how early an async
  // copy from pageable memory lets go of it differs between CUDA and HIP. Callers copy when the
  // stream is idle anyway (at load, and before the LM head after forward_hidden's to_host).
  PYSERVE_GPU_CHECK(gpuMemcpyAsync(dst, host, n * sizeof(float), gpuMemcpyHostToDevice, stream_));
  PYSERVE_GPU_CHECK(gpuStreamSynchronize(stream_));
}

void CudaBackend::to_host(float* host, const float* src, size_t n) {
  if (n == 0) return;
  PYSERVE_GPU_CHECK(gpuMemcpyAsync(host, src, n * sizeof(float), gpuMemcpyDeviceToHost, stream_));
  PYSERVE_GPU_CHECK(gpuStreamSynchronize(stream_));
}

void CudaBackend::copy(float* dst, const float* src, size_t n) {
  if (n == 0) return;
  PYSERVE_GPU_CHECK(gpuMemcpyAsync(dst, src, n * sizeof(float), gpuMemcpyDeviceToDevice, stream_));
}

// The step's arrays packed into one pinned buffer and moved with one copy.
StepInputs CudaBackend::prepare(const StepInputs& host) {
  use_device();
  const size_t n = static_cast<size_t>(host.n_tokens), rope = n * static_cast<size_t>(host.half_dim);
  struct Part {
    const void* src;
    size_t bytes;
    size_t offset = 0;
  };
  Part parts[] = {
      {host.tokens, n * sizeof(int32_t)},
      {host.positions, n * sizeof(int32_t)},
      {host.slots, n * sizeof(int64_t)},
      {host.own_slots, host.own_slots ? n * sizeof(int64_t) : 0},
      {host.cos, rope * sizeof(float)},
      {host.sin, rope * sizeof(float)},
      {host.cos_local, host.cos_local ? rope * sizeof(float) : 0},
      {host.sin_local, host.sin_local ? rope * sizeof(float) : 0},
      {host.page_table, static_cast<size_t>(host.n_seqs) * host.max_pages * sizeof(int32_t)},
      {host.token_seq, n * sizeof(int32_t)},
  };
  size_t total = 0;
  for (Part& p : parts) {
    p.offset = total;
    total += align16(p.bytes);
  }
  // The previous step's copy must be done with the staging buffer before it is overwritten.
  PYSERVE_GPU_CHECK(gpuEventSynchronize(staged_));
  if (total > staging_bytes_) {
    if (staging_) PYSERVE_GPU_CHECK(gpuFreeHost(staging_));
    staging_ = nullptr;
    staging_bytes_ = 0;
    PYSERVE_GPU_CHECK(gpuMallocHost(&staging_, total * 2));
    staging_bytes_ = total * 2;
  }
  if (total > step_.bytes()) {
    PYSERVE_GPU_CHECK(gpuStreamSynchronize(stream_));  // kernels queued may still read the old arrays
    step_ = DeviceMemory(total * 2);
  }
  char* stage = static_cast<char*>(staging_);
  for (const Part& p : parts)
    if (p.bytes > 0) std::memcpy(stage + p.offset, p.src, p.bytes);
  if (total > 0) PYSERVE_GPU_CHECK(gpuMemcpyAsync(step_.get(), staging_, total, gpuMemcpyHostToDevice, stream_));
  PYSERVE_GPU_CHECK(gpuEventRecord(staged_, stream_));

  char* dev = step_.as<char>();
  auto at = [&](const Part& p) -> void* { return p.bytes > 0 ? dev + p.offset : nullptr; };
  StepInputs d = host;
  d.tokens = static_cast<const int32_t*>(at(parts[0]));
  d.positions = static_cast<const int32_t*>(at(parts[1]));
  d.slots = static_cast<const int64_t*>(at(parts[2]));
  d.own_slots = static_cast<const int64_t*>(at(parts[3]));
  d.cos = static_cast<const float*>(at(parts[4]));
  d.sin = static_cast<const float*>(at(parts[5]));
  d.cos_local = static_cast<const float*>(at(parts[6]));
  d.sin_local = static_cast<const float*>(at(parts[7]));
  d.page_table = static_cast<const int32_t*>(at(parts[8]));
  d.token_seq = static_cast<const int32_t*>(at(parts[9]));
  return d;
}

void* CudaBackend::workspace(size_t bytes) {
  if (bytes > workspace_.bytes()) {
    use_device();
    PYSERVE_GPU_CHECK(gpuStreamSynchronize(stream_));  // queued kernels may still use the old one
    workspace_ = DeviceMemory(std::max(bytes, workspace_.bytes() * 2));
  }
  return workspace_.get();
}

std::unique_ptr<Matrix> CudaBackend::pack(const std::vector<const TensorView*>& parts) {
  if (parts.empty()) throw std::invalid_argument("pack: no parts");
  use_device();
  const int64_t cols = parts.front()->shape.back();
  bool one_format = true;
  for (const TensorView* p : parts) {
    if (p->shape.size() != 2 || p->shape.back() != cols)
      throw std::invalid_argument("pack: " + p->name + " is not a matrix with " + std::to_string(cols) + " columns");
    if (!supports(p->dtype))
      throw std::invalid_argument("the GPU backend does not run " + std::string(dtype_info(p->dtype).name) + " (" +
                                  p->name + "); it runs f32, f16, bf16, q4_0, q4_1, q5_0, q5_1, q8_0, q2_k, q3_k, q4_k, q5_k, q6_k");
    one_format = one_format && p->dtype == parts.front()->dtype;
  }
  if (one_format) return upload_rows(parts);
  std::vector<std::unique_ptr<DeviceWeights>> each;
  for (const TensorView* p : parts) each.push_back(upload_rows({p}));
  return std::make_unique<StackedWeights>(std::move(each));
}

void CudaBackend::matmul_part(const DeviceWeights& w, const float* x, int64_t ldx, int m, float* y, int64_t ldy,
                              const float* bias, bool accumulate) {
  const size_t ws = matmul_workspace_bytes(w.view(), m);
  void* scratch = ws > 0 ? workspace(ws) : nullptr;
  gpu::matmul(w.view(), x, ldx, m, y, ldy, bias, accumulate, scratch, ws, stream_);
}

void CudaBackend::matmul(const Matrix& w, const float* x, int64_t ldx, int m, float* y, int64_t ldy,
                         const float* bias, bool accumulate) {
  if (m <= 0) return;
  if (const auto* d = dynamic_cast<const DeviceWeights*>(&w)) {
    matmul_part(*d, x, ldx, m, y, ldy, bias, accumulate);
    return;
  }
  const auto* s = dynamic_cast<const StackedWeights*>(&w);
  if (!s) throw std::invalid_argument("matmul: a matrix the GPU backend did not pack");
  int64_t col = 0;
  for (const auto& p : s->parts()) {
    matmul_part(*p, x, ldx, m, y + col, ldy, bias ? bias + col : nullptr, accumulate);
    col += p->rows();
  }
}

void CudaBackend::gather_rows(const Matrix& w, const int32_t* ids, int m, float* out) {
  if (m <= 0) return;
  const auto* d = dynamic_cast<const DeviceWeights*>(&w);
  if (!d) throw std::invalid_argument("gather_rows: the embedding table must be one GPU-packed matrix");
  gpu::gather_rows(d->view(), ids, m, out, stream_);
}

void CudaBackend::rmsnorm(const float* x, int64_t ldx, const float* weight, int m, int dim, float eps, float* y,
                          int64_t ldy) {
  gpu::rmsnorm(x, ldx, weight, m, dim, eps, y, ldy, stream_);
}

void CudaBackend::rope(float* x, int64_t ld, int m, int n_heads, int head_dim, const float* cos, const float* sin) {
  rope_table(x, ld, m, n_heads, head_dim, cos, sin, stream_);
}

void CudaBackend::write_kv(const float* k, const float* v, int64_t ld, int m, int n_kv_heads, int head_dim,
                           int page_size, const int64_t* slots, float* k_cache, float* v_cache) {
  gpu::write_kv(k, v, ld, m, n_kv_heads, head_dim, slots, page_size, k_cache, v_cache, KVType::F32, stream_);
}

void CudaBackend::attention(const AttentionBatch& b) {
  if (b.n_tokens <= 0) return;
  PagedAttention a;
  a.q = b.q;
  a.q_stride = b.q_stride;
  a.n_tokens = b.n_tokens;
  a.n_heads = b.n_heads;
  a.n_kv_heads = b.n_kv_heads;
  a.head_dim = b.head_dim;
  a.scale = b.scale;
  a.k_cache = b.k_cache;
  a.v_cache = b.v_cache;
  a.kv_type = KVType::F32;
  a.page_size = b.page_size;
  a.page_table = b.page_table;
  a.max_pages = b.max_pages;
  a.token_seq = b.token_seq;
  a.positions = b.positions;
  a.window = b.window;
  a.sink = b.sink;
  a.own_slots = b.own_slots;
  a.out = b.out;
  a.out_stride = b.out_stride;
  // One token per sequence and no tree leaves: the split-K decode kernel.
  const bool decode_only = b.own_slots == nullptr && b.n_seqs == b.n_tokens;
  // Only the decode kernel's split-K partials need a workspace (sized for its largest split).
  const size_t ws =
      decode_only ? attention_workspace_bytes(b.n_tokens, b.n_heads, b.head_dim, b.max_pages * b.page_size) : 0;
  void* scratch = ws > 0 ? workspace(ws) : nullptr;
  gpu::attention(a, scratch, ws, decode_only, stream_);
}

void CudaBackend::copy_kv_slot(int n_kv_heads, int head_dim, int page_size, int64_t src, int64_t dst, float* k_cache,
                               float* v_cache) {
  gpu::copy_kv_slot(k_cache, v_cache, KVType::F32, n_kv_heads, head_dim, page_size, src, dst, stream_);
}

void CudaBackend::silu_mul(const float* gate_up, int m, int inter, float* out) {
  gpu::silu_mul(gate_up, m, inter, out, stream_);
}

void CudaBackend::gelu_tanh_mul(const float* gate_up, int m, int inter, float* out) {
  gpu::gelu_tanh_mul(gate_up, m, inter, out, stream_);
}

void CudaBackend::rmsnorm_heads(float* x, int64_t ld, int m, int n_heads, int head_dim, const float* weight,
                                float eps) {
  gpu::rmsnorm_heads(x, ld, m, n_heads, head_dim, weight, eps, stream_);
}

void CudaBackend::rmsnorm_add(const float* x, int64_t ldx, const float* weight, int m, int dim, float eps, float* y,
                              int64_t ldy) {
  gpu::rmsnorm_add(x, ldx, weight, m, dim, eps, y, ldy, stream_);
}

void CudaBackend::scale(float* x, int64_t n, float s) { gpu::scale(x, n, s, stream_); }

}  // namespace pyserve::gpu

namespace pyserve {

std::shared_ptr<Backend> make_gpu_backend(int index) { return std::make_shared<gpu::CudaBackend>(index); }
int gpu_device_count() {
  int n = 0;
  if (gpuGetDeviceCount(&n) != gpuSuccess) {  // no driver, no device: none, not an error
    (void)gpuGetLastError();
    return 0;
  }
  return n;
}
std::string gpu_device_kind() {
#ifdef PYSERVE_GPU_HIP
  return "rocm";
#else
  return "cuda";
#endif
}

}  // namespace pyserve
