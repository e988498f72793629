// AVX2 + FMA kernels. This file alone is compiled with -mavx2 -mfma; it is only called after
// cpu_features() confirmed AVX2/FMA in both cpuid and XCR0.
#include <immintrin.h>

#include <cmath>
#include <cstdint>

#include "backend/cpu/kernels.h"

namespace pyserve::cpu {
namespace {

struct Vec {
  using T = __m256;
  static constexpr int W = 8;
  static T zero() { return _mm256_setzero_ps(); }
  static T load(const float* p) { return _mm256_loadu_ps(p); }
  static T set1(float v) { return _mm256_set1_ps(v); }
  static T fmadd(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
  static T add(T a, T b) { return _mm256_add_ps(a, b); }
  static void store(float* p, T v) { _mm256_storeu_ps(p, v); }
  static float sum(T v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
};
// 2 tokens x 6 vectors: 12 accumulators + 2 broadcasts + 1 weight vector of 16 registers.
constexpr int kTileTokens = 2;

#include "backend/cpu/kernels_simd.inc"

}  // namespace

const KernelTable& kernels_avx2() {
  static const KernelTable table{"avx2", gemm_simd, attend_simd, stream_sum_simd};
  return table;
}

}  // namespace pyserve::cpu
