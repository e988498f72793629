// Scalar reference kernels: the plainest correct loops, the yardstick the SIMD files are tested
// against, and the path used on CPUs without AVX2.
#include <cmath>
#include <vector>

#include "backend/cpu/kernels.h"
#include "tensor/dequantize.h"

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
  const int64_t ps = a.page_size, hd = a.head_dim, nkv = a.n_kv_heads;
  for (int t = 0; t < a.n_tokens; ++t) {
    const int hi = a.positions[t];
    const int lo = a.window > 0 && hi - a.window + 1 > 0 ? hi - a.window + 1 : 0;
    for (int g = 0; g < a.group; ++g) {
      const float* q = a.q + t * a.q_stride + g * hd;
      float* out = a.out + t * a.out_stride + g * hd;
      float* s = a.scratch;
      float max_score = -INFINITY;
      for (int pos = lo; pos <= hi; ++pos) {
        const int64_t page = a.page_table[pos / ps], off = pos % ps;
        const float* kt = a.k_cache + (page * nkv + a.kv_head) * hd * ps;  // [hd][ps]
        float dot = 0.f;
        for (int64_t d = 0; d < hd; ++d) dot += q[d] * kt[d * ps + off];
        s[pos - lo] = dot * a.scale;
        if (s[pos - lo] > max_score) max_score = s[pos - lo];
      }
      float sum = 0.f;
      for (int pos = lo; pos <= hi; ++pos) sum += (s[pos - lo] = std::exp(s[pos - lo] - max_score));
      for (int64_t d = 0; d < hd; ++d) out[d] = 0.f;
      for (int pos = lo; pos <= hi; ++pos) {
        const int64_t page = a.page_table[pos / ps], off = pos % ps;
        const float* v = a.v_cache + ((page * nkv + a.kv_head) * ps + off) * hd;
        const float p = s[pos - lo] / sum;
        for (int64_t d = 0; d < hd; ++d) out[d] += p * v[d];
      }
    }
  }
}

DType dtype_of(QFormat f) {
  return f == QFormat::Q4_0 ? DType::Q4_0 : f == QFormat::Q4_1 ? DType::Q4_1 : DType::Q8_0;
}

void qdequant_row_scalar(QFormat format, const uint8_t* row, int64_t k, float* out) {
  dequantize(dtype_of(format), row, k, out);  // the reference dequantization (csrc/tensor)
}

void qmatmul_scalar(const QMatmulArgs& a) {
  for (int64_t r = a.row_begin; r < a.row_end; ++r) {
    float* w = a.scratch;
    qdequant_row_scalar(a.format, a.rows[r], a.k, w);
    for (int i = 0; i < a.m; ++i) {
      const float* x = a.x + i * a.ldx;
      float acc = 0.f;
      for (int64_t c = 0; c < a.k; ++c) acc += x[c] * w[c];
      if (a.bias) acc += a.bias[r];
      float& y = a.y[i * a.ldy + r];
      y = a.accumulate ? y + acc : acc;
    }
  }
}

float stream_sum_scalar(const float* x, int64_t n) {
  float s = 0.f;
  for (int64_t i = 0; i < n; ++i) s += x[i];
  return s;
}

}  // namespace

const KernelTable& kernels_scalar() {
  static const KernelTable table{"scalar", gemm_scalar, attend_scalar, stream_sum_scalar, qmatmul_scalar,
                                    qdequant_row_scalar};
  return table;
}

}  // namespace pyserve::cpu
