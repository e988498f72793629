#pragma once
// Device dequantization of GGUF blocks (and of plain f32 / f16 / bf16 rows), four consecutive
// weights at a time, for gemv.cu, gemm.cu and gather_rows (matmul.cu). The block layouts are
// tensor/quant_blocks.h's structs (with their size static_asserts); the arithmetic is
// tensor/dequantize.cpp's, so that a decoded weight is bit for bit the CPU reference's.
//
// The unit is a "run": weights [4j, 4j + 4) of a block. Every format's run shares one scale and
// one offset (sub-blocks are 16 or 32 weights, runs never straddle them), so a run decodes to
//   w[t] = scale * q[t] + bias        (t = 0..3, q[t] small integers held exactly in floats)
// which GEMV uses factored (scale * (q · x) + bias * sum(x): one multiply per run, not per weight)
// and GEMM / gather_rows evaluate per weight with dequant_exact (no fused multiply-add, as the
// CPU reference). Q6_K's q already includes its sub-block scale (the reference computes
// d * float(scale * q)), so its scale is d.
//
// A "part" is the pair of runs (first_run(p), first_run(p) + kPairStride) whose codes live in the
// same packed bytes (a nibble's low and high halves, a Q2_K byte's neighbouring 2-bit fields):
// GEMV decodes a part per thread and loads those bytes once. Every format has kElems / 8 parts.
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "backend/cuda/gpu_compat.h"
#include "tensor/quant_blocks.h"
#include "tensor/tensor.h"

