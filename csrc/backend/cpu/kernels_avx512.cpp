// AVX-512 kernels. This file alone is compiled with -mavx512*; it is only called after
// cpu_features() confirmed AVX-512 in both cpuid and XCR0. kernels_avx512_vnni.cpp compiles it
// again with PYSERVE_AVX512_VNNI defined (and -mavx512vnni): the quant-panel dot products then use
// vpdpwssd instead of vpmaddwd + vpaddd.
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
  using T = __m512;
  static constexpr int W = 16;
  static T zero() { return _mm512_setzero_ps(); }
  static T load(const float* p) { return _mm512_loadu_ps(p); }
  static T load_f16(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static T load_bf16(const uint16_t* p) {  // bf16 is the top half of a float32
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
  }
  static T set1(float v) { return _mm512_set1_ps(v); }
  static T fmadd(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
  static T add(T a, T b) { return _mm512_add_ps(a, b); }
  static T mul(T a, T b) { return _mm512_mul_ps(a, b); }
  static T sub(T a, T b) { return _mm512_sub_ps(a, b); }
  static T div(T a, T b) { return _mm512_div_ps(a, b); }
  // e^x for x <= 88 (softmax, SiLU), within ~2 ulp: x = n ln2 + r, e^r by Cephes' expf polynomial,
  // times 2^n (vscalefps); below -87.3 the result is 0.
  static T exp(T x) {
    const __mmask16 normal = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.3f), _CMP_GE_OQ);
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.f));
    const T n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    T r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    T p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
    return _mm512_maskz_scalef_ps(normal, p, n);
  }
  static T fnmadd(T a, T b, T c) { return _mm512_fnmadd_ps(a, b, c); }  // c - a * b
  static void store(float* p, T v) { _mm512_storeu_ps(p, v); }
  static float sum(T v) { return _mm512_reduce_add_ps(v); }
};
// 6 tokens x 3 vectors: 18 accumulators + 6 broadcasts + 1 weight vector of 32 registers.
constexpr int kTileTokens = 6;

#include "backend/cpu/kernels_simd.inc"

struct QOps {
  using I = __m512i;
  static I load(const uint8_t* p) { return _mm512_loadu_si512(p); }
  static I zero() { return _mm512_setzero_si512(); }
  static I add(I a, I b) { return _mm512_add_epi32(a, b); }
  static I set1(int32_t v) { return _mm512_set1_epi32(v); }
  template <int N>
  static I nib(I w) {
    if constexpr (N == 3) return _mm512_srli_epi16(w, 12);
    else if constexpr (N == 0) return _mm512_and_si512(w, _mm512_set1_epi16(0x0F));
    else return _mm512_and_si512(_mm512_srli_epi16(w, 4 * N), _mm512_set1_epi16(0x0F));
  }
  static I s8lo(I w) { return _mm512_srai_epi16(_mm512_slli_epi16(w, 8), 8); }
  static I s8hi(I w) { return _mm512_srai_epi16(w, 8); }
  static I u8lo(I w) { return _mm512_and_si512(w, _mm512_set1_epi16(0xFF)); }
  static I u8hi(I w) { return _mm512_srli_epi16(w, 8); }
  static I and16(I w, uint16_t m) { return _mm512_and_si512(w, _mm512_set1_epi16(static_cast<short>(m))); }
  static I or_(I a, I b) { return _mm512_or_si512(a, b); }
  static I shift16(I w, int s) {  // constant after unrolling: an immediate shift
    return s >= 0 ? _mm512_slli_epi16(w, s) : _mm512_srli_epi16(w, -s);
  }
  static I dot(I acc, I w, const int16_t* x) {
    int32_t pair;
    std::memcpy(&pair, x, 4);
#if defined(PYSERVE_AVX512_VNNI)
    return _mm512_dpwssd_epi32(acc, w, _mm512_set1_epi32(pair));
#else
    return _mm512_add_epi32(acc, _mm512_madd_epi16(w, _mm512_set1_epi32(pair)));
#endif
  }
  static __m512 cvt(I v) { return _mm512_cvtepi32_ps(v); }
  static __m512 u8(const uint8_t* p) { return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))); }
  static __m512 s8(const uint8_t* p) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))); }
  static __m512 f16(const uint8_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static void quantize_block(const float* x, int16_t* q, float* scale, int32_t* qsum) {
    const __m512 a = _mm512_loadu_ps(x), b = _mm512_loadu_ps(x + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
    const float inv = amax > 0.f ? 32767.f / amax : 0.f;
    *scale = amax / 32767.f;
    const __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, _mm512_set1_ps(inv)));
    const __m512i qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, _mm512_set1_ps(inv)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), _mm512_cvtepi32_epi16(qa));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + 16), _mm512_cvtepi32_epi16(qb));
    qsum[0] = _mm512_reduce_add_epi32(qa);
    qsum[1] = _mm512_reduce_add_epi32(qb);
  }
};
// 8 rows x (1 int32 + 1 float accumulator) + code vectors of 32 registers.
constexpr int kQPanelRows = 8;

#include "backend/cpu/kernels_qpanel.inc"

}  // namespace

#if defined(PYSERVE_AVX512_VNNI)
const KernelTable& kernels_avx512_vnni() {
  static const KernelTable table{"avx512_vnni", gemm_simd, attend_simd, stream_sum_simd, quantize_acts_simd,
                                 qpanel_matmul_simd, silu_mul_simd};
  return table;
}
#else
const KernelTable& kernels_avx512() {
  static const KernelTable table{"avx512", gemm_simd, attend_simd, stream_sum_simd, quantize_acts_simd,
                                 qpanel_matmul_simd, silu_mul_simd};
  return table;
}
#endif

}  // namespace pyserve::cpu
