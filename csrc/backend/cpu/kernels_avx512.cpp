// AVX-512 kernels. This file alone is compiled with -mavx512*; it is only called after
// cpu_features() confirmed AVX-512 in both cpuid and XCR0.
#include <immintrin.h>

#include <cmath>
#include <cstdint>

#include "backend/cpu/kernels.h"
#include "tensor/quant_blocks.h"

namespace pyserve::cpu {
namespace {

struct Vec {
  using T = __m512;
  static constexpr int W = 16;
  static T zero() { return _mm512_setzero_ps(); }
  static T load(const float* p) { return _mm512_loadu_ps(p); }
  static T set1(float v) { return _mm512_set1_ps(v); }
  static T fmadd(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
  static T add(T a, T b) { return _mm512_add_ps(a, b); }
  static T mul(T a, T b) { return _mm512_mul_ps(a, b); }
  static T u4lo(const uint8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))),
                                               _mm512_set1_epi32(0x0F)));
  }
  static T u4hi(const uint8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_srli_epi32(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 4));
  }
  static T i8(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  static void store(float* p, T v) { _mm512_storeu_ps(p, v); }
  static float sum(T v) { return _mm512_reduce_add_ps(v); }
};
// 6 tokens x 3 vectors: 18 accumulators + 6 broadcasts + 1 weight vector of 32 registers.
constexpr int kTileTokens = 6;

#include "backend/cpu/kernels_simd.inc"

// F16C (required with AVX2 here): one instruction per block scale.
inline float f16_to_f32_fast(f16_bits h) { return _cvtsh_ss(h); }

#include "backend/cpu/kernels_quant.inc"

}  // namespace

const KernelTable& kernels_avx512() {
  static const KernelTable table{"avx512", gemm_simd, attend_simd, stream_sum_simd, qmatmul_simd, qdequant_row_simd};
  return table;
}

}  // namespace pyserve::cpu
