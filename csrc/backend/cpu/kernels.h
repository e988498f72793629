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

// Element type of float panels: a checkpoint's own dtype by default (bf16 stays bf16, read at half
// the bytes of float32). 16-bit weights are widened to float32 in registers and meet float32
// activations, so the arithmetic is the float32 path's exactly (AVX512-BF16's vdpbf16ps would
// round the activations to bf16 too).
enum class FloatType : int { F32 = 0, F16 = 1, BF16 = 2 };

struct GemmArgs {
  const float* x = nullptr;  // x: [m, k], row stride ldx
  int64_t ldx = 0;
  const void* w = nullptr;   // packed W: [n, k] of wtype
  FloatType wtype = FloatType::F32;
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
  // One segment of a split decode (flash-decoding): with seg_hi >= 0, every query attends only to
  // its positions inside [seg_lo, seg_hi] (never an empty set: the caller splits a single token's
  // range), `out` is normalised over the segment, and stats[2 q] / stats[2 q + 1] receive the
  // segment's max score and sum of exp(score - max) for query q = t * group + g.
  int seg_lo = 0, seg_hi = -1;
  float* stats = nullptr;
};

// Block-quantized weights (GGUF's formats) as *quant panels*: the file's integer codes and scales,
// regrouped once at load (quant_panels.h) so that one vector lane is one output row. A panel is
// kPanelLanes rows; per 32-weight block of k it holds one record, and the records follow each other
// in k order, so a decode step streams each panel front to back once:
//   codes   U4: 4 chunks of 64 bytes; in chunk c, lane r's 32-bit word holds two 16-bit words e = 0, 1
//               of four nibbles n = 0..3: code of k = 8c + 2n + e          (formats of <= 4 bits)
//           U5, U6: the U4 chunks hold each code's low 4 bits; a plane after them holds the
//               high bits (HB = 1 or 2 of them): 64 * HB bytes, plane chunk c / (4 / HB) for code
//               chunk c. In lane r's 16-bit word e of that plane chunk, byte n / 2 holds nibble
//               n's high bits at bit 2 * HB * (c % (4 / HB)) + HB * (n % 2)   (5 and 6 bits:
//               the file's own bytes per weight, and code bytes the kernel splits with shifts)
//           S8: 8 chunks of 64 bytes; in chunk c, lane r's 16-bit word e holds the int8 codes of
//               k = 4c + e (low byte) and k = 4c + 2 + e (high byte)       (8 bits)
//   scales  per lane: legacy formats the file's f16 d; K-quants the sub-block's 6- or 8-bit scale
//           code as one byte (signed for Q3_K / Q6_K), multiplied by the super-block's d, which
//           (with dmin) heads each group of 8 records as 16 lanes of f16. per16 formats (Q2_K,
//           Q3_K, Q6_K) have two scales per record, for k 0..15 and 16..31.
//   mins    as scales, when the format has its own: f16 m (Q4_1, Q5_1, w = d q + m) or a byte
//           code times dmin (Q2_K, Q4_K, Q5_K, w = d sc q - dmin m)
// A weight is scale * code + min, or scale * (code + offset) (Q4_0: offset -8), exactly the value
// the reference dequantization gives, from about as many bytes as the file holds. Activations meet
// the codes as int16 (QActs, one scale per 32 values, round to nearest even): int16 x int16
// products summed in int32 per block (VNNI vpdpwssd, or vpmaddwd), then scaled in float. 16-bit
// activations keep the model within 3e-4 of float32 logits, where llama.cpp's 8-bit ones lose
// ~5% of top-1 agreement.
// Every output is computed by the same operations whatever the batch and tile, so a sequence's
// logits are bit-identical alone or batched with strangers.
constexpr int kPanelLanes = 16;   // output rows per panel
constexpr int kPanelBlock = 32;   // weights of k per record
constexpr int kPanelChunk = 64;   // bytes per code chunk
constexpr int kKGroup = 8;        // K-quant records per super-block (256 weights)

enum class PanelCodes : int { U4 = 0, S8 = 1, U5 = 2, U6 = 3 };

