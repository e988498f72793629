#pragma once
#include <cstdint>

#include "backend/cuda/gpu_compat.h"

namespace pyserve::gpu {

// In place on x: [m, n_heads, head_dim] (row stride ld), with cos/sin: [m, head_dim / 2] device
// tables (Backend::rope's contract; rope_kv.cu computes the angles itself instead).
void rope_table(float* x, int64_t ld, int m, int n_heads, int head_dim, const float* cos, const float* sin,
                gpuStream_t stream);

}  // namespace pyserve::gpu
