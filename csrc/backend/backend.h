#pragma once
// The interface between the model and the hardware. csrc/model and csrc/engine reach kernels only
// through this class; each backend (cpu/, later cuda/) owns its memory layout and threads.
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "tensor/tensor.h"

namespace pyserve {

// A weight matrix in whatever layout the backend computes fastest from.
class Matrix {
 public:
  virtual ~Matrix() = default;
  virtual int64_t rows() const = 0;  // output features (n)
  virtual int64_t cols() const = 0;  // input features (k)
  virtual size_t bytes() const = 0;  // bytes read by one full pass over the matrix
};

// Attention of a batch of tokens, each over its own sequence in the paged KV cache. The cache's
// layout inside a page is the backend's choice (write_kv is the only writer).
struct AttentionBatch {
  const float* q = nullptr;           // q: [n_tokens, n_heads, head_dim] at row stride q_stride
  int64_t q_stride = 0;
  int n_tokens = 0, n_heads = 0, n_kv_heads = 0, head_dim = 0;
  float scale = 1.f;
  const float* k_cache = nullptr;     // this layer's K and V pages
  const float* v_cache = nullptr;
  int page_size = 0;
  // The batch's page tables, padded to one width: row s is sequence s's pages (StepInputs).
  const int32_t* page_table = nullptr;  // [n_seqs, max_pages]
  int n_seqs = 0, max_pages = 0;
  const int32_t* token_seq = nullptr;   // [n_tokens]: each token's row of page_table
  const int32_t* positions = nullptr;   // [n_tokens]: each token's position in its sequence
  int window = 0;                     // sliding window (0: attend to the whole prefix)
  // Attention sink (StreamingLLM), with a window: a token also attends to positions [0, sink).
  int sink = 0;
  // Tree verification (null: none): per token -1, or -- for a draft-tree leaf -- the cache slot
  // (page * page_size + offset) holding its own K/V. A leaf attends to its sequence's positions
  // before positions[i] (its parent's path) and to that slot, not to position positions[i].
  const int64_t* own_slots = nullptr;
  float* out = nullptr;               // out: [n_tokens, n_heads, head_dim] at row stride out_stride
  int64_t out_stride = 0;

  const int32_t* table_of(int token) const { return page_table + static_cast<int64_t>(token_seq[token]) * max_pages; }
};

// What one forward step's kernels read besides the activations, built by the model on the host
// once per step and handed to the backend by prepare(), which returns the same arrays where its
// kernels can read them (the CPU: these very arrays; a GPU: one copy to device memory).
struct StepInputs {
  int n_tokens = 0;
  const int32_t* tokens = nullptr;     // [n_tokens]
  const int32_t* positions = nullptr;  // [n_tokens]
  const int64_t* slots = nullptr;      // [n_tokens]: the cache slot each token's K/V goes to
  const int64_t* own_slots = nullptr;  // [n_tokens], or null: AttentionBatch::own_slots
  int half_dim = 0;                    // head_dim / 2
  const float* cos = nullptr;          // [n_tokens, half_dim]: RoPE's angles
  const float* sin = nullptr;
  const float* cos_local = nullptr;    // [n_tokens, half_dim], or null: layers with a local RoPE base
  const float* sin_local = nullptr;
  int n_seqs = 0, max_pages = 0;
  const int32_t* page_table = nullptr;  // [n_seqs, max_pages]
  const int32_t* token_seq = nullptr;   // [n_tokens]
};

// Memory the backend's kernels can address (host memory on the CPU, device memory on a GPU).
class Buffer {
 public:
  virtual ~Buffer() = default;
  virtual float* data() = 0;
  virtual size_t bytes() const = 0;
};

// The model's parameters and workspace live in the backend's memory. Where that is not host
// memory (host_memory() false), the model moves data across only through these calls: parameters
// once at load (upload), per step the StepInputs (prepare), and the rows it hands back (to_host).

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;
  virtual int num_threads() const = 0;

  virtual std::unique_ptr<Buffer> allocate(size_t n_floats) = 0;

