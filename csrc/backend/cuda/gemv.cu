// Decode-sized products (m <= 8 rows of x): y: [m, n] = x: [m, k] · Wᵀ with W in its stored format.
//
// Memory-bound: every weight byte is read from memory once per launch and used for all m rows of
// x. A block of 256 threads owns kRows consecutive rows of W and splits k among its threads: thread
// t decodes parts t, t + 256, ... (a part: 8 weights whose codes share packed bytes, see
// quant_blocks.cuh) of each of its rows, so consecutive threads read consecutive bytes. Its x
// values (8 a part and row of x) are loaded once and reused for the kRows rows of W. Weights are
// dequantized in registers and accumulated in float32 against float32 x (no activation rounding:
// the only error is float32's); per run of 4 weights the scale is applied once to the 4-term dot.
// The block then sums its threads' partial sums (warp shuffles, then shared memory).
#include <algorithm>

#include "backend/cuda/matmul.h"
#include "backend/cuda/quant_blocks.cuh"
#include "backend/cuda/reduce.cuh"

namespace pyserve::gpu {
namespace {

constexpr int kGemvThreads = 256;
constexpr int kGemvMaxM = 8;  // rows of x one launch serves; gemv() loops over larger m

// Rows of W a block owns: x loads are shared by that many rows, but accumulators cost
// kRows * kMaxM registers and the compiler keeps every row's decoded part live at once (to have
// all their loads in flight), so fewer rows as m grows, and for the K-quants' heavier decode (at
// 8 rows they spill). Under the 128 registers that 2 blocks an SM leave, none spills.
template <class F, int kMaxM>
constexpr int gemv_rows_per_block() {
  if (kMaxM == 1) return F::kElems == kQK_K ? 4 : 8;
  return kMaxM <= 4 ? 4 : 2;
}

__device__ __forceinline__ float dot4(const float q[4], const float x[4]) {
  return fmaf(q[3], x[3], fmaf(q[2], x[2], fmaf(q[1], x[1], q[0] * x[0])));
}

// w: [n, k] in format F, row_bytes apart; x: [m, k] at row stride ldx; y: [m, n] at row stride ldy;
// bias: [n] or null. m <= kMaxM.
template <class F, int kMaxM, int kRows>
__global__ void __launch_bounds__(kGemvThreads, 2)
    gemv_kernel(const uint8_t* __restrict__ w, int64_t n, int64_t k, int64_t row_bytes, const float* __restrict__ x,
                int64_t ldx, int m, float* __restrict__ y, int64_t ldy, const float* __restrict__ bias,
                bool accumulate) {
  constexpr int kPartsPerBlock = F::kElems / 8;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRows;
  // Rows past n (the last block) re-read row n - 1, so the loads need no branch; their sums are
  // never stored.
  const uint8_t* rows[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) rows[r] = w + (row0 + r < n ? row0 + r : n - 1) * row_bytes;
  const bool x_vec = rows_are_16b_aligned(x, ldx);

  float acc[kRows][kMaxM];
#pragma unroll
  for (int r = 0; r < kRows; ++r)
#pragma unroll
    for (int i = 0; i < kMaxM; ++i) acc[r][i] = 0.f;

  const int64_t n_parts = (k + 7) / 8;  // whole blocks for the quantized formats (k % kElems == 0)
  for (int64_t part = threadIdx.x; part < n_parts; part += kGemvThreads) {
    const int64_t blk = part / kPartsPerBlock;
    const int j0 = F::first_run(static_cast<int>(part % kPartsPerBlock));
    const int j1 = j0 + F::kPairStride;
    const int64_t e0 = blk * F::kElems + 4 * j0, e1 = blk * F::kElems + 4 * j1;

    float xv[kMaxM][2][4];  // x[i, e0 .. e0 + 4) and x[i, e1 .. e1 + 4)
    float xsum[kMaxM][2];   // their sums, for the runs' offsets
#pragma unroll
    for (int i = 0; i < kMaxM; ++i) {
      if (i < m) {
        load_x4(x + i * ldx, e0, k, x_vec, xv[i][0]);
        load_x4(x + i * ldx, e1, k, x_vec, xv[i][1]);
      } else {
#pragma unroll
        for (int t = 0; t < 4; ++t) xv[i][0][t] = xv[i][1][t] = 0.f;
      }
      if constexpr (F::kHasBias) {
#pragma unroll
        for (int h = 0; h < 2; ++h) xsum[i][h] = (xv[i][h][0] + xv[i][h][1]) + (xv[i][h][2] + xv[i][h][3]);
      }
    }

#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      Run4 a, b;
      F::run(rows[r], blk, j0, k, a);
      F::run(rows[r], blk, j1, k, b);
#pragma unroll
      for (int i = 0; i < kMaxM; ++i) {
        float s = fmaf(a.scale, dot4(a.q, xv[i][0]), b.scale * dot4(b.q, xv[i][1]));
        if constexpr (F::kHasBias) s = fmaf(a.bias, xsum[i][0], fmaf(b.bias, xsum[i][1], s));
        acc[r][i] += s;
      }
    }
  }

