#pragma once
// Tensors as the Python loader hands them over: a format, a pointer to its bytes, a shape.
#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace pyserve {

enum class DType { F32, F16, BF16 };

DType parse_dtype(const std::string& format);  // "f32" | "f16" | "bf16"; throws on others
size_t dtype_size(DType t);

struct TensorView {
  std::string name;
  DType dtype = DType::F32;
  const void* data = nullptr;      // row-major, C-contiguous
  std::vector<int64_t> shape;      // PyTorch order, e.g. [out_features, in_features]
  int64_t numel() const;
  // Converts elements [begin, begin + count) to float32.
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
