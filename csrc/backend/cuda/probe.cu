// pyserve._C.gpu: the device, and every kernel family's probes (probe_*.cu), for tests/gpu and
// tools/bench_gpu.py. Only in builds with a GPU backend (PYSERVE_CUDA=1 / PYSERVE_HIP=1).
#include "backend/backend.h"  // gpu_device_count, gpu_device_kind
#include "backend/cuda/probe_util.h"
#include "backend/cuda/rope_table.h"

namespace pyserve::gpu {

void bind_gpu(py::module_& parent) {
  py::module_ m = parent.def_submodule("gpu", "Device kernels on numpy arrays (tests/gpu, tools/bench_gpu.py)");
  m.attr("kind") = gpu_device_kind();  // the --device name this build serves: "cuda" or "rocm"
  m.attr("warp_size") = kWarpSize;
  m.def("device_count", &gpu_device_count, "Devices the GPU backend sees (0 without a driver or a device).");
  m.def(
      "device_info",
      [](int device) {
        gpuDeviceProp p{};
        PYSERVE_GPU_CHECK(gpuGetDeviceProperties(&p, device));
        PYSERVE_GPU_CHECK(gpuSetDevice(device));
        size_t free_bytes = 0, total_bytes = 0;
        PYSERVE_GPU_CHECK(gpuMemGetInfo(&free_bytes, &total_bytes));
        py::dict d;
        d["name"] = std::string(p.name);
        d["total_bytes"] = total_bytes;
        d["free_bytes"] = free_bytes;
        d["multiprocessors"] = p.multiProcessorCount;
        d["warp_size"] = p.warpSize;
        d["compute_capability"] = std::to_string(p.major) + "." + std::to_string(p.minor);
        return d;
      },
      py::arg("device") = 0, "Name, memory (total, free), multiprocessors, warp size of a device.");
  m.def(
      "rope_table",
      [](const CArray<float>& x, int n_heads, int head_dim, const CArray<float>& cos, const CArray<float>& sin) {
        if (x.ndim() != 2 || cos.ndim() != 2 || sin.ndim() != 2 || cos.shape(0) != x.shape(0) ||
            cos.shape(1) != head_dim / 2 || sin.shape(0) != cos.shape(0) || sin.shape(1) != cos.shape(1) ||
            x.shape(1) < static_cast<py::ssize_t>(n_heads) * head_dim)
          throw std::invalid_argument("rope_table: x [m, >= n_heads * head_dim], cos and sin [m, head_dim / 2]");
        DeviceMemory dx = upload(x), dc = upload(cos), ds = upload(sin);
        rope_table(dx.as<float>(), x.shape(1), static_cast<int>(x.shape(0)), n_heads, head_dim, dc.as<float>(),
                   ds.as<float>(), nullptr);
        return download<float>(dx, {x.shape(0), x.shape(1)});
      },
      py::arg("x"), py::arg("n_heads"), py::arg("head_dim"), py::arg("cos"), py::arg("sin"),
      "x: [m, ld] holding [m, n_heads, head_dim], cos/sin: [m, head_dim / 2] -> x rotated by the tables "
      "(the Backend::rope the engine runs).");
  bind_elementwise(m);
  bind_attention(m);
  bind_matmul(m);
  bind_sampling(m);
}

}  // namespace pyserve::gpu
