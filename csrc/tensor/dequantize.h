#pragma once
// Scalar reference dequantization of every supported tensor format: the ground truth the SIMD and
// GPU kernels are tested against, and the fallback that packs a format no kernel reads natively.
#include <cstdint>

#include "tensor/tensor.h"

namespace pyserve {

// out: [n] = the first n elements of the data starting at `src` (n a multiple of the format's
// block size; src at a block boundary).
void dequantize(DType type, const void* src, int64_t n, float* out);

// K-quant sub-block scales, unpacked from their 12 packed bytes (shared with the CPU backend's
// quant panels, which regroup the same codes):
// the 6-bit scale and min of sub-block j (0..7) of a Q4_K / Q5_K super-block
void scale_min_k4(int j, const uint8_t* packed, uint8_t* d, uint8_t* m);
// the 16 scales of a Q3_K super-block, as 6-bit codes (the weight scale is d * (code - 32))
void q3_k_scales(const uint8_t* packed, int8_t out[16]);

}  // namespace pyserve
