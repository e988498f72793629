#pragma once
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "backend/cpu/kernels.h"
#include "backend/cpu/quant_panels.h"
#include "backend/cpu/thread_pool.h"

namespace pyserve::cpu {

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};
using AlignedFloats = std::unique_ptr<float[], FreeDeleter>;
AlignedFloats allocate_floats(size_t n);  // 64-byte aligned, uninitialised

// W: [n, k] in the grouped panel layout described in kernels.h, elements of one FloatType.
class PackedMatrix final : public Matrix {
 public:
  PackedMatrix(int64_t n, int64_t k, FloatType type, std::shared_ptr<WeightArena> arena);
  int64_t rows() const override { return n_; }
  int64_t cols() const override { return k_; }
  size_t bytes() const override { return size_ * element_bytes(); }
  int64_t groups() const { return (n_ + kGroupRows - 1) / kGroupRows; }
  FloatType type() const { return type_; }
  size_t element_bytes() const { return type_ == FloatType::F32 ? 4 : 2; }
  uint8_t* data() { return data_; }
  const uint8_t* data() const { return data_; }
  float at(int64_t row, int64_t col) const;  // element W[row][col]

 private:
  int64_t n_, k_;
  size_t size_;  // elements, padding included
  FloatType type_;
  std::shared_ptr<WeightArena> arena_;  // owns data_
  uint8_t* data_ = nullptr;
};

// Row blocks of different formats computed as one matrix (q|k|v or gate|up of a file that mixes
// quantization types, as Q4_K_M files do): one matmul per part, into adjacent output columns.
class StackedMatrix final : public Matrix {
 public:
  explicit StackedMatrix(std::vector<std::unique_ptr<Matrix>> parts);
  int64_t rows() const override { return rows_; }
  int64_t cols() const override { return parts_.front()->cols(); }
  size_t bytes() const override;
  const std::vector<std::unique_ptr<Matrix>>& parts() const { return parts_; }

 private:
  std::vector<std::unique_ptr<Matrix>> parts_;
  int64_t rows_ = 0;
};

class CpuBackend final : public Backend {
 public:
  CpuBackend(int num_threads, const KernelTable& kernels);
  std::string name() const override;
  int num_threads() const override { return pool_.size(); }
  const KernelTable& kernels() const { return kernels_; }
  ThreadPool& pool() { return pool_; }

  std::unique_ptr<Buffer> allocate(size_t n_floats) override;
  std::unique_ptr<Matrix> pack(const std::vector<const TensorView*>& parts) override;
  void matmul(const Matrix& w, const float* x, int64_t ldx, int m, float* y, int64_t ldy,
              const float* bias, bool accumulate) override;
  void gather_rows(const Matrix& w, const int32_t* ids, int m, float* out) override;
  void rmsnorm(const float* x, int64_t ldx, const float* weight, int m, int dim, float eps, float* y,
               int64_t ldy) override;
  void rope(float* x, int64_t ld, int m, int n_heads, int head_dim, const float* cos,
            const float* sin) override;
  void write_kv(const float* k, const float* v, int64_t ld, int m, int n_kv_heads, int head_dim,
                int page_size, const int64_t* slots, float* k_cache, float* v_cache) override;
  void attention(const AttentionBatch& b) override;
  void copy_kv_slot(int n_kv_heads, int head_dim, int page_size, int64_t src, int64_t dst, float* k_cache,
                    float* v_cache) override;
  void silu_mul(const float* gate_up, int m, int inter, float* out) override;
  // Gemma 3's ops: plain scalar loops for now (cheap next to the matmuls).
  void gelu_tanh_mul(const float* gate_up, int m, int inter, float* out) override;
  void rmsnorm_heads(float* x, int64_t ld, int m, int n_heads, int head_dim, const float* weight,
                     float eps) override;
  void rmsnorm_add(const float* x, int64_t ldx, const float* weight, int m, int dim, float eps, float* y,
                   int64_t ldy) override;
  void scale(float* x, int64_t n, float s) override;

 private:
  const KernelTable& kernels_;
  ThreadPool pool_;
  std::shared_ptr<WeightArena> arena_ = std::make_shared<WeightArena>();  // every packed matrix
  std::vector<std::vector<float>> scratch_;  // per thread, for attention scores
  std::vector<float> split_out_, split_stats_;  // split decode attention's partial results
  std::vector<std::vector<float>> sink_parts_;  // per thread: attention_with_sink's two halves
  void attention_with_sink(const AttentionBatch& b);
  void attention_of_leaves(const AttentionBatch& b);
  // Activations quantized for the quant panels (QActs), grown to the largest m * k seen.
  std::vector<int16_t> act_q_;
  std::vector<float> act_scale_;
  std::vector<int32_t> act_qsum_;
  void matmul_quant(const QuantPanels& w, const float* x, int64_t ldx, int m, float* y, int64_t ldy,
                    const float* bias, bool accumulate);
};

// The kernel table for an ISA name ("auto" picks the best this CPU and OS allow).
const KernelTable& select_kernels(const std::string& isa);

}  // namespace pyserve::cpu
