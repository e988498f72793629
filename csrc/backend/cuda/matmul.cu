// The matmul family's entry points: which formats run, the argument checks gemv.cu and gemm.cu
// share, the choice between them by m, and the embedding gather (whole rows dequantized).
#include <string>

#include "backend/cuda/matmul.h"
#include "backend/cuda/quant_blocks.cuh"

namespace pyserve::gpu {
namespace {

// Up to this many rows of x, matmul runs the GEMV kernels (each weight read once for all rows);
// beyond, the tiled GEMM, whose 64-row tiles would mostly idle at decode sizes.
constexpr int kGemvMaxRows = 8;

constexpr int kGatherThreads = 256;

// out: [m, k] = rows ids[0..m) of w: [n, k] in format F (row_bytes apart), dequantized exactly as
// the CPU reference. An id outside [0, n) gives a row of NaN (ids live on the device, so the host
// cannot check them; a NaN row is loud where a clamped row would be silently wrong).
template <class F>
__global__ void __launch_bounds__(kGatherThreads)
    gather_rows_kernel(const uint8_t* __restrict__ w, int64_t n, int64_t k, int64_t row_bytes,
                       const int32_t* __restrict__ ids, float* __restrict__ out) {
  const int64_t i = blockIdx.x;
  const int32_t id = ids[i];
  float* o = out + i * k;
  if (id < 0 || id >= n) {
    for (int64_t e = threadIdx.x; e < k; e += kGatherThreads) o[e] = __uint_as_float(0x7fc00000u);
    return;
  }
  const uint8_t* row = w + id * row_bytes;
  for (int64_t u = threadIdx.x; u < (k + 3) / 4; u += kGatherThreads) {
    const int64_t e = 4 * u;
    Run4 run;
    F::run(row, e / F::kElems, static_cast<int>(e % F::kElems) / 4, k, run);
#pragma unroll
    for (int t = 0; t < 4; ++t)
      if (e + t < k) o[e + t] = dequant_exact(run, t);
  }
}

// Weight data alignment the decoders rely on: 16 bytes for the block formats (their loads use the
// 2-, 4- or 16-byte alignment each block size keeps from a 16-byte aligned start), the element
// size for plain floats (they check finer alignment per load).
size_t required_alignment(DType t) {
  switch (t) {
    case DType::F32: return 4;
    case DType::F16:
    case DType::BF16: return 2;
    default: return 16;
  }
}

void check_weights(const std::string& op, const DeviceMatrix& w) {
  if (!supports(w.dtype))
    throw std::invalid_argument(op + ": unsupported weight format (supported: f32, f16, bf16, q4_0, q4_1, q5_0, "
                                     "q5_1, q8_0, q2_k, q3_k, q4_k, q5_k, q6_k)");
  const DTypeInfo& info = dtype_info(w.dtype);
  if (w.rows < 0 || w.cols < 0)
    throw std::invalid_argument(op + ": negative weight shape [" + std::to_string(w.rows) + ", " +
                                std::to_string(w.cols) + "]");
  if (w.cols % info.block_elems != 0)
    throw std::invalid_argument(op + ": " + info.name + " weights need cols (k) to be a multiple of " +
                                std::to_string(info.block_elems) + ", got " + std::to_string(w.cols));
  if (w.rows > 0 && w.cols > 0) {
    if (!w.data) throw std::invalid_argument(op + ": null weight data");
    const size_t align = required_alignment(w.dtype);
    if (reinterpret_cast<uintptr_t>(w.data) % align != 0)
      throw std::invalid_argument(op + ": " + info.name + " weight data must be " + std::to_string(align) +
                                  "-byte aligned");
  }
}

}  // namespace

bool supports(DType t) {
  switch (t) {
    case DType::F32:
    case DType::F16:
    case DType::BF16:
    case DType::Q4_0:
    case DType::Q4_1:
    case DType::Q5_0:
    case DType::Q5_1:
    case DType::Q8_0:
    case DType::Q2_K:
    case DType::Q3_K:
    case DType::Q4_K:
    case DType::Q5_K:
    case DType::Q6_K: return true;
  }
  return false;
}

// Activations stay float32 (no int8 copy) and W tiles are dequantized in shared memory: no
// workspace. Kept in the interface for a future int8 / tensor-core path.
size_t matmul_workspace_bytes(const DeviceMatrix& w, int m) { return 0; }

void check_matmul_args(const char* op, const DeviceMatrix& w, const float* x, int64_t ldx, int m, const float* y,
                       int64_t ldy) {
  const std::string who(op);
  check_weights(who, w);
  if (m < 0) throw std::invalid_argument(who + ": negative m (" + std::to_string(m) + ")");
  if (m == 0 || w.rows == 0) return;
  if (!y) throw std::invalid_argument(who + ": null y");
  if (ldy < w.rows)
    throw std::invalid_argument(who + ": ldy (" + std::to_string(ldy) + ") is less than rows (" +
                                std::to_string(w.rows) + ")");
  if (w.cols == 0) return;
  if (!x) throw std::invalid_argument(who + ": null x");
  if (ldx < w.cols)
    throw std::invalid_argument(who + ": ldx (" + std::to_string(ldx) + ") is less than cols (" +
                                std::to_string(w.cols) + ")");
}

void matmul(const DeviceMatrix& w, const float* x, int64_t ldx, int m, float* y, int64_t ldy, const float* bias,
            bool accumulate, void* workspace, size_t workspace_bytes, gpuStream_t stream) {
  if (m <= kGemvMaxRows)
    gemv(w, x, ldx, m, y, ldy, bias, accumulate, workspace, workspace_bytes, stream);
  else
    gemm(w, x, ldx, m, y, ldy, bias, accumulate, workspace, workspace_bytes, stream);
}

void gather_rows(const DeviceMatrix& w, const int32_t* ids, int m, float* out, gpuStream_t stream) {
  check_weights("gather_rows", w);
  if (m < 0) throw std::invalid_argument("gather_rows: negative m (" + std::to_string(m) + ")");
  if (m == 0 || w.cols == 0) return;
  if (!ids || !out) throw std::invalid_argument("gather_rows: null ids or out");
  with_format(w.dtype, "gather_rows", [&](auto format) {
    using F = decltype(format);
    gather_rows_kernel<F><<<static_cast<unsigned>(m), kGatherThreads, 0, stream>>>(
        static_cast<const uint8_t*>(w.data), w.rows, w.cols, dtype_bytes(w.dtype, w.cols), ids, out);
    PYSERVE_GPU_CHECK_LAUNCH();
  });
}

}  // namespace pyserve::gpu
