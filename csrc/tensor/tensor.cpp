#include "tensor/tensor.h"

#include "tensor/dequantize.h"

#include <cstring>
#include <sstream>
#include <stdexcept>

namespace pyserve {

namespace {

std::string shape_str(const std::vector<int64_t>& s) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < s.size(); ++i) os << (i ? ", " : "") << s[i];
  os << "]";
  return os.str();
}

}  // namespace

namespace {
constexpr DTypeInfo kInfo[] = {
    {"f32", 1, 4},     {"f16", 1, 2},      {"bf16", 1, 2},     {"q4_0", 32, 18},  {"q4_1", 32, 20},
    {"q5_0", 32, 22},  {"q5_1", 32, 24},   {"q8_0", 32, 34},   {"q2_k", 256, 84}, {"q3_k", 256, 110},
    {"q4_k", 256, 144}, {"q5_k", 256, 176}, {"q6_k", 256, 210},
};
constexpr int kNumTypes = static_cast<int>(sizeof(kInfo) / sizeof(kInfo[0]));
static_assert(kNumTypes == static_cast<int>(DType::Q6_K) + 1, "one DTypeInfo per DType, in order");
}  // namespace

const DTypeInfo& dtype_info(DType t) { return kInfo[static_cast<int>(t)]; }

DType parse_dtype(const std::string& f) {
  for (int i = 0; i < kNumTypes; ++i)
    if (f == kInfo[i].name) return static_cast<DType>(i);
  std::string names;
  for (int i = 0; i < kNumTypes; ++i) names += std::string(i ? ", " : "") + kInfo[i].name;
  throw std::invalid_argument("unsupported tensor format '" + f + "' (supported: " + names + ")");
}

bool is_quantized(DType t) { return dtype_info(t).block_elems > 1; }

int64_t dtype_bytes(DType t, int64_t elems) {
  const DTypeInfo& i = dtype_info(t);
  return elems / i.block_elems * i.block_bytes;
}

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

void TensorView::to_f32(int64_t begin, int64_t count, float* out) const {
  const DTypeInfo& info = dtype_info(dtype);
  if (begin % info.block_elems != 0)
    throw std::invalid_argument("tensor '" + name + "': conversion must start at a block boundary");
  dequantize(dtype, static_cast<const uint8_t*>(data) + dtype_bytes(dtype, begin), count, out);
}

std::vector<float> TensorView::to_f32() const {
  std::vector<float> v(static_cast<size_t>(numel()));
  to_f32(0, numel(), v.data());
  return v;
}

void TensorMap::add(TensorView t) {
  std::string name = t.name;
  tensors_[name] = std::move(t);
}

bool TensorMap::has(const std::string& name) const { return tensors_.count(name) != 0; }

const TensorView& TensorMap::get(const std::string& name) const {
  auto it = tensors_.find(name);
  if (it == tensors_.end()) throw std::invalid_argument("model is missing tensor '" + name + "'");
  return it->second;
}

const TensorView& TensorMap::get(const std::string& name, const std::vector<int64_t>& shape) const {
  const TensorView& t = get(name);
  if (t.shape != shape)
    throw std::invalid_argument("tensor '" + name + "' has shape " + shape_str(t.shape) +
                                ", expected " + shape_str(shape));
  return t;
}

}  // namespace pyserve