  // partial: [warps, kRows * kMaxM] per-warp sums
  __shared__ float partial[kGemvThreads / kWarpSize][kRows * kMaxM];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
#pragma unroll
  for (int r = 0; r < kRows; ++r)
#pragma unroll
    for (int i = 0; i < kMaxM; ++i) {
      const float v = warp_sum(acc[r][i]);
      if (lane == 0) partial[warp][r * kMaxM + i] = v;
    }
  __syncthreads();
  if (threadIdx.x < kRows * kMaxM) {
    const int r = threadIdx.x / kMaxM, i = threadIdx.x % kMaxM;
    const int64_t row = row0 + r;
    if (i < m && row < n) {
      float s = 0.f;
#pragma unroll
      for (int wp = 0; wp < kGemvThreads / kWarpSize; ++wp) s += partial[wp][threadIdx.x];
      if (bias) s += bias[row];
      float* out = y + i * ldy + row;
      if (accumulate) s += *out;
      *out = s;
    }
  }
}

template <class F, int kMaxM>
void launch_gemv(const DeviceMatrix& w, const float* x, int64_t ldx, int m, float* y, int64_t ldy, const float* bias,
                 bool accumulate, gpuStream_t stream) {
  constexpr int kRows = gemv_rows_per_block<F, kMaxM>();
  const int64_t blocks = (w.rows + kRows - 1) / kRows;
  if (blocks > 0x7fffffff) throw std::invalid_argument("gemv: too many rows (" + std::to_string(w.rows) + ")");
  gemv_kernel<F, kMaxM, kRows><<<static_cast<unsigned>(blocks), kGemvThreads, 0, stream>>>(
      static_cast<const uint8_t*>(w.data), w.rows, w.cols, dtype_bytes(w.dtype, w.cols), x, ldx, m, y, ldy, bias,
      accumulate);
  PYSERVE_GPU_CHECK_LAUNCH();
}

}  // namespace

void gemv(const DeviceMatrix& w, const float* x, int64_t ldx, int m, float* y, int64_t ldy, const float* bias,
          bool accumulate, void* workspace, size_t workspace_bytes, gpuStream_t stream) {
  check_matmul_args("gemv", w, x, ldx, m, y, ldy);
  if (m == 0 || w.rows == 0) return;
  with_format(w.dtype, "gemv", [&](auto format) {
    using F = decltype(format);
    // Each launch serves up to 8 rows of x (one read of W per 8 rows).
    for (int i0 = 0; i0 < m; i0 += kGemvMaxM) {
      const int mc = std::min(kGemvMaxM, m - i0);
      const float* xc = x + static_cast<int64_t>(i0) * ldx;
      float* yc = y + static_cast<int64_t>(i0) * ldy;
      if (mc == 1)
        launch_gemv<F, 1>(w, xc, ldx, mc, yc, ldy, bias, accumulate, stream);
      else if (mc == 2)
        launch_gemv<F, 2>(w, xc, ldx, mc, yc, ldy, bias, accumulate, stream);
      else if (mc <= 4)
        launch_gemv<F, 4>(w, xc, ldx, mc, yc, ldy, bias, accumulate, stream);
      else
        launch_gemv<F, 8>(w, xc, ldx, mc, yc, ldy, bias, accumulate, stream);
    }
  });
}

}  // namespace pyserve::gpu
