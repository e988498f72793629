#include "model/weights.h"

#include <cstring>
#include <sstream>
#include <stdexcept>

namespace pyserve {

namespace {

float f16_to_f32(uint16_t h) {
  const uint32_t sign = (h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1f;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: renormalise
      exp = 127 - 15 + 1;
      while ((mant & 0x400u) == 0) {
        mant <<= 1;
        --exp;
      }
      mant &= 0x3ffu;
      bits = sign | (exp << 23) | (mant << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

std::string shape_str(const std::vector<int64_t>& s) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < s.size(); ++i) os << (i ? ", " : "") << s[i];
  os << "]";
  return os.str();
}

}  // namespace

DType parse_dtype(const std::string& f) {
  if (f == "f32") return DType::F32;
  if (f == "f16") return DType::F16;
  if (f == "bf16") return DType::BF16;
  throw std::invalid_argument("unsupported tensor format '" + f + "' (supported: f32, f16, bf16)");
}

size_t dtype_size(DType t) { return t == DType::F32 ? 4 : 2; }

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

void TensorView::to_f32(int64_t begin, int64_t count, float* out) const {
  switch (dtype) {
    case DType::F32:
      std::memcpy(out, static_cast<const float*>(data) + begin, count * 4);
      break;
    case DType::F16: {
      const auto* p = static_cast<const uint16_t*>(data) + begin;
      for (int64_t i = 0; i < count; ++i) out[i] = f16_to_f32(p[i]);
      break;
    }
    case DType::BF16: {
      const auto* p = static_cast<const uint16_t*>(data) + begin;
      for (int64_t i = 0; i < count; ++i) {
        const uint32_t bits = static_cast<uint32_t>(p[i]) << 16;
        std::memcpy(out + i, &bits, 4);
      }
      break;
    }
  }
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
