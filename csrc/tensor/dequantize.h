#pragma once
// Scalar reference dequantization of every supported tensor format: the ground truth the SIMD and
// GPU kernels are tested against, and the fallback that packs a format no kernel reads natively.
#include <cstdint>

#include "tensor/tensor.h"

namespace pyserve {

// out: [n] = the first n elements of the data starting at `src` (n a multiple of the format's
// block size; src at a block boundary).
void dequantize(DType type, const void* src, int64_t n, float* out);

}  // namespace pyserve
