// AVX2 + FMA kernels. This file alone is compiled with -mavx2 -mfma; it is only called after
// cpu_features() confirmed AVX2/FMA in both cpuid and XCR0.
#include <immintrin.h>

#include <cmath>
#include <cstdint>

#include "backend/cpu/kernels.h"
#include "tensor/quant_blocks.h"

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
  static T mul(T a, T b) { return _mm256_mul_ps(a, b); }
  static T u4lo(const uint8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))),
                                               _mm256_set1_epi32(0x0F)));
  }
  static T u4hi(const uint8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_srli_epi32(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))), 4));
  }
  static T i8(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
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

// F16C (required with AVX2 here): one instruction per block scale.
inline float f16_to_f32_fast(f16_bits h) { return _cvtsh_ss(h); }

#include "backend/cpu/kernels_quant.inc"

}  // namespace

const KernelTable& kernels_avx2() {
  static const KernelTable table{"avx2", gemm_simd, attend_simd, stream_sum_simd, qmatmul_simd, qdequant_row_simd};
  return table;
}

}  // namespace pyserve::cpu
