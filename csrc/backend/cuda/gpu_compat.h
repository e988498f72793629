#pragma once
// One source, two vendors: every .cu under csrc/backend/cuda includes this header instead of
// cuda_runtime.h, and builds with nvcc (NVIDIA) and with hipcc (AMD, HIP_PLATFORM=amd). It maps
// the runtime calls, the warp intrinsics and the half type to one set of names (gpu*), and fixes
// the warp width as a build parameter (kWarpSize) instead of a literal 32 spread through kernels.
//
// Kept to what HIP 5.2 (Debian 12's hipcc) and CUDA 12/13 both have: bf16 travels as raw uint16
// bits (bf16_bits_to_float below), because the two vendors' bfloat16 types differ in name and in
// age; f16 uses __half, which both spell the same.
#include <cstdint>
#include <stdexcept>
#include <string>

#if defined(__HIPCC__) || defined(PYSERVE_HIP)
#include <hip/hip_fp16.h>
#include <hip/hip_runtime.h>
#define PYSERVE_GPU_HIP 1
using gpuError_t = hipError_t;
using gpuStream_t = hipStream_t;
using gpuEvent_t = hipEvent_t;
using gpuDeviceProp = hipDeviceProp_t;
#define gpuSuccess hipSuccess
#define gpuGetErrorString hipGetErrorString
#define gpuGetLastError hipGetLastError
#define gpuGetDeviceCount hipGetDeviceCount
#define gpuGetDeviceProperties hipGetDeviceProperties
#define gpuSetDevice hipSetDevice
#define gpuGetDevice hipGetDevice
#define gpuMalloc hipMalloc
#define gpuFree hipFree
#define gpuMemcpy hipMemcpy
#define gpuMemcpyAsync hipMemcpyAsync
#define gpuMemsetAsync hipMemsetAsync
#define gpuMemGetInfo hipMemGetInfo
#define gpuMemcpyHostToDevice hipMemcpyHostToDevice
#define gpuMemcpyDeviceToHost hipMemcpyDeviceToHost
#define gpuMemcpyDeviceToDevice hipMemcpyDeviceToDevice
#define gpuMallocHost hipHostMalloc
#define gpuFreeHost hipHostFree
#define gpuStreamCreate hipStreamCreate
#define gpuStreamDestroy hipStreamDestroy
#define gpuStreamSynchronize hipStreamSynchronize
#define gpuDeviceSynchronize hipDeviceSynchronize
#define gpuEventCreate hipEventCreate
#define gpuEventDestroy hipEventDestroy
#define gpuEventRecord hipEventRecord
#define gpuEventSynchronize hipEventSynchronize
#define gpuEventElapsedTime hipEventElapsedTime
#define gpuFuncSetAttribute(f, a, v) hipFuncSetAttribute(reinterpret_cast<const void*>(f), a, v)
#define gpuFuncAttributeMaxDynamicSharedMemorySize hipFuncAttributeMaxDynamicSharedMemorySize
#else
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#define PYSERVE_GPU_CUDA 1
using gpuError_t = cudaError_t;
using gpuStream_t = cudaStream_t;
using gpuEvent_t = cudaEvent_t;
using gpuDeviceProp = cudaDeviceProp;
#define gpuSuccess cudaSuccess
#define gpuGetErrorString cudaGetErrorString
#define gpuGetLastError cudaGetLastError
#define gpuGetDeviceCount cudaGetDeviceCount
#define gpuGetDeviceProperties cudaGetDeviceProperties
#define gpuSetDevice cudaSetDevice
#define gpuGetDevice cudaGetDevice
#define gpuMalloc cudaMalloc
#define gpuFree cudaFree
#define gpuMemcpy cudaMemcpy
#define gpuMemcpyAsync cudaMemcpyAsync
#define gpuMemsetAsync cudaMemsetAsync
#define gpuMemGetInfo cudaMemGetInfo
#define gpuMemcpyHostToDevice cudaMemcpyHostToDevice
#define gpuMemcpyDeviceToHost cudaMemcpyDeviceToHost
#define gpuMemcpyDeviceToDevice cudaMemcpyDeviceToDevice
#define gpuMallocHost cudaMallocHost
#define gpuFreeHost cudaFreeHost
#define gpuStreamCreate cudaStreamCreate
#define gpuStreamDestroy cudaStreamDestroy
#define gpuStreamSynchronize cudaStreamSynchronize
#define gpuDeviceSynchronize cudaDeviceSynchronize
#define gpuEventCreate cudaEventCreate
#define gpuEventDestroy cudaEventDestroy
#define gpuEventRecord cudaEventRecord
#define gpuEventSynchronize cudaEventSynchronize
#define gpuEventElapsedTime cudaEventElapsedTime
#define gpuFuncSetAttribute cudaFuncSetAttribute
#define gpuFuncAttributeMaxDynamicSharedMemorySize cudaFuncAttributeMaxDynamicSharedMemorySize
#endif

