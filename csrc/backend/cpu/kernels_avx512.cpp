// AVX-512 kernels. This file alone is compiled with -mavx512*; it is only called after
// cpu_features() confirmed AVX-512 in both cpuid and XCR0.
#include <immintrin.h>

#include <cmath>
#include <cstdint>

#include "backend/cpu/kernels.h"

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
  static void store(float* p, T v) { _mm512_storeu_ps(p, v); }
  static float sum(T v) { return _mm512_reduce_add_ps(v); }
};
// 6 tokens x 3 vectors: 18 accumulators + 6 broadcasts + 1 weight vector of 32 registers.
constexpr int kTileTokens = 6;

#include "backend/cpu/kernels_simd.inc"

}  // namespace

const KernelTable& kernels_avx512() {
  static const KernelTable table{"avx512", gemm_simd, attend_simd, stream_sum_simd};
  return table;
}

}  // namespace pyserve::cpu
