// The MLP's gated activations (SwiGLU, GeGLU) and a plain scale: memory-bound element-wise
// kernels, float4 loads and stores where the rows allow it.
#include <stdexcept>
#include <string>

#include "backend/cuda/elementwise.h"

namespace pyserve::gpu {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxGridY = 65535;

// silu(g) * u = g / (1 + e^-g) * u, as the CPU kernels (cpu/kernels.h) compute it.
struct SiluMul {
  __device__ __forceinline__ float operator()(float g, float u) const { return g / (1.f + expf(-g)) * u; }
};
// PyTorch's gelu(approximate="tanh"): 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3))) * u.
struct GeluTanhMul {
  __device__ __forceinline__ float operator()(float g, float u) const {
    constexpr float kBeta = 0.7978845608028654f;  // sqrt(2 / pi)
    constexpr float kKappa = 0.044715f;
    const float inner = kBeta * (g + kKappa * g * g * g);
    return 0.5f * g * (1.f + tanhf(inner)) * u;
  }
};

// gate_up: [m, 2 * inter], out: [m, inter]. blockIdx.x is the row; blockIdx.y and the threads
// stride over the row's vectors of kVec columns (kVec = 4: float4, 16-byte aligned rows).
template <int kVec, typename Op>
__global__ void gated_kernel(const float* gate_up, int inter, float* out, Op op) {
  const int64_t row = blockIdx.x;
  const float* gate = gate_up + row * 2 * inter;
  const float* up = gate + inter;
  float* out_row = out + row * inter;
  const int n_vec = inter / kVec;
  for (int j = blockIdx.y * blockDim.x + threadIdx.x; j < n_vec; j += gridDim.y * blockDim.x) {
    if constexpr (kVec == 4) {
      const float4 g = reinterpret_cast<const float4*>(gate)[j];
      const float4 u = reinterpret_cast<const float4*>(up)[j];
      reinterpret_cast<float4*>(out_row)[j] = make_float4(op(g.x, u.x), op(g.y, u.y), op(g.z, u.z), op(g.w, u.w));
    } else {
      out_row[j] = op(gate[j], up[j]);
    }
  }
}

// x: [n] *= s: float4 over the first n_vec4 * 4 values (x 16-byte aligned), then the tail singly.
__global__ void scale_kernel(float* x, int64_t n, int64_t n_vec4, float s) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  float4* x4 = reinterpret_cast<float4*>(x);
  for (int64_t j = first; j < n_vec4; j += stride) {
    float4 v = x4[j];
    v.x *= s, v.y *= s, v.z *= s, v.w *= s;
    x4[j] = v;
  }
  for (int64_t j = n_vec4 * 4 + first; j < n; j += stride) x[j] *= s;
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename Op>
void launch_gated(const char* what, const float* gate_up, int m, int inter, float* out, gpuStream_t stream) {
  if (m < 0 || inter < 0) throw std::invalid_argument(std::string(what) + ": negative m or inter");
  if (m == 0 || inter == 0) return;
  if (gate_up == nullptr || out == nullptr) throw std::invalid_argument(std::string(what) + ": null gate_up or out");
  // float4 when every row's gate, up and out start on a 16-byte boundary.
  const bool vec4 = inter % 4 == 0 && aligned16(gate_up) && aligned16(out);
  const int n_vec = vec4 ? inter / 4 : inter;
  const int chunks = (n_vec + kThreads - 1) / kThreads;
  const dim3 grid(static_cast<unsigned>(m), static_cast<unsigned>(chunks < kMaxGridY ? chunks : kMaxGridY));
  if (vec4) {
    gated_kernel<4><<<grid, kThreads, 0, stream>>>(gate_up, inter, out, Op{});
  } else {
    gated_kernel<1><<<grid, kThreads, 0, stream>>>(gate_up, inter, out, Op{});
  }
  PYSERVE_GPU_CHECK_LAUNCH();
}

}  // namespace

void silu_mul(const float* gate_up, int m, int inter, float* out, gpuStream_t stream) {
  launch_gated<SiluMul>("silu_mul", gate_up, m, inter, out, stream);
}

void gelu_tanh_mul(const float* gate_up, int m, int inter, float* out, gpuStream_t stream) {
  launch_gated<GeluTanhMul>("gelu_tanh_mul", gate_up, m, inter, out, stream);
}

void scale(float* x, int64_t n, float s, gpuStream_t stream) {
  if (n < 0) throw std::invalid_argument("scale: negative n");
  if (n == 0) return;
  if (x == nullptr) throw std::invalid_argument("scale: x is null");
  const int64_t n_vec4 = aligned16(x) ? n / 4 : 0;
  const int64_t items = n_vec4 > 0 ? n_vec4 : n;  // what the first loop's threads cover
  constexpr int64_t kMaxBlocks = 4096;            // a grid-stride loop does the rest
  int64_t blocks = (items + kThreads - 1) / kThreads;
  if (blocks > kMaxBlocks) blocks = kMaxBlocks;
  scale_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(x, n, n_vec4, s);
  PYSERVE_GPU_CHECK_LAUNCH();
}

}  // namespace pyserve::gpu
