// Scalar reference kernels: the plainest correct loops, the yardstick the SIMD files are tested
// against, and the path used on CPUs without AVX2.
#include <cmath>
#include <cstring>
#include <vector>

#include "backend/cpu/kernels.h"
#include "tensor/quant_blocks.h"

namespace pyserve::cpu {
namespace {

// Element i of the packed weights, widened to float.
float weight_at(const GemmArgs& a, int64_t i) {
  if (a.wtype == FloatType::F32) return static_cast<const float*>(a.w)[i];
  const uint16_t h = static_cast<const uint16_t*>(a.w)[i];
  return a.wtype == FloatType::F16 ? f16_to_f32(h) : bf16_to_f32(h);
}

void gemm_scalar(const GemmArgs& a) {
  const int row_begin = a.group_begin * kGroupRows;
  const int row_end = a.group_end * kGroupRows < a.n ? a.group_end * kGroupRows : a.n;
  for (int r = row_begin; r < row_end; ++r) {
    const int g = r / kGroupRows, j = r % kGroupRows;
    const int rows_in_group = (a.n - g * kGroupRows) < kGroupRows ? (a.n - g * kGroupRows) : kGroupRows;
    const int width = (rows_in_group + kPanelRows - 1) / kPanelRows * kPanelRows;
    const int64_t g0 = static_cast<int64_t>(g) * kGroupRows * a.k;
    for (int i = 0; i < a.m; ++i) {
      const float* x = a.x + i * a.ldx;
      float acc = 0.f;
      for (int c = 0; c < a.k; ++c) acc += x[c] * weight_at(a, g0 + static_cast<int64_t>(c) * width + j);
      if (a.bias) acc += a.bias[r];
      float& y = a.y[i * a.ldy + r];
      y = a.accumulate ? y + acc : acc;
    }
  }
}

void attend_scalar(const AttendArgs& a) {
  const int64_t ps = a.page_size, hd = a.head_dim, nkv = a.n_kv_heads;
  for (int t = 0; t < a.n_tokens; ++t) {
    int hi = a.positions[t];
    int lo = a.window > 0 && hi - a.window + 1 > 0 ? hi - a.window + 1 : 0;
    if (a.seg_hi >= 0) {
      lo = a.seg_lo > lo ? a.seg_lo : lo;
      hi = a.seg_hi < hi ? a.seg_hi : hi;
    }
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
      if (a.stats) {
        a.stats[2 * (t * a.group + g)] = max_score;
        a.stats[2 * (t * a.group + g) + 1] = sum;
      }
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

// --- quant panels (layout in kernels.h) ------------------------------------------------------

// One 32-block of activations: amax / 32767 per block, rounded to nearest even.
void quantize_acts_scalar(const QuantizeActsArgs& a) {
  const int64_t nb = a.k / kPanelBlock;
  for (int i = 0; i < a.m; ++i)
    for (int64_t b = 0; b < nb; ++b) {
      const float* x = a.x + i * a.ldx + b * kPanelBlock;
      int16_t* q = a.q + i * a.k + b * kPanelBlock;
      float amax = 0.f;
      for (int j = 0; j < kPanelBlock; ++j) amax = std::fabs(x[j]) > amax ? std::fabs(x[j]) : amax;
      const float inv = amax > 0.f ? 32767.f / amax : 0.f;
      a.scale[i * nb + b] = amax / 32767.f;
      int32_t sums[2] = {0, 0};
      for (int j = 0; j < kPanelBlock; ++j) {
        q[j] = static_cast<int16_t>(std::nearbyint(x[j] * inv));
        sums[j / 16] += q[j];
      }
      a.qsum[(i * nb + b) * 2] = sums[0];
      a.qsum[(i * nb + b) * 2 + 1] = sums[1];
    }
}

float f16_at(const uint8_t* p, int index) {
  uint16_t h;
  std::memcpy(&h, p + index * 2, 2);
  return f16_to_f32(h);
}

void qpanel_matmul_scalar(const QPanelArgs& a) {
  const PanelFormat& f = a.format;
  const int64_t nb = a.x.k / kPanelBlock;
  const int halves = f.per16 ? 2 : 1;
  for (int64_t p = a.panel_begin; p < a.panel_end; ++p)
    for (int r = 0; r < kPanelLanes && p * kPanelLanes + r < a.n; ++r) {
      const int64_t row = p * kPanelLanes + r;
      for (int i = a.row_begin; i < a.row_end; ++i) {
        float acc = 0.f;
        for (int64_t b = 0; b < nb; ++b) {
          const uint8_t* group = a.panels + p * a.panel_bytes + (b / f.group_records) * f.group_bytes;
          const uint8_t* rec = group + f.header_bytes + (b % f.group_records) * f.record_bytes;
          const int16_t* xq = a.x.q + i * a.x.k + b * kPanelBlock;
          const int64_t blk = i * nb + b;
          const float xs = a.x.scale[blk];
          for (int h = 0; h < halves; ++h) {
            int32_t dot = 0;
            const int j0 = h * kPanelBlock / halves, j1 = (h + 1) * kPanelBlock / halves;
            for (int j = j0; j < j1; ++j) dot += panel_code(f, rec, r, j) * xq[j];
            const int32_t qsum = f.per16 ? a.x.qsum[blk * 2 + h] : a.x.qsum[blk * 2] + a.x.qsum[blk * 2 + 1];
            if (!f.stored_min) dot += f.offset * qsum;
            const uint8_t* sc = rec + f.code_bytes;
            const uint8_t* mc = sc + f.scale_bytes;
            if (f.kquant) {
              // scale = d * sub-block code (signed for the formats without mins), min = -(dmin * code)
              const int code = f.stored_min ? static_cast<int>(sc[h * kPanelLanes + r])
                                            : static_cast<int>(static_cast<int8_t>(sc[h * kPanelLanes + r]));
              const float s = f16_at(group, r) * static_cast<float>(code);
              acc = std::fma(static_cast<float>(dot), s * xs, acc);
              if (f.stored_min) {
                const float mn = f16_at(group, kPanelLanes + r) * static_cast<float>(mc[h * kPanelLanes + r]);
                acc = std::fma(-mn, xs * static_cast<float>(qsum), acc);
              }
            } else {
              acc = std::fma(static_cast<float>(dot), f16_at(sc, h * kPanelLanes + r) * xs, acc);
              if (f.stored_min) acc = std::fma(f16_at(mc, h * kPanelLanes + r), xs * static_cast<float>(qsum), acc);
            }
          }
        }
        float o = acc;
        if (a.bias) o = o + a.bias[row];
        float& y = a.y[i * a.ldy + row];
        y = a.accumulate ? o + y : o;
      }
    }
}

void silu_mul_scalar(const float* gate, const float* up, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = gate[i] / (1.f + std::exp(-gate[i])) * up[i];
}

float stream_sum_scalar(const float* x, int64_t n) {
  float s = 0.f;
  for (int64_t i = 0; i < n; ++i) s += x[i];
  return s;
}

}  // namespace

int panel_code(const PanelFormat& f, const uint8_t* rec, int r, int j) {
  if (f.codes == PanelCodes::S8) {
    const int c = j / 4, e = j % 2, hi = (j % 4) / 2;
    return static_cast<int8_t>(rec[c * kPanelChunk + r * 4 + e * 2 + hi]);
  }
  const int c = j / 8, n = (j % 8) / 2, e = j % 2;
  const uint8_t* word = rec + c * kPanelChunk + r * 4 + e * 2;
  const int low = ((word[0] | word[1] << 8) >> (4 * n)) & 0xF;
  if (f.codes == PanelCodes::U4) return low;
  const int hb = panel_high_bits(f.codes);
  const PlaneSpot spot = panel_plane_spot(hb, c, r, e, n);
  const int high = (rec[spot.byte] >> spot.shift) & ((1 << hb) - 1);
  return low | high << 4;
}

const KernelTable& kernels_scalar() {
  static const KernelTable table{"scalar", gemm_scalar, attend_scalar, stream_sum_scalar, quantize_acts_scalar,
                                 qpanel_matmul_scalar, silu_mul_scalar};
  return table;
}

}  // namespace pyserve::cpu
