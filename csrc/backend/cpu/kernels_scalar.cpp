// Scalar reference kernels: the plainest correct loops, the yardstick the SIMD files are tested
// against, and the path used on CPUs without AVX2.
#include <cmath>

#include "backend/cpu/kernels.h"

namespace pyserve::cpu {
namespace {

void gemm_scalar(const GemmArgs& a) {
  const int row_begin = a.group_begin * kGroupRows;
  const int row_end = a.group_end * kGroupRows < a.n ? a.group_end * kGroupRows : a.n;
  for (int r = row_begin; r < row_end; ++r) {
    const int g = r / kGroupRows, j = r % kGroupRows;
    const int rows_in_group = (a.n - g * kGroupRows) < kGroupRows ? (a.n - g * kGroupRows) : kGroupRows;
    const int width = (rows_in_group + kPanelRows - 1) / kPanelRows * kPanelRows;
    const float* wg = a.w + static_cast<int64_t>(g) * kGroupRows * a.k;
    for (int i = 0; i < a.m; ++i) {
      const float* x = a.x + i * a.ldx;
      float acc = 0.f;
      for (int c = 0; c < a.k; ++c) acc += x[c] * wg[static_cast<int64_t>(c) * width + j];
      if (a.bias) acc += a.bias[r];
      float& y = a.y[i * a.ldy + r];
      y = a.accumulate ? y + acc : acc;
    }
  }
}

void attend_scalar(const AttendArgs& a) {
  const int len = a.hi - a.lo + 1;
  float max_score = -INFINITY;
  for (int t = 0; t < len; ++t) {
    const int pos = a.lo + t;
    const int64_t slot = static_cast<int64_t>(a.page_table[pos / a.page_size]) * a.page_size + pos % a.page_size;
    const float* k = a.k_cache + slot * a.kv_stride + a.head_offset;
    float s = 0.f;
    for (int d = 0; d < a.head_dim; ++d) s += a.q[d] * k[d];
    s *= a.scale;
    a.scratch[t] = s;
    if (s > max_score) max_score = s;
  }
  float sum = 0.f;
  for (int t = 0; t < len; ++t) {
    a.scratch[t] = std::exp(a.scratch[t] - max_score);
    sum += a.scratch[t];
  }
  for (int d = 0; d < a.head_dim; ++d) a.out[d] = 0.f;
  for (int t = 0; t < len; ++t) {
    const int pos = a.lo + t;
    const int64_t slot = static_cast<int64_t>(a.page_table[pos / a.page_size]) * a.page_size + pos % a.page_size;
    const float* v = a.v_cache + slot * a.kv_stride + a.head_offset;
    const float p = a.scratch[t] / sum;
    for (int d = 0; d < a.head_dim; ++d) a.out[d] += p * v[d];
  }
}

}  // namespace

const KernelTable& kernels_scalar() {
  static const KernelTable table{"scalar", gemm_scalar, attend_scalar};
  return table;
}

}  // namespace pyserve::cpu