struct PanelFormat {
  PanelCodes codes = PanelCodes::U4;
  bool kquant = false;      // byte scale codes times a per-group f16 d (and dmin); else f16 scales
  bool per16 = false;       // two scales (and mins) per record
  bool stored_min = false;  // w = scale * code + min; else w = scale * (code + offset)
  int offset = 0;
  int group_records = 1;    // records per group (kKGroup for K-quants)
  int header_bytes = 0;     // per group: f16 d (and dmin) per lane, K-quants only
  int code_bytes = 0;       // per record: 256 (U4), 320 (U5), 384 (U6) or 512 (S8)
  int scale_bytes = 0;      // per record: kPanelLanes * (per16 ? 2 : 1) * (kquant ? 1 : 2); mins the same
  int record_bytes = 0;
  int group_bytes = 0;      // header + group_records records
};

// Activations quantized per 32-value block: x[i, 32 b + j] ~= scale[i, b] * q[i, 32 b + j].
struct QActs {
  const int16_t* q = nullptr;     // [m, k]
  const float* scale = nullptr;   // [m, k / 32]
  const int32_t* qsum = nullptr;  // [m, k / 32, 2]: sums of q over j 0..15 and 16..31
  int64_t k = 0;
};

// The code of weight j (0..31) of lane r in a record: the layout above, read one value at a time
// (the scalar kernel and QuantPanels::dequantize_row both read codes through it).
int panel_code(const PanelFormat& f, const uint8_t* rec, int r, int j);

// U5 / U6: the high bits each code keeps in the plane after the U4 chunks (0 for other codes).
constexpr int panel_high_bits(PanelCodes codes) { return codes == PanelCodes::U5 ? 1 : codes == PanelCodes::U6 ? 2 : 0; }
// Where, in a record, the high bits of the code in U4 chunk c, lane r, 16-bit word e, nibble n
// sit (hb of them): the byte, and the shift within it (the layout above).
struct PlaneSpot { int byte, shift; };
constexpr PlaneSpot panel_plane_spot(int hb, int c, int r, int e, int n) {
  const int per_plane = 4 / hb;  // code chunks per plane chunk
  return {(4 + c / per_plane) * kPanelChunk + r * 4 + e * 2 + n / 2, 2 * hb * (c % per_plane) + hb * (n % 2)};
}

struct QuantizeActsArgs {
  const float* x = nullptr;  // x: [m, k], row stride ldx
  int64_t ldx = 0;
  int m = 0;
  int64_t k = 0;
  int16_t* q = nullptr;      // outputs as in QActs
  float* scale = nullptr;
  int32_t* qsum = nullptr;
};

struct QPanelArgs {
  PanelFormat format;
  const uint8_t* panels = nullptr;  // panel p at panels + p * panel_bytes
  int64_t panel_bytes = 0;
  int64_t n = 0;                     // rows of W (outputs past n are not written)
  QActs x;
  int m = 0;
  float* y = nullptr;                // y: [m, n], row stride ldy; y = x · Wᵀ (+ bias) (+ y)
  int64_t ldy = 0;
  const float* bias = nullptr;
  bool accumulate = false;
  int64_t panel_begin = 0, panel_end = 0;
  int row_begin = 0, row_end = 0;    // the activation rows this call computes
};

struct KernelTable {
  const char* name;
  void (*gemm)(const GemmArgs&);
  void (*attend)(const AttendArgs&);
  float (*stream_sum)(const float* x, int64_t n);  // sum of x: the read-bandwidth yardstick
  void (*quantize_acts)(const QuantizeActsArgs&);
  void (*qpanel_matmul)(const QPanelArgs&);
  // out[i] = silu(gate[i]) * up[i] = gate[i] / (1 + e^-gate[i]) * up[i], i < n (SwiGLU)
  void (*silu_mul)(const float* gate, const float* up, float* out, int64_t n);
};

const KernelTable& kernels_scalar();
#if defined(PYSERVE_X86)
const KernelTable& kernels_avx2();
const KernelTable& kernels_avx512();
const KernelTable& kernels_avx512_vnni();
#endif

}  // namespace pyserve::cpu
