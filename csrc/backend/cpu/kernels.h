#pragma once
// Plain declarations shared by the per-ISA kernel translation units. Nothing here may be an inline
// function or template: each ISA file is compiled with its own -m flags, and a shared inline
// definition could be emitted with AVX-512 code and picked by the linker for everyone.
#include <cstdint>

namespace pyserve::cpu {

// Packed weight layout. A weight W: [n, k] (PyTorch's [out_features, in_features]) is stored in
// groups of kGroupRows output rows; inside a group the k index is outermost, so a group is one
// contiguous stream: data[g * kGroupRows * k + c * width_g + j] = W[g * kGroupRows + j][c], where
// width_g = 16 * (panels in group g) and rows past n are zero. Decode reads each group front to
// back exactly once; prefill reuses a group (in L2) across a tile of tokens.
constexpr int kPanelRows = 16;
constexpr int kGroupPanels = 3;
constexpr int kGroupRows = kPanelRows * kGroupPanels;

struct GemmArgs {
  const float* x = nullptr;  // x: [m, k], row stride ldx
  int64_t ldx = 0;
  const float* w = nullptr;  // packed W: [n, k]
  const float* bias = nullptr;  // [n] or null
  float* y = nullptr;        // y: [m, n], row stride ldy;  y = x · Wᵀ (+ bias) (+ y if accumulate)
  int64_t ldy = 0;
  int m = 0, n = 0, k = 0;
  bool accumulate = false;
  int group_begin = 0, group_end = 0;  // the groups of output rows this call computes
};

// KV cache layout of one layer (page_size slots per page):
//   K: [num_pages][n_kv_heads][head_dim][page_size]  -- transposed inside a page, so the scores of
//      one query against a whole page are page_size-wide vector FMAs with no horizontal sums
//   V: [num_pages][n_kv_heads][page_size][head_dim]  -- a row per slot, for out += p * v
//
// Attention of a block of consecutive tokens of one sequence against one KV head, for the
// `group` query heads that share it (GQA). Query (t, g) reads q[t * q_stride + g * head_dim]
// and writes out[t * out_stride + g * head_dim]; token t attends to positions
// [max(0, pos_t - window + 1) if window else 0, pos_t].
constexpr int kMaxAttendQueries = 128;  // n_tokens * group per call

struct AttendArgs {
  const float* q = nullptr;
  int64_t q_stride = 0;
  float* out = nullptr;
  int64_t out_stride = 0;
  int n_tokens = 0, group = 0, head_dim = 0;
  float scale = 1.f;
  const float* k_cache = nullptr;
  const float* v_cache = nullptr;
  int n_kv_heads = 0, kv_head = 0, page_size = 0;
  const int32_t* page_table = nullptr;
  const int32_t* positions = nullptr;  // [n_tokens], ascending
  int window = 0;
  float* scratch = nullptr;  // >= n_tokens * group * (positions[last] - lo(positions[0]) + 1)
};

// Block-quantized weights read in place (GGUF blocks, csrc/tensor/quant_blocks.h). A few rows at a
// time are dequantized (exactly d * q (+ m) of the file's blocks) into an L1 buffer and dotted with
// float32 activations: the model computes with the file's weights, and the activations keep full
// precision (no 8-bit rounding). Each output y[i, r] is one FMA chain over its row in column order
// (vector lanes = columns), then one horizontal sum -- the same operations whatever m is and
// whichever rows share a tile, so a sequence gets bit-identical logits alone or batched with
// strangers (a seeded request samples the same tokens under load).
// Formats with a native kernel; the others are dequantized to a PackedMatrix when loaded.
enum class QFormat { Q4_0, Q4_1, Q8_0 };
constexpr int kQBlock = 32;     // weights per block
constexpr int kQTileCols = 4;   // weight rows dequantized together (the buffer stays in L1)

struct QMatmulArgs {
  QFormat format = QFormat::Q4_0;
  const uint8_t* const* rows = nullptr;  // rows[r]: W[r, :] as k / 32 blocks
  int64_t k = 0;
  const float* x = nullptr;  // x: [m, k], row stride ldx
  int64_t ldx = 0;
  int m = 0;
  float* y = nullptr;        // y: [m, n], row stride ldy; y[:, r] = x · W[r, :] (+ bias[r]) (+ y)
  int64_t ldy = 0;
  const float* bias = nullptr;
  bool accumulate = false;
  int64_t row_begin = 0, row_end = 0;
  float* scratch = nullptr;  // >= kQTileCols * k floats, this thread's
};

struct KernelTable {
  const char* name;
  void (*gemm)(const GemmArgs&);
  void (*attend)(const AttendArgs&);
  float (*stream_sum)(const float* x, int64_t n);  // sum of x: the read-bandwidth yardstick
  void (*qmatmul)(const QMatmulArgs&);
  // out: [k] = W's row `row` dequantized (k / 32 blocks of `format`)
  void (*qdequant_row)(QFormat format, const uint8_t* row, int64_t k, float* out);
};

const KernelTable& kernels_scalar();
#if defined(PYSERVE_X86)
const KernelTable& kernels_avx2();
const KernelTable& kernels_avx512();
#endif

}  // namespace pyserve::cpu