namespace pyserve::gpu {

// The warp (NVIDIA) / wavefront (AMD) width the kernels are built for: 32 on NVIDIA, 64 on CDNA
// (gfx90a, gfx942). An RDNA build in wave32 mode passes -DPYSERVE_WARP_SIZE=32. The backend
// checks it against the device's warpSize at start-up and refuses a mismatch.
#ifndef PYSERVE_WARP_SIZE
#ifdef PYSERVE_GPU_HIP
#define PYSERVE_WARP_SIZE 64
#else
#define PYSERVE_WARP_SIZE 32
#endif
#endif
constexpr int kWarpSize = PYSERVE_WARP_SIZE;
static_assert(kWarpSize == 32 || kWarpSize == 64, "warp size is 32 or 64");

// A failed runtime call becomes a C++ exception (pybind11 turns it into a Python RuntimeError),
// never an abort.
inline void check(gpuError_t err, const char* what, const char* file, int line) {
  if (err != gpuSuccess)
    throw std::runtime_error(std::string("GPU error: ") + gpuGetErrorString(err) + " in " + what + " (" +
                             file + ":" + std::to_string(line) + ")");
}
#define PYSERVE_GPU_CHECK(expr) ::pyserve::gpu::check((expr), #expr, __FILE__, __LINE__)
// After a kernel launch: a bad launch configuration is reported here, not at the next sync.
#define PYSERVE_GPU_CHECK_LAUNCH() PYSERVE_GPU_CHECK(gpuGetLastError())

#if defined(__CUDACC__) || defined(__HIPCC__)
// --- warp intrinsics ------------------------------------------------------------------------------
__device__ __forceinline__ float shfl_xor(float v, int lane_mask) {
#ifdef PYSERVE_GPU_HIP
  return __shfl_xor(v, lane_mask, kWarpSize);
#else
  return __shfl_xor_sync(0xffffffffu, v, lane_mask, kWarpSize);
#endif
}
__device__ __forceinline__ int shfl_xor(int v, int lane_mask) {
#ifdef PYSERVE_GPU_HIP
  return __shfl_xor(v, lane_mask, kWarpSize);
#else
  return __shfl_xor_sync(0xffffffffu, v, lane_mask, kWarpSize);
#endif
}
__device__ __forceinline__ float shfl(float v, int src_lane) {
#ifdef PYSERVE_GPU_HIP
  return __shfl(v, src_lane, kWarpSize);
#else
  return __shfl_sync(0xffffffffu, v, src_lane, kWarpSize);
#endif
}
__device__ __forceinline__ int shfl(int v, int src_lane) {
#ifdef PYSERVE_GPU_HIP
  return __shfl(v, src_lane, kWarpSize);
#else
  return __shfl_sync(0xffffffffu, v, src_lane, kWarpSize);
#endif
}

// --- stored number formats --------------------------------------------------------------------------
// IEEE half and bfloat16 as raw bits (GGUF blocks and our packed weights store them so).
__device__ __forceinline__ float f16_bits_to_float(uint16_t h) { return __half2float(__ushort_as_half(h)); }
__device__ __forceinline__ uint16_t float_to_f16_bits(float x) { return __half_as_ushort(__float2half_rn(x)); }
__device__ __forceinline__ float bf16_bits_to_float(uint16_t h) { return __uint_as_float(static_cast<uint32_t>(h) << 16); }
__device__ __forceinline__ uint16_t float_to_bf16_bits(float x) {  // round to nearest even
  const uint32_t u = __float_as_uint(x);
  if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu)) return static_cast<uint16_t>((u >> 16) | 0x40u);  // NaN
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
#endif

}  // namespace pyserve::gpu