namespace pyserve::gpu {

// Four decoded weights: w[t] = scale * q[t] + bias.
struct Run4 {
  float q[4];
  float scale;
  float bias;
};

// --- loads at the alignment the layout guarantees (blocks of 18, 22, 34, 110, 210 bytes are only
// 2-byte aligned; the launchers require 16-byte aligned weight data) -----------------------------
__device__ __forceinline__ uint32_t ld_u8(const uint8_t* p) { return *p; }
__device__ __forceinline__ uint32_t ld_u16(const uint8_t* p) { return *reinterpret_cast<const uint16_t*>(p); }
__device__ __forceinline__ uint32_t ld_u32(const uint8_t* p) { return *reinterpret_cast<const uint32_t*>(p); }
// A little-endian u32 at a 2-byte aligned address.
__device__ __forceinline__ uint32_t ld_u32_a2(const uint8_t* p) { return ld_u16(p) | (ld_u16(p + 2) << 16); }

// Byte t of v, minus an integer `offset`, as an exact float. On NVIDIA the integer-to-float
// converter runs at a quarter of the FMA rate, which would bound a 4-bit GEMV below bandwidth:
// instead the byte becomes the mantissa of 2^23 (one byte permute) and 2^23 + offset is
// subtracted (exact: both operands and the small integer result are representable). AMD converts
// a byte to float at full rate (v_cvt_f32_ubyte), so there it is a plain conversion.
__device__ __forceinline__ float byte_minus(uint32_t v, int t, float offset) {
#ifdef PYSERVE_GPU_CUDA
  return __uint_as_float(__byte_perm(v, 0x4B000000u, 0x7440u | static_cast<uint32_t>(t))) - (8388608.f + offset);
#else
  return static_cast<float>((v >> (8 * t)) & 0xFFu) - offset;
#endif
}

// Bits 0..3 of h to bit 0 of bytes 0..3 (h * (1 + 2^7 + 2^14 + 2^21) puts bit i at 8i; the other
// partial products land on distinct bits, so nothing carries into those).
__device__ __forceinline__ uint32_t spread4_to_bytes(uint32_t h) { return ((h & 0xFu) * 0x00204081u) & 0x01010101u; }

__device__ __forceinline__ void bytes_to_run(uint32_t v, float offset, float scale, float bias, Run4& r) {
#pragma unroll
  for (int t = 0; t < 4; ++t) r.q[t] = byte_minus(v, t, offset);
  r.scale = scale;
  r.bias = bias;
}

// scale * q + bias, rounded twice (never contracted to an FMA): the CPU reference's weight.
__device__ __forceinline__ float dequant_exact(const Run4& r, int t) {
#ifdef PYSERVE_GPU_HIP
#pragma clang fp contract(off)
  return r.scale * r.q[t] + r.bias;
#else
  return __fadd_rn(__fmul_rn(r.scale, r.q[t]), r.bias);
#endif
}

// Q4_K / Q5_K: the 6-bit scale and min of sub-block j (0..7) from the 12 packed bytes.
__device__ __forceinline__ void scale_min_k4(int j, const uint8_t* q, uint32_t& sc, uint32_t& mn) {
  if (j < 4) {
    sc = ld_u8(q + j) & 63u;
    mn = ld_u8(q + j + 4) & 63u;
  } else {
    sc = (ld_u8(q + j + 4) & 0xFu) | ((ld_u8(q + j - 4) >> 6) << 4);
    mn = (ld_u8(q + j + 4) >> 4) | ((ld_u8(q + j) >> 6) << 4);
  }
}

// Q3_K: the 6-bit scale of sub-block s (0..15) from the 12 packed bytes (dequantize.cpp's
// q3_k_scales, one entry): low 4 bits from byte (s / 4 % 2) * 4 + s % 4 (its high nibble for
// s >= 8), high 2 bits from byte 8 + s % 4 at bit 2 * (s / 4).
__device__ __forceinline__ int q3_k_scale(int s, const uint8_t* packed) {
  const int a = s / 4, i = s % 4;
  const uint32_t low4 = (ld_u8(packed + (a & 1) * 4 + i) >> (4 * (a >> 1))) & 0xFu;
  const uint32_t high2 = (ld_u8(packed + 8 + i) >> (2 * a)) & 3u;
  return static_cast<int>(low4 | (high2 << 4));
}

// --- one trait per format ------------------------------------------------------------------------
// kElems: weights a block (8 for the plain formats: one part); kBytes: bytes a block;
// kPairStride: a part's second run is first_run(p) + kPairStride; kHasBias: some run has bias != 0.
// run(row, blk, j, cols, out): run j of block blk of the row starting at `row` (cols: the row's
// length, which only the plain formats need, to zero weights past a ragged end).
template <DType T>
struct Format;

template <int kStride>
struct PairedRuns {
  static constexpr int kPairStride = kStride;
  // Parts (first, first + kStride) for first in [2 kStride g, 2 kStride g + kStride).
  __host__ __device__ static constexpr int first_run(int p) { return 2 * kStride * (p / kStride) + p % kStride; }
};

// Plain floats: a "block" is 8 elements; loads are vector loads where aligned and in range, else
// element by element with zeros past the row's end (any cols works).
template <>
struct Format<DType::F32> : PairedRuns<1> {
  static constexpr int kElems = 8, kBytes = 32;
  static constexpr bool kHasBias = false;
  __device__ static void run(const uint8_t* row, int64_t blk, int j, int64_t cols, Run4& r) {
    const int64_t e = blk * kElems + 4 * j;
    const float* p = reinterpret_cast<const float*>(row) + e;
    if (e + 4 <= cols && (reinterpret_cast<uintptr_t>(p) & 15u) == 0) {
      const float4 v = *reinterpret_cast<const float4*>(p);
      r.q[0] = v.x, r.q[1] = v.y, r.q[2] = v.z, r.q[3] = v.w;
    } else {
#pragma unroll
      for (int t = 0; t < 4; ++t) r.q[t] = e + t < cols ? p[t] : 0.f;
    }
    r.scale = 1.f;
    r.bias = 0.f;
  }
};

template <bool kBF16>
struct HalfFormat : PairedRuns<1> {
  static constexpr int kElems = 8, kBytes = 16;
  static constexpr bool kHasBias = false;
  __device__ static float to_float(uint16_t h) { return kBF16 ? bf16_bits_to_float(h) : f16_bits_to_float(h); }
  __device__ static void run(const uint8_t* row, int64_t blk, int j, int64_t cols, Run4& r) {
    const int64_t e = blk * kElems + 4 * j;
    const uint16_t* p = reinterpret_cast<const uint16_t*>(row) + e;
    if (e + 4 <= cols && (reinterpret_cast<uintptr_t>(p) & 7u) == 0) {
      const uint2 v = *reinterpret_cast<const uint2*>(p);
      r.q[0] = to_float(static_cast<uint16_t>(v.x & 0xFFFFu));
      r.q[1] = to_float(static_cast<uint16_t>(v.x >> 16));
      r.q[2] = to_float(static_cast<uint16_t>(v.y & 0xFFFFu));
      r.q[3] = to_float(static_cast<uint16_t>(v.y >> 16));
    } else {
#pragma unroll
      for (int t = 0; t < 4; ++t) r.q[t] = e + t < cols ? to_float(p[t]) : 0.f;
    }
    r.scale = 1.f;
    r.bias = 0.f;
  }
};
template <>
struct Format<DType::F16> : HalfFormat<false> {};
template <>
struct Format<DType::BF16> : HalfFormat<true> {};

// --- 32-weight blocks: weight i < 16 is the low nibble of qs[i], weight 16 + i its high nibble ----
template <>
struct Format<DType::Q4_0> : PairedRuns<4> {
  using Block = BlockQ4_0;
  static constexpr int kElems = kQK, kBytes = sizeof(Block);
  static constexpr bool kHasBias = false;
  __device__ static void run(const uint8_t* row, int64_t blk, int j, int64_t, Run4& r) {
    const Block* b = reinterpret_cast<const Block*>(row) + blk;
    const uint32_t v = ld_u32_a2(b->qs + 4 * (j & 3));
    const uint32_t nib = j < 4 ? v & 0x0F0F0F0Fu : (v >> 4) & 0x0F0F0F0Fu;
    bytes_to_run(nib, 8.f, f16_bits_to_float(b->d), 0.f, r);  // d * (q - 8)
  }
};

template <>
struct Format<DType::Q4_1> : PairedRuns<4> {
  using Block = BlockQ4_1;
  static_assert(offsetof(Block, qs) % 4 == 0 && sizeof(Block) % 4 == 0, "Q4_1 codes are 4-byte aligned");
  static constexpr int kElems = kQK, kBytes = sizeof(Block);
  static constexpr bool kHasBias = true;
  __device__ static void run(const uint8_t* row, int64_t blk, int j, int64_t, Run4& r) {
    const Block* b = reinterpret_cast<const Block*>(row) + blk;
    const uint32_t v = ld_u32(b->qs + 4 * (j & 3));
    const uint32_t nib = j < 4 ? v & 0x0F0F0F0Fu : (v >> 4) & 0x0F0F0F0Fu;
    bytes_to_run(nib, 0.f, f16_bits_to_float(b->d), f16_bits_to_float(b->m), r);  // d * q + m
  }
};

// Q5: bit 4 of weight i is bit i of qh.
__device__ __forceinline__ uint32_t q5_codes(int j, uint32_t qs_word, uint32_t qh) {
  const uint32_t nib = j < 4 ? qs_word & 0x0F0F0F0Fu : (qs_word >> 4) & 0x0F0F0F0Fu;
  return nib | (spread4_to_bytes(qh >> (4 * j)) << 4);
}

template <>
struct Format<DType::Q5_0> : PairedRuns<4> {
  using Block = BlockQ5_0;
  static constexpr int kElems = kQK, kBytes = sizeof(Block);
  static constexpr bool kHasBias = false;
  __device__ static void run(const uint8_t* row, int64_t blk, int j, int64_t, Run4& r) {
    const Block* b = reinterpret_cast<const Block*>(row) + blk;
    const uint32_t q = q5_codes(j, ld_u32_a2(b->qs + 4 * (j & 3)), ld_u32_a2(b->qh));
    bytes_to_run(q, 16.f, f16_bits_to_float(b->d), 0.f, r);  // d * (q - 16)
  }
};

template <>
struct Format<DType::Q5_1> : PairedRuns<4> {
  using Block = BlockQ5_1;
  static_assert(offsetof(Block, qh) % 4 == 0 && offsetof(Block, qs) % 4 == 0 && sizeof(Block) % 4 == 0,
                "Q5_1 bit planes are 4-byte aligned");
  static constexpr int kElems = kQK, kBytes = sizeof(Block);
  static constexpr bool kHasBias = true;
  __device__ static void run(const uint8_t* row, int64_t blk, int j, int64_t, Run4& r) {
    const Block* b = reinterpret_cast<const Block*>(row) + blk;
    const uint32_t q = q5_codes(j, ld_u32(b->qs + 4 * (j & 3)), ld_u32(b->qh));
    bytes_to_run(q, 0.f, f16_bits_to_float(b->d), f16_bits_to_float(b->m), r);  // d * q + m
  }
};

template <>
struct Format<DType::Q8_0> : PairedRuns<1> {
  using Block = BlockQ8_0;
  static constexpr int kElems = kQK, kBytes = sizeof(Block);
  static constexpr bool kHasBias = false;
  __device__ static void run(const uint8_t* row, int64_t blk, int j, int64_t, Run4& r) {
    const Block* b = reinterpret_cast<const Block*>(row) + blk;
    // int8 q as the byte q ^ 0x80 = q + 128
    const uint32_t v = ld_u32_a2(reinterpret_cast<const uint8_t*>(b->qs) + 4 * j) ^ 0x80808080u;
    bytes_to_run(v, 128.f, f16_bits_to_float(b->d), 0.f, r);  // d * q
  }
};

// --- K-quants: 256-weight super-blocks ------------------------------------------------------------
// Q2_K / Q3_K: weight 128 n + 32 s + l (l < 32) is bits 2s..2s+1 of qs[32 n + l], in sub-block
// 8 n + 2 s + l / 16. Run j: n = j / 32, s = j / 8 % 4, l = 4 (j % 8).
template <>
struct Format<DType::Q2_K> : PairedRuns<8> {
  using Block = BlockQ2_K;
  static_assert(offsetof(Block, qs) % 4 == 0 && offsetof(Block, d) % 4 == 0 && sizeof(Block) % 4 == 0,
                "Q2_K codes are 4-byte aligned");
  static constexpr int kElems = kQK_K, kBytes = sizeof(Block);
  static constexpr bool kHasBias = true;
  __device__ static void run(const uint8_t* row, int64_t blk, int j, int64_t, Run4& r) {
    const Block* b = reinterpret_cast<const Block*>(row) + blk;
    const int n = j / 32, s = j / 8 % 4, g = j % 8;
    const uint32_t q = (ld_u32(b->qs + 32 * n + 4 * g) >> (2 * s)) & 0x03030303u;
    const uint32_t sc = ld_u8(b->scales + 8 * n + 2 * s + g / 4);
    const uint32_t dd = ld_u32(reinterpret_cast<const uint8_t*>(&b->d));  // d | dmin << 16
    const float d = f16_bits_to_float(static_cast<uint16_t>(dd & 0xFFFFu));
    const float dmin = f16_bits_to_float(static_cast<uint16_t>(dd >> 16));
    // dl * q - ml
    bytes_to_run(q, 0.f, d * static_cast<float>(sc & 0xFu), -(dmin * static_cast<float>(sc >> 4)), r);
  }
};

template <>
struct Format<DType::Q3_K> : PairedRuns<8> {
  using Block = BlockQ3_K;
  static constexpr int kElems = kQK_K, kBytes = sizeof(Block);
  static constexpr bool kHasBias = false;
  __device__ static void run(const uint8_t* row, int64_t blk, int j, int64_t, Run4& r) {
    const Block* b = reinterpret_cast<const Block*>(row) + blk;
    const int n = j / 32, s = j / 8 % 4, g = j % 8;
    const uint32_t low = (ld_u32_a2(b->qs + 32 * n + 4 * g) >> (2 * s)) & 0x03030303u;
    // hmask[l] bit 4 n + s set: q as is; clear: q - 4. So q - 4 + 4 * bit = (q | bit << 2) - 4.
    const uint32_t high = (ld_u32_a2(b->hmask + 4 * g) >> (4 * n + s)) & 0x01010101u;
    const float d = f16_bits_to_float(b->d);
    bytes_to_run(low | (high << 2), 4.f, d * static_cast<float>(q3_k_scale(8 * n + 2 * s + g / 4, b->scales) - 32),
                 0.f, r);
  }
};

// Q4_K / Q5_K: weight 64 p + 32 h + l (l < 32) is nibble h of qs[32 p + l], in sub-block 2 p + h.
// Run j: p = j / 16, h = j / 8 % 2, l = 4 (j % 8).
template <class Block>
__device__ __forceinline__ void k4_scale_min(const Block* b, int sub, float& scale, float& bias) {
  uint32_t sc, mn;
  scale_min_k4(sub, b->scales, sc, mn);
  const uint32_t dd = ld_u32(reinterpret_cast<const uint8_t*>(&b->d));  // d | dmin << 16
  scale = f16_bits_to_float(static_cast<uint16_t>(dd & 0xFFFFu)) * static_cast<float>(sc);
  bias = -(f16_bits_to_float(static_cast<uint16_t>(dd >> 16)) * static_cast<float>(mn));  // d1 * q - m1
}

template <>
struct Format<DType::Q4_K> : PairedRuns<8> {
  using Block = BlockQ4_K;
  static_assert(offsetof(Block, qs) % 4 == 0 && sizeof(Block) % 16 == 0, "Q4_K codes are 4-byte aligned");
  static constexpr int kElems = kQK_K, kBytes = sizeof(Block);
  static constexpr bool kHasBias = true;
  __device__ static void run(const uint8_t* row, int64_t blk, int j, int64_t, Run4& r) {
    const Block* b = reinterpret_cast<const Block*>(row) + blk;
    const int p = j / 16, h = j / 8 % 2, g = j % 8;
    const uint32_t nib = (ld_u32(b->qs + 32 * p + 4 * g) >> (4 * h)) & 0x0F0F0F0Fu;
    float scale, bias;
    k4_scale_min(b, 2 * p + h, scale, bias);
    bytes_to_run(nib, 0.f, scale, bias, r);
  }
};

template <>
struct Format<DType::Q5_K> : PairedRuns<8> {
  using Block = BlockQ5_K;
  static_assert(offsetof(Block, qh) % 4 == 0 && offsetof(Block, qs) % 4 == 0 && sizeof(Block) % 16 == 0,
                "Q5_K bit planes are 4-byte aligned");
  static constexpr int kElems = kQK_K, kBytes = sizeof(Block);
  static constexpr bool kHasBias = true;
  __device__ static void run(const uint8_t* row, int64_t blk, int j, int64_t, Run4& r) {
    const Block* b = reinterpret_cast<const Block*>(row) + blk;
    const int p = j / 16, h = j / 8 % 2, g = j % 8;
    const uint32_t nib = (ld_u32(b->qs + 32 * p + 4 * g) >> (4 * h)) & 0x0F0F0F0Fu;
    // bit 2 p + h of qh[l] is bit 4 of the code
    const uint32_t high = (ld_u32(b->qh + 4 * g) >> (2 * p + h)) & 0x01010101u;
    float scale, bias;
    k4_scale_min(b, 2 * p + h, scale, bias);
    bytes_to_run(nib | (high << 4), 0.f, scale, bias, r);
  }
};

// Q6_K: weight 128 n + 32 c + l (l < 32) has low bits nibble c / 2 of ql[64 n + 32 (c % 2) + l],
// high bits 2c..2c+1 of qh[32 n + l], sub-block scale scales[8 n + l / 16 + 2 c].
// Run j: n = j / 32, c = j / 8 % 4, l = 4 (j % 8).
template <>
struct Format<DType::Q6_K> : PairedRuns<16> {
  using Block = BlockQ6_K;
  static constexpr int kElems = kQK_K, kBytes = sizeof(Block);
  static constexpr bool kHasBias = false;
  __device__ static void run(const uint8_t* row, int64_t blk, int j, int64_t, Run4& r) {
    const Block* b = reinterpret_cast<const Block*>(row) + blk;
    const int n = j / 32, c = j / 8 % 4, g = j % 8;
    const uint32_t low = (ld_u32_a2(b->ql + 64 * n + 32 * (c % 2) + 4 * g) >> (4 * (c / 2))) & 0x0F0F0F0Fu;
    const uint32_t high = (ld_u32_a2(b->qh + 32 * n + 4 * g) >> (2 * c)) & 0x03030303u;
    const float sc = static_cast<float>(static_cast<int8_t>(ld_u8(reinterpret_cast<const uint8_t*>(b->scales) + 8 * n +
                                                                  g / 4 + 2 * c)));
    bytes_to_run(low | (high << 4), 32.f, f16_bits_to_float(b->d), 0.f, r);
    // q = float(scale * (code - 32)), exact (|product| <= 4096): the reference's d * float(sc * q)
#pragma unroll
    for (int t = 0; t < 4; ++t) r.q[t] *= sc;
  }
};

// --- activations ---------------------------------------------------------------------------------
// x[e .. e + 4) of one float32 row of length `cols` (zeros past its end); `vec`: the row start is
// 16-byte aligned (x aligned and its row stride a multiple of 4), so one 16-byte load does.
__device__ __forceinline__ void load_x4(const float* row, int64_t e, int64_t cols, bool vec, float out[4]) {
  if (vec && e + 4 <= cols) {
    const float4 v = *reinterpret_cast<const float4*>(row + e);
    out[0] = v.x, out[1] = v.y, out[2] = v.z, out[3] = v.w;
  } else {
#pragma unroll
    for (int t = 0; t < 4; ++t) out[t] = e + t < cols ? row[e + t] : 0.f;
  }
}
__host__ __device__ inline bool rows_are_16b_aligned(const float* x, int64_t ld) {
  return (reinterpret_cast<uintptr_t>(x) & 15u) == 0 && ld % 4 == 0;
}

// Calls fn(Format<T>{}) for the runtime format t (host side: picks the kernel instantiation).
template <class Fn>
void with_format(DType t, const char* op, Fn&& fn) {
  switch (t) {
    case DType::F32: return fn(Format<DType::F32>{});
    case DType::F16: return fn(Format<DType::F16>{});
    case DType::BF16: return fn(Format<DType::BF16>{});
    case DType::Q4_0: return fn(Format<DType::Q4_0>{});
    case DType::Q4_1: return fn(Format<DType::Q4_1>{});
    case DType::Q5_0: return fn(Format<DType::Q5_0>{});
    case DType::Q5_1: return fn(Format<DType::Q5_1>{});
    case DType::Q8_0: return fn(Format<DType::Q8_0>{});
    case DType::Q2_K: return fn(Format<DType::Q2_K>{});
    case DType::Q3_K: return fn(Format<DType::Q3_K>{});
    case DType::Q4_K: return fn(Format<DType::Q4_K>{});
    case DType::Q5_K: return fn(Format<DType::Q5_K>{});
    case DType::Q6_K: return fn(Format<DType::Q6_K>{});
  }
  throw std::invalid_argument(std::string(op) +
                              ": unknown weight format (supported: f32, f16, bf16, q4_0, q4_1, q5_0, q5_1, q8_0, "
                              "q2_k, q3_k, q4_k, q5_k, q6_k)");
}

}  // namespace pyserve::gpu
