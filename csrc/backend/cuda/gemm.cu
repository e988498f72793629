// Prefill-sized products (m > 8 rows of x): y: [m, n] = x: [m, k] · Wᵀ with W in its stored format.
//
// Compute-bound: a portable shared-memory tiled GEMM with float32 everywhere. A block of 256
// threads computes a 64 (rows of x) x 64 (rows of W) tile of y, stepping through k 32 columns at a
// time: it stages the x tile and the dequantized W tile (each thread decodes two runs of 4 weights,
// exactly as the CPU reference would: quant_blocks.cuh) in shared memory, k-major, then each
// thread accumulates a 4 x 4 sub-tile from float4 reads of both. No tensor cores yet: W tiles are
// float32, so the result differs from the float64 product only by float32 rounding.
#include "backend/cuda/matmul.h"
#include "backend/cuda/quant_blocks.cuh"

namespace pyserve::gpu {
namespace {

constexpr int kGemmThreads = 256;
constexpr int kTileM = 64;  // rows of x (and y) a block computes
constexpr int kTileN = 64;  // rows of W (columns of y)
constexpr int kTileK = 32;  // divides every quantized block (32 or 256 weights)
constexpr int kPad = 4;     // keeps float4 alignment; shifts banks between k rows
constexpr int kRunsPerRow = kTileK / 4;
static_assert(kTileM == kTileN, "one loop stages both tiles");
static_assert(kTileM * kRunsPerRow == 2 * kGemmThreads, "each thread stages two runs of each tile");
static_assert(kTileM == 4 * (kGemmThreads / 16) && kTileN == 4 * 16, "16 x 16 threads of 4 x 4 outputs");

// w: [n, k] in format F, row_bytes apart; x: [m, k] at row stride ldx; y: [m, n] at row stride ldy;
// bias: [n] or null. Grid: (m tiles, n tiles).
template <class F>
__global__ void __launch_bounds__(kGemmThreads)
    gemm_kernel(const uint8_t* __restrict__ w, int64_t n, int64_t k, int64_t row_bytes, const float* __restrict__ x,
                int64_t ldx, int m, float* __restrict__ y, int64_t ldy, const float* __restrict__ bias,
                bool accumulate) {
  // xs: [kTileK, kTileM] (xs[kk][i] = x[m0 + i, k0 + kk]); ws: [kTileK, kTileN] (ws[kk][j] = W[n0 + j, k0 + kk])
  __shared__ __align__(16) float xs[kTileK][kTileM + kPad];
  __shared__ __align__(16) float ws[kTileK][kTileN + kPad];
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kTileM, n0 = static_cast<int64_t>(blockIdx.y) * kTileN;
  const int tid = threadIdx.x;
  const int tm = tid / 16, tn = tid % 16;  // this thread's y rows m0 + 4 tm + i, columns n0 + 4 tn + j
  const bool x_vec = rows_are_16b_aligned(x, ldx);

  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;

  for (int64_t k0 = 0; k0 < k; k0 += kTileK) {
    // Stage: run u (4 columns) of tile row r; 8 consecutive threads read one row's 32 columns.
#pragma unroll
    for (int s = 0; s < 2; ++s) {
      const int idx = tid + s * kGemmThreads, r = idx / kRunsPerRow, u = idx % kRunsPerRow;
      const int64_t e = k0 + 4 * u;
      float v[4] = {0.f, 0.f, 0.f, 0.f};
      if (m0 + r < m) load_x4(x + (m0 + r) * ldx, e, k, x_vec, v);
#pragma unroll
      for (int t = 0; t < 4; ++t) xs[4 * u + t][r] = v[t];
      // Rows past n (the last tile) re-read row n - 1; their columns of y are never stored.
      const int64_t row = n0 + r < n ? n0 + r : n - 1;
      Run4 run;
      F::run(w + row * row_bytes, e / F::kElems, static_cast<int>(e % F::kElems) / 4, k, run);
#pragma unroll
      for (int t = 0; t < 4; ++t) ws[4 * u + t][r] = dequant_exact(run, t);
    }
    __syncthreads();
#pragma unroll 8
    for (int kk = 0; kk < kTileK; ++kk) {
      const float4 a4 = *reinterpret_cast<const float4*>(&xs[kk][4 * tm]);
      const float4 b4 = *reinterpret_cast<const float4*>(&ws[kk][4 * tn]);
      const float a[4] = {a4.x, a4.y, a4.z, a4.w}, b[4] = {b4.x, b4.y, b4.z, b4.w};
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    __syncthreads();  // the next stage overwrites the tiles
  }

#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t row = m0 + 4 * tm + i;
    if (row >= m) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t col = n0 + 4 * tn + j;
      if (col >= n) continue;
      float v = acc[i][j];
      if (bias) v += bias[col];
      float* out = y + row * ldy + col;
      if (accumulate) v += *out;
      *out = v;
    }
  }
}

}  // namespace

void gemm(const DeviceMatrix& w, const float* x, int64_t ldx, int m, float* y, int64_t ldy, const float* bias,
          bool accumulate, void* workspace, size_t workspace_bytes, gpuStream_t stream) {
  check_matmul_args("gemm", w, x, ldx, m, y, ldy);
  if (m == 0 || w.rows == 0) return;
  const int64_t n_tiles = (w.rows + kTileN - 1) / kTileN;
  if (n_tiles > 65535)
    throw std::invalid_argument("gemm: at most " + std::to_string(65535 * kTileN) + " rows of W, got " +
                                std::to_string(w.rows));
  const dim3 grid(static_cast<unsigned>((m + kTileM - 1) / kTileM), static_cast<unsigned>(n_tiles));
  with_format(w.dtype, "gemm", [&](auto format) {
    using F = decltype(format);
    gemm_kernel<F><<<grid, kGemmThreads, 0, stream>>>(static_cast<const uint8_t*>(w.data), w.rows, w.cols,
                                                      dtype_bytes(w.dtype, w.cols), x, ldx, m, y, ldy, bias,
                                                      accumulate);
    PYSERVE_GPU_CHECK_LAUNCH();
  });
}

}  // namespace pyserve::gpu
