#pragma once
// Shared by the probe_*.cu files: numpy arrays in and out of device memory, so tests/gpu can run
// each kernel on fresh random inputs and compare it with a float64 reference in numpy.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>
#include <vector>

#include "backend/cuda/device_memory.h"

namespace pyserve::gpu {

namespace py = pybind11;

template <typename T>
using CArray = py::array_t<T, py::array::c_style | py::array::forcecast>;

// A C-contiguous copy of `a` in device memory.
template <typename T>
DeviceMemory upload(const CArray<T>& a) {
  DeviceMemory m(static_cast<size_t>(a.size()) * sizeof(T));
  if (a.size() > 0) m.upload(a.data(), m.bytes());
  return m;
}
// Raw bytes (packed quantized blocks).
inline DeviceMemory upload_bytes(const py::bytes& b) {
  const std::string s = b;
  DeviceMemory m(s.size());
  if (!s.empty()) m.upload(s.data(), s.size());
  return m;
}
// A new numpy array of `shape` filled from device memory (synchronises the device first, so a
// kernel's asynchronous fault surfaces here as an exception).
template <typename T>
py::array_t<T> download(const DeviceMemory& m, const std::vector<py::ssize_t>& shape) {
  PYSERVE_GPU_CHECK(gpuDeviceSynchronize());
  py::array_t<T> out(shape);
  const size_t bytes = static_cast<size_t>(out.size()) * sizeof(T);
  if (bytes > m.bytes()) throw std::out_of_range("download: array larger than the device buffer");
  if (bytes > 0) m.download(out.mutable_data(), bytes);
  return out;
}

// Each kernel family registers its probes in the `pyserve._C.gpu` submodule.
void bind_elementwise(py::module_& m);  // probe_elementwise.cu
void bind_attention(py::module_& m);    // probe_attention.cu
void bind_matmul(py::module_& m);       // probe_matmul.cu
void bind_sampling(py::module_& m);     // probe_sampling.cu

}  // namespace pyserve::gpu
