#pragma once
// Matrix products against weights in their stored format (gemv.cu, gemm.cu, matmul.cu; the
// per-format dequantization in quant_blocks.cuh).
#include <cstdint>

#include "backend/cuda/gpu_compat.h"
#include "tensor/tensor.h"  // DType

namespace pyserve::gpu {

// A weight matrix W: [rows, cols] in device memory, row-major, each row cols / block_elems blocks
// of its DType exactly as GGUF stores them (tensor/quant_blocks.h) or plain f32 / f16 / bf16.
// MLC's q8f16_1 and q4f16_1 arrive as Q8_0 and Q4_0 (pyserve/model/quantize.py).
struct DeviceMatrix {
  DType dtype = DType::F32;
  const void* data = nullptr;
  int64_t rows = 0;  // n: output features
  int64_t cols = 0;  // k: input features
};

// Which formats the device kernels run.
bool supports(DType t);

// Workspace bytes matmul needs for m rows of x against w: 0 today (activations stay float32, weight
// tiles live in shared memory); kept for an int8-activation or tensor-core path.
size_t matmul_workspace_bytes(const DeviceMatrix& w, int m);
// y: [m, rows] = x: [m, cols] · Wᵀ (+ bias: [rows]) (+ y when accumulate), x and y float32 at row
// strides ldx / ldy. Small m (decode, m <= 8) runs GEMV kernels that read each weight once for all
// m rows; larger m (prefill) a tiled GEMM with weights dequantized into float32 shared-memory tiles
// (no tensor cores yet). Accumulation is float32 throughout. W's data must be 16-byte aligned
// (quantized formats; element-aligned for f32 / f16 / bf16); quantized cols a multiple of the
// block (32, or 256 for K-quants), plain formats any cols. Throws std::invalid_argument for an
// unsupported format or bad arguments.
void matmul(const DeviceMatrix& w, const float* x, int64_t ldx, int m, float* y, int64_t ldy, const float* bias,
            bool accumulate, void* workspace, size_t workspace_bytes, gpuStream_t stream);
// out: [m, cols] float32 = rows ids[0..m) of W, dequantized bit for bit as the CPU reference (the
// embedding table, which a tied LM head shares). An id outside [0, rows) gives a row of NaN.
void gather_rows(const DeviceMatrix& w, const int32_t* ids, int m, float* out, gpuStream_t stream);

// The two paths, for tests and benchmarks (matmul picks one by m).
void gemv(const DeviceMatrix& w, const float* x, int64_t ldx, int m, float* y, int64_t ldy, const float* bias,
          bool accumulate, void* workspace, size_t workspace_bytes, gpuStream_t stream);
void gemm(const DeviceMatrix& w, const float* x, int64_t ldx, int m, float* y, int64_t ldy, const float* bias,
          bool accumulate, void* workspace, size_t workspace_bytes, gpuStream_t stream);

// The argument checks the three launchers share (matmul.cu): formats, shapes, strides, alignment
// (weight data 16-byte aligned). Throws std::invalid_argument naming `op` and the problem.
void check_matmul_args(const char* op, const DeviceMatrix& w, const float* x, int64_t ldx, int m, const float* y,
                       int64_t ldy);

}  // namespace pyserve::gpu
