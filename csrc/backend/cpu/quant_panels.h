#pragma once
// GGUF block-quantized weights regrouped into quant panels (layout in kernels.h): the file's own
// integer codes and scales, never widened to float. Built once at load from the memory-mapped
// blocks (in parallel); decode streams each panel once per token.
#include <cstdint>
#include <memory>
#include <vector>

#include "backend/backend.h"
#include "backend/cpu/kernels.h"
#include "backend/cpu/thread_pool.h"
#include "backend/cpu/weight_arena.h"

namespace pyserve::cpu {

// The panel format for a GGUF type, or false when the type has none (F32/F16/BF16 take the
// float path).
bool panel_format(DType type, PanelFormat* out);

class QuantPanels final : public Matrix {
 public:
  // W: [n, k] = the row-wise concatenation of `parts`, all of one quantized type with a panel
  // format, k a multiple of the type's block.
  QuantPanels(const std::vector<const TensorView*>& parts, ThreadPool& pool, std::shared_ptr<WeightArena> arena);
  int64_t rows() const override { return n_; }
  int64_t cols() const override { return k_; }
  size_t bytes() const override { return static_cast<size_t>(panel_bytes_) * panels_; }
  DType type() const { return type_; }
  const PanelFormat& format() const { return format_; }
  int64_t panels() const { return panels_; }
  int64_t panel_bytes() const { return panel_bytes_; }
  const uint8_t* data() const { return data_; }
  // out: [k] = row `row`, dequantized from the panel: exactly the reference dequantization.
  void dequantize_row(int64_t row, float* out) const;

 private:
  DType type_;
  PanelFormat format_;
  int64_t n_, k_, panels_, panel_bytes_;
  std::shared_ptr<WeightArena> arena_;  // owns data_
  uint8_t* data_ = nullptr;
};

}  // namespace pyserve::cpu
