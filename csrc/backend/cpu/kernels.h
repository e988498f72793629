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

// Attention of one query head of one token over its sequence's cached keys/values.
struct AttendArgs {
  const float* q = nullptr;  // q: [head_dim], rotary already applied
  int head_dim = 0;
  float scale = 1.f;
  const float* k_cache = nullptr;  // this layer's K: [num_slots, kv_stride]; slot = page*page_size+i
  const float* v_cache = nullptr;  // this layer's V, same layout
  int64_t kv_stride = 0;           // floats per slot (n_kv_heads * head_dim)
  int64_t head_offset = 0;         // kv_head * head_dim
  const int32_t* page_table = nullptr;
  int page_size = 0;
  int lo = 0, hi = 0;              // attend to positions lo..hi inclusive
  float* scratch = nullptr;        // >= hi - lo + 1 floats
  float* out = nullptr;            // out: [head_dim]
};

struct KernelTable {
  const char* name;
  void (*gemm)(const GemmArgs&);
  void (*attend)(const AttendArgs&);
};

const KernelTable& kernels_scalar();
#if defined(PYSERVE_X86)
const KernelTable& kernels_avx2();
const KernelTable& kernels_avx512();
#endif

}  // namespace pyserve::cpu