  // True where the kernels read and write host memory (the CPU): the model then skips the copies.
  virtual bool host_memory() const { return true; }
  // A buffer holding a copy of host[0, n).
  std::unique_ptr<Buffer> upload(const float* host, size_t n);
  // Copies n floats: host -> backend memory, backend -> host (waits for the work queued before),
  // and within the backend's memory.
  virtual void to_device(float* dst, const float* host, size_t n);
  virtual void to_host(float* host, const float* src, size_t n);
  virtual void copy(float* dst, const float* src, size_t n);
  // The step's inputs where the kernels can read them, valid until the next prepare().
  virtual StepInputs prepare(const StepInputs& host) { return host; }

  // Packs the row-wise concatenation of `parts` (each [rows_i, cols], same cols) into one matrix,
  // so that fused projections (q|k|v, gate|up) run as one matmul.
  virtual std::unique_ptr<Matrix> pack(const std::vector<const TensorView*>& parts) = 0;

  // y: [m, rows] = x: [m, cols] · Wᵀ (+ bias) (+ y when accumulate)
  virtual void matmul(const Matrix& w, const float* x, int64_t ldx, int m, float* y, int64_t ldy,
                      const float* bias, bool accumulate) = 0;
  // out: [m, cols] = rows `ids` of w (the embedding table shares the LM head's matrix)
  virtual void gather_rows(const Matrix& w, const int32_t* ids, int m, float* out) = 0;
  // y: [m, dim] = x / rms(x) * weight
  virtual void rmsnorm(const float* x, int64_t ldx, const float* weight, int m, int dim, float eps,
                       float* y, int64_t ldy) = 0;
  // In place on x: [m, n_heads, head_dim] (row stride ld); cos/sin: [m, head_dim / 2]
  // (rotate-half convention of HF Llama).
  virtual void rope(float* x, int64_t ld, int m, int n_heads, int head_dim, const float* cos,
                    const float* sin) = 0;
  // Stores k/v: [m, n_kv_heads, head_dim] (row stride ld) at cache slots [m] (slot = page *
  // page_size + offset) of this layer's K and V.
  virtual void write_kv(const float* k, const float* v, int64_t ld, int m, int n_kv_heads, int head_dim,
                        int page_size, const int64_t* slots, float* k_cache, float* v_cache) = 0;
  virtual void attention(const AttentionBatch& batch) = 0;
  // Copies the K/V at cache slot src to slot dst in this layer's K and V (a draft-tree leaf that
  // was kept moves to its place in the sequence).
  virtual void copy_kv_slot(int n_kv_heads, int head_dim, int page_size, int64_t src, int64_t dst, float* k_cache,
                            float* v_cache) = 0;
  // out: [m, inter] = silu(gate_up[:, :inter]) * gate_up[:, inter:]
  virtual void silu_mul(const float* gate_up, int m, int inter, float* out) = 0;

  // Gemma 3's ops.
  // out: [m, inter] = gelu_tanh(gate_up[:, :inter]) * gate_up[:, inter:] (GeGLU; GELU's tanh form,
  // PyTorch's gelu(approximate="tanh"))
  virtual void gelu_tanh_mul(const float* gate_up, int m, int inter, float* out) = 0;
  // In place on x: [m, n_heads, head_dim] (row stride ld): each head's vector / rms(vector) * weight
  // (weight: [head_dim], shared by the heads) -- the q/k norms.
  virtual void rmsnorm_heads(float* x, int64_t ld, int m, int n_heads, int head_dim, const float* weight,
                             float eps) = 0;
  // y: [m, dim] += x / rms(x) * weight -- a norm on a block's output before the residual add.
  virtual void rmsnorm_add(const float* x, int64_t ldx, const float* weight, int m, int dim, float eps,
                           float* y, int64_t ldy) = 0;
  // x: [n] *= s
  virtual void scale(float* x, int64_t n, float s) = 0;
};

// The GPU backend on device `index` (CUDA or HIP, whichever this build has). Throws where the
// build has no GPU backend or the device is missing.
std::shared_ptr<Backend> make_gpu_backend(int index);
// Devices the GPU backend sees (0 without a GPU build, a driver or a device), and its kind:
// "cuda" (NVIDIA), "rocm" (AMD through HIP), "none" (no GPU backend built).
int gpu_device_count();
std::string gpu_device_kind();

// The CPU backend with `num_threads` threads (0: all cores) and the given kernel ISA
// ("auto" | "avx512" | "avx2" | "scalar"). Throws if the ISA is not available here.
std::shared_ptr<Backend> make_cpu_backend(int num_threads, const std::string& isa);

}  // namespace pyserve
