// AVX2 + FMA kernels. This file alone is compiled with -mavx2 -mfma; it is only called after
// cpu_features() confirmed AVX2/FMA in both cpuid and XCR0.
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <type_traits>

#include "backend/cpu/kernels.h"
#include "tensor/quant_blocks.h"

namespace pyserve::cpu {
namespace {

struct Vec {
  using T = __m256;
  static constexpr int W = 8;
  static T zero() { return _mm256_setzero_ps(); }
  static T load(const float* p) { return _mm256_loadu_ps(p); }
  static T load_f16(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static T load_bf16(const uint16_t* p) {  // bf16 is the top half of a float32
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
  }
  static T set1(float v) { return _mm256_set1_ps(v); }
  static T fmadd(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
  static T add(T a, T b) { return _mm256_add_ps(a, b); }
  static T mul(T a, T b) { return _mm256_mul_ps(a, b); }
  static T sub(T a, T b) { return _mm256_sub_ps(a, b); }
  static T div(T a, T b) { return _mm256_div_ps(a, b); }
  // e^x for x <= 88 (softmax, SiLU), within ~2 ulp: x = n ln2 + r, e^r by Cephes' expf polynomial,
  // times 2^n built in the exponent bits; below -87.3 the result is 0 (n >= -126 stays normal).
  static T exp(T x) {
    const T lo = _mm256_set1_ps(-87.3f);
    const __m256 tiny = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_min_ps(_mm256_max_ps(x, lo), _mm256_set1_ps(88.f));  // 2^n stays a normal float
    const T n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    T r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    T p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(tiny, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
  }
  static T fnmadd(T a, T b, T c) { return _mm256_fnmadd_ps(a, b, c); }  // c - a * b
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

struct QOps {
  using I = __m256i;
  static I load(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static I zero() { return _mm256_setzero_si256(); }
  static I add(I a, I b) { return _mm256_add_epi32(a, b); }
  static I set1(int32_t v) { return _mm256_set1_epi32(v); }
  template <int N>
  static I nib(I w) {
    if constexpr (N == 3) return _mm256_srli_epi16(w, 12);
    else if constexpr (N == 0) return _mm256_and_si256(w, _mm256_set1_epi16(0x0F));
    else return _mm256_and_si256(_mm256_srli_epi16(w, 4 * N), _mm256_set1_epi16(0x0F));
  }
  static I s8lo(I w) { return _mm256_srai_epi16(_mm256_slli_epi16(w, 8), 8); }
  static I s8hi(I w) { return _mm256_srai_epi16(w, 8); }
  static I u8lo(I w) { return _mm256_and_si256(w, _mm256_set1_epi16(0xFF)); }
  static I u8hi(I w) { return _mm256_srli_epi16(w, 8); }
  static I and16(I w, uint16_t m) { return _mm256_and_si256(w, _mm256_set1_epi16(static_cast<short>(m))); }
  static I or_(I a, I b) { return _mm256_or_si256(a, b); }
  static I shift16(I w, int s) {  // constant after unrolling: an immediate shift
    return s >= 0 ? _mm256_slli_epi16(w, s) : _mm256_srli_epi16(w, -s);
  }
  static I dot(I acc, I w, const int16_t* x) {
    int32_t pair;
    std::memcpy(&pair, x, 4);
    return _mm256_add_epi32(acc, _mm256_madd_epi16(w, _mm256_set1_epi32(pair)));
  }
  static __m256 cvt(I v) { return _mm256_cvtepi32_ps(v); }
  static __m256 u8(const uint8_t* p) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)))); }
  static __m256 s8(const uint8_t* p) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)))); }
  static __m256 f16(const uint8_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static void quantize_block(const float* x, int16_t* q, float* scale, int32_t* qsum) {
    const __m256 sign = _mm256_set1_ps(-0.f);
    __m256 v[4];
    __m256 m = _mm256_setzero_ps();
    for (int j = 0; j < 4; ++j) {
      v[j] = _mm256_loadu_ps(x + 8 * j);
      m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v[j]));
    }
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    const float amax = _mm_cvtss_f32(h);
    const float inv = amax > 0.f ? 32767.f / amax : 0.f;
    *scale = amax / 32767.f;
    __m256i qi[4];
    for (int j = 0; j < 4; ++j) qi[j] = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], _mm256_set1_ps(inv)));
    for (int half = 0; half < 2; ++half) {
      // packs interleaves 128-bit lanes; the permute puts the 16 values back in order.
      const __m256i packed = _mm256_permute4x64_epi64(_mm256_packs_epi32(qi[2 * half], qi[2 * half + 1]), 0xD8);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + 16 * half), packed);
      __m256i s = _mm256_add_epi32(qi[2 * half], qi[2 * half + 1]);
      __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
      s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
      s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
      qsum[half] = _mm_cvtsi128_si32(s4);
    }
  }
};
// 4 rows x 2 vectors x (1 int32 + 1 float accumulator) + code vectors: some spills at 4 rows.
constexpr int kQPanelRows = 4;

#include "backend/cpu/kernels_qpanel.inc"

}  // namespace

const KernelTable& kernels_avx2() {
  static const KernelTable table{"avx2", gemm_simd, attend_simd, stream_sum_simd, quantize_acts_simd,
                                 qpanel_matmul_simd, silu_mul_simd};
  return table;
}

}  // namespace pyserve::cpu
