#pragma once
// The packed block layouts of GGUF's quantized tensor types, byte for byte as llama.cpp writes them
// (ggml-common.h). A row of a [rows, cols] tensor is cols / kElems consecutive blocks. Each layout
// is a struct with a static_assert on its size: the file's bytes are read through these structs
// in place (memory-mapped, never copied), so a padding byte would silently misread every weight.
#include <cstdint>

namespace pyserve {

using f16_bits = uint16_t;  // IEEE half, as stored

// Defined in dequantize.cpp, not inline: the per-ISA kernel files include this header with their
// own -m flags, and an inline definition compiled there could be the one the linker keeps.
float f16_to_f32(f16_bits h);
float bf16_to_f32(uint16_t h);  // bfloat16 is the top half of a float32

// --- 32 weights a block ---------------------------------------------------------------------------
constexpr int kQK = 32;

struct BlockQ4_0 {  // w = d * (q - 8); q: low nibbles are weights 0..15, high nibbles 16..31
  f16_bits d;
  uint8_t qs[kQK / 2];
};
static_assert(sizeof(BlockQ4_0) == 18, "Q4_0 block is 18 bytes");

struct BlockQ4_1 {  // w = d * q + m
  f16_bits d;
  f16_bits m;
  uint8_t qs[kQK / 2];
};
static_assert(sizeof(BlockQ4_1) == 20, "Q4_1 block is 20 bytes");

struct BlockQ5_0 {  // w = d * (q - 16); bit 4 of weight j is bit j of qh
  f16_bits d;
  uint8_t qh[4];
  uint8_t qs[kQK / 2];
};
static_assert(sizeof(BlockQ5_0) == 22, "Q5_0 block is 22 bytes");

struct BlockQ5_1 {  // w = d * q + m
  f16_bits d;
  f16_bits m;
  uint8_t qh[4];
  uint8_t qs[kQK / 2];
};
static_assert(sizeof(BlockQ5_1) == 24, "Q5_1 block is 24 bytes");

struct BlockQ8_0 {  // w = d * q
  f16_bits d;
  int8_t qs[kQK];
};
static_assert(sizeof(BlockQ8_0) == 34, "Q8_0 block is 34 bytes");

// --- K-quants: 256 weights a super-block, in sub-blocks with their own (quantized) scales --------
constexpr int kQK_K = 256;
constexpr int kScaleBytesK = 12;  // Q3_K/Q4_K/Q5_K: 6-bit scales (and mins) packed into 12 bytes

struct BlockQ2_K {  // 16 sub-blocks of 16: w = d * (scales & 15) * q - dmin * (scales >> 4)
  uint8_t scales[kQK_K / 16];
  uint8_t qs[kQK_K / 4];
  f16_bits d;
  f16_bits dmin;
};
static_assert(sizeof(BlockQ2_K) == 84, "Q2_K block is 84 bytes");

struct BlockQ3_K {  // 16 sub-blocks of 16: w = d * (scale - 32) * (q - (hmask bit ? 0 : 4))
  uint8_t hmask[kQK_K / 8];
  uint8_t qs[kQK_K / 4];
  uint8_t scales[kScaleBytesK];
  f16_bits d;
};
static_assert(sizeof(BlockQ3_K) == 110, "Q3_K block is 110 bytes");

struct BlockQ4_K {  // 8 sub-blocks of 32: w = d * scale * q - dmin * min
  f16_bits d;
  f16_bits dmin;
  uint8_t scales[kScaleBytesK];
  uint8_t qs[kQK_K / 2];
};
static_assert(sizeof(BlockQ4_K) == 144, "Q4_K block is 144 bytes");

struct BlockQ5_K {  // as Q4_K, with a fifth bit per weight in qh
  f16_bits d;
  f16_bits dmin;
  uint8_t scales[kScaleBytesK];
  uint8_t qh[kQK_K / 8];
  uint8_t qs[kQK_K / 2];
};
static_assert(sizeof(BlockQ5_K) == 176, "Q5_K block is 176 bytes");

struct BlockQ6_K {  // 16 sub-blocks of 16: w = d * scale * (q - 32), q from 4 low + 2 high bits
  uint8_t ql[kQK_K / 2];
  uint8_t qh[kQK_K / 4];
  int8_t scales[kQK_K / 16];
  f16_bits d;
};
static_assert(sizeof(BlockQ6_K) == 210, "Q6_K block is 210 bytes");

}  // namespace pyserve
