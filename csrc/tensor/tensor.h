#pragma once
// Tensors as the Python loader hands them over: a format, a pointer to its bytes (in place: often
// a memory-mapped file), a shape. The layer below csrc/backend and csrc/model: both include it.
#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace pyserve {

// Element formats: plain floats, and GGUF's block-quantized types (layouts in quant_blocks.h).
enum class DType { F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K };

struct DTypeInfo {
  const char* name;   // as the loader spells it: "f32", "q4_1", "q6_k", ...
  int block_elems;    // elements per block (1 for plain floats)
  int block_bytes;    // bytes per block
};
const DTypeInfo& dtype_info(DType t);
// Throws std::invalid_argument naming the supported formats.
DType parse_dtype(const std::string& format);
bool is_quantized(DType t);
// Bytes of `elems` elements (a whole number of blocks).
int64_t dtype_bytes(DType t, int64_t elems);

struct TensorView {
  std::string name;
  DType dtype = DType::F32;
  const void* data = nullptr;      // row-major, C-contiguous (rows of whole blocks)
  std::vector<int64_t> shape;      // PyTorch order, e.g. [out_features, in_features]
  int64_t numel() const;
  int64_t bytes() const { return dtype_bytes(dtype, numel()); }
  // Converts elements [begin, begin + count) to float32 (at block boundaries for quantized types).
  void to_f32(int64_t begin, int64_t count, float* out) const;
  std::vector<float> to_f32() const;
};

// The model's tensors by canonical (HF) name.
class TensorMap {
 public:
  void add(TensorView t);
  bool has(const std::string& name) const;
  const TensorView& get(const std::string& name) const;  // throws naming the missing tensor
  // get() plus a shape check, with a message naming expected and actual shapes.
  const TensorView& get(const std::string& name, const std::vector<int64_t>& shape) const;

 private:
  std::map<std::string, TensorView> tensors_;
};

}  // namespace pyserve
