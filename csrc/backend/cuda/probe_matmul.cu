// Probes of the matmul family for tests/gpu/test_matmul.py and benchmarks: numpy in, the launchers
// on the default stream, numpy out.
#include <pybind11/stl.h>

#include <climits>
#include <cstddef>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "backend/cuda/matmul.h"
#include "backend/cuda/probe_util.h"
#include "tensor/quant_blocks.h"

namespace pyserve::gpu {
namespace {

// Bytes of an [n, k] matrix of format t, after checking k is a whole number of blocks.
int64_t matrix_bytes(DType t, int64_t n, int64_t k) {
  const DTypeInfo& info = dtype_info(t);
  if (n < 0 || k < 0) throw std::invalid_argument("negative matrix shape");
  if (k % info.block_elems != 0)
    throw std::invalid_argument(std::string(info.name) + " needs k to be a multiple of " +
                                std::to_string(info.block_elems) + ", got " + std::to_string(k));
  return n * dtype_bytes(t, k);
}

// W's bytes (a bytes object or any C-contiguous numpy array of the packed data) in device memory.
DeviceMemory upload_weights(DType t, const py::object& w, int64_t n, int64_t k) {
  const int64_t expected = matrix_bytes(t, n, k);
  auto check = [&](size_t got) {
    if (static_cast<int64_t>(got) != expected)
      throw std::invalid_argument("wrong number of bytes for [" + std::to_string(n) + ", " + std::to_string(k) +
                                  "] of " + dtype_info(t).name + ": expected " + std::to_string(expected) +
                                  ", got " + std::to_string(got));
  };
  if (py::isinstance<py::bytes>(w)) {
    const std::string raw = w.cast<std::string>();
    check(raw.size());
    DeviceMemory d(raw.size());
    if (!raw.empty()) d.upload(raw.data(), raw.size());
    return d;
  }
  const py::array a = py::array::ensure(w, py::array::c_style);
  if (!a) throw std::invalid_argument("w must be bytes or a numpy array of the packed weights");
  check(static_cast<size_t>(a.nbytes()));
  DeviceMemory d(static_cast<size_t>(a.nbytes()));
  if (a.nbytes() > 0) d.upload(a.data(), static_cast<size_t>(a.nbytes()));
  return d;
}

void run_path(const std::string& path, const DeviceMatrix& w, const float* x, int64_t ldx, int m, float* y,
              int64_t ldy, const float* bias, bool accumulate, DeviceMemory& workspace) {
  if (path == "auto")
    matmul(w, x, ldx, m, y, ldy, bias, accumulate, workspace.get(), workspace.bytes(), nullptr);
  else if (path == "gemv")
    gemv(w, x, ldx, m, y, ldy, bias, accumulate, workspace.get(), workspace.bytes(), nullptr);
  else if (path == "gemm")
    gemm(w, x, ldx, m, y, ldy, bias, accumulate, workspace.get(), workspace.bytes(), nullptr);
  else
    throw std::invalid_argument("path must be 'auto', 'gemv' or 'gemm', got '" + path + "'");
}

int checked_m(int64_t m) {
  if (m < 0 || m > INT_MAX) throw std::invalid_argument("m out of range: " + std::to_string(m));
  return static_cast<int>(m);
}

py::array_t<float> probe_matmul(const std::string& format, const py::object& w, int64_t n, int64_t k,
                                const CArray<float>& x, const std::optional<CArray<float>>& bias,
                                const std::optional<CArray<float>>& y, const std::string& path) {
  const DType t = parse_dtype(format);
  if (x.ndim() != 2) throw std::invalid_argument("x must be 2-D: [m, ldx] with ldx >= k");
  const int m = checked_m(x.shape(0));
  const int64_t ldx = x.shape(1);
  if (ldx < k) throw std::invalid_argument("x has " + std::to_string(ldx) + " columns, k is " + std::to_string(k));
  DeviceMemory dw = upload_weights(t, w, n, k);
  DeviceMemory dx = upload(x);
  DeviceMemory db;
  if (bias) {
    if (bias->ndim() != 1 || bias->shape(0) != n) throw std::invalid_argument("bias must be [n]");
    db = upload(*bias);
  }
  int64_t ldy = n;
  DeviceMemory dy;
  if (y) {
    if (y->ndim() != 2 || y->shape(0) != m || y->shape(1) < n)
      throw std::invalid_argument("y must be [m, ldy] with ldy >= n");
    ldy = y->shape(1);
    dy = upload(*y);
  } else {
    dy = DeviceMemory(static_cast<size_t>(m) * static_cast<size_t>(n) * sizeof(float));
  }
  const DeviceMatrix mat{t, dw.get(), n, k};
  DeviceMemory workspace(matmul_workspace_bytes(mat, m));
  run_path(path, mat, dx.as<float>(), ldx, m, dy.as<float>(), ldy, bias ? db.as<float>() : nullptr,
           y.has_value(), workspace);
  return download<float>(dy, {m, ldy});
}

py::array_t<float> probe_gather_rows(const std::string& format, const py::object& w, int64_t n, int64_t k,
                                     const CArray<int32_t>& ids) {
  const DType t = parse_dtype(format);
  if (ids.ndim() != 1) throw std::invalid_argument("ids must be 1-D");
  const int m = checked_m(ids.shape(0));
  DeviceMemory dw = upload_weights(t, w, n, k);
  DeviceMemory dids = upload(ids);
  DeviceMemory out(static_cast<size_t>(m) * static_cast<size_t>(k) * sizeof(float));
  gather_rows(DeviceMatrix{t, dw.get(), n, k}, dids.as<int32_t>(), m, out.as<float>(), nullptr);
  return download<float>(out, {m, k});
}

// Random weights of format t for benchmarks: random bytes, with every f16 scale field set to a
// small finite value (random bytes there would include infinities and NaNs), or finite random
// plain floats.
std::vector<uint8_t> random_weights(DType t, int64_t n, int64_t k, uint64_t seed) {
  std::vector<uint8_t> bytes(static_cast<size_t>(matrix_bytes(t, n, k)));
  std::mt19937_64 gen(seed);
  for (size_t i = 0; i + 8 <= bytes.size(); i += 8) {
    const uint64_t r = gen();
    for (int b = 0; b < 8; ++b) bytes[i + b] = static_cast<uint8_t>(r >> (8 * b));
  }
  auto small_f16 = [&] { const uint64_t r = gen(); return static_cast<uint16_t>(((5 + r % 6) << 10) | ((r >> 8) & 0x3FF)); };
  auto put16 = [&](size_t at, uint16_t v) { bytes[at] = static_cast<uint8_t>(v), bytes[at + 1] = static_cast<uint8_t>(v >> 8); };
  std::vector<size_t> f16_fields;  // byte offsets of the f16 scales in a block
  switch (t) {
    case DType::F32: {
      std::uniform_real_distribution<float> u(-1.f, 1.f);
      auto* p = reinterpret_cast<float*>(bytes.data());
      for (size_t i = 0; i < bytes.size() / 4; ++i) p[i] = u(gen);
      return bytes;
    }
    case DType::F16:
    case DType::BF16: {
      const bool bf = t == DType::BF16;
      for (size_t i = 0; i + 2 <= bytes.size(); i += 2) {
        const uint64_t r = gen();
        const uint16_t sign = static_cast<uint16_t>((r & 1) << 15);
        put16(i, bf ? static_cast<uint16_t>(sign | ((120 + (r >> 1) % 7) << 7) | ((r >> 8) & 0x7F))
                    : static_cast<uint16_t>(sign | small_f16()));
      }
      return bytes;
    }
    case DType::Q4_0: f16_fields = {offsetof(BlockQ4_0, d)}; break;
    case DType::Q4_1: f16_fields = {offsetof(BlockQ4_1, d), offsetof(BlockQ4_1, m)}; break;
    case DType::Q5_0: f16_fields = {offsetof(BlockQ5_0, d)}; break;
    case DType::Q5_1: f16_fields = {offsetof(BlockQ5_1, d), offsetof(BlockQ5_1, m)}; break;
    case DType::Q8_0: f16_fields = {offsetof(BlockQ8_0, d)}; break;
    case DType::Q2_K: f16_fields = {offsetof(BlockQ2_K, d), offsetof(BlockQ2_K, dmin)}; break;
    case DType::Q3_K: f16_fields = {offsetof(BlockQ3_K, d)}; break;
    case DType::Q4_K: f16_fields = {offsetof(BlockQ4_K, d), offsetof(BlockQ4_K, dmin)}; break;
    case DType::Q5_K: f16_fields = {offsetof(BlockQ5_K, d), offsetof(BlockQ5_K, dmin)}; break;
    case DType::Q6_K: f16_fields = {offsetof(BlockQ6_K, d)}; break;
  }
  const size_t block_bytes = static_cast<size_t>(dtype_info(t).block_bytes);
  for (size_t b = 0; b + block_bytes <= bytes.size(); b += block_bytes)
    for (size_t off : f16_fields) put16(b + off, small_f16());
  return bytes;
}

double bench_matmul(const std::string& format, int64_t n, int64_t k, int64_t m_arg, int iters,
                    const std::string& path) {
  const DType t = parse_dtype(format);
  const int m = checked_m(m_arg);
  if (iters < 1) throw std::invalid_argument("iters must be at least 1");
  const std::vector<uint8_t> host_w = random_weights(t, n, k, 0x5eed);
  DeviceMemory dw = to_device(host_w);
  std::vector<float> host_x(static_cast<size_t>(m) * static_cast<size_t>(k));
  std::mt19937 gen(7);
  std::normal_distribution<float> normal;
  for (float& v : host_x) v = normal(gen);
  DeviceMemory dx = to_device(host_x);
  DeviceMemory dy(static_cast<size_t>(m) * static_cast<size_t>(n) * sizeof(float));
  const DeviceMatrix mat{t, dw.get(), n, k};
  DeviceMemory workspace(matmul_workspace_bytes(mat, m));
  auto launch = [&] { run_path(path, mat, dx.as<float>(), k, m, dy.as<float>(), n, nullptr, false, workspace); };
  launch();  // warm-up (and a first check of the arguments)
  PYSERVE_GPU_CHECK(gpuDeviceSynchronize());
  DeviceTimer timer;
  timer.start();
  for (int i = 0; i < iters; ++i) launch();
  return static_cast<double>(timer.stop_ms()) / iters;
}

}  // namespace

void bind_matmul(py::module_& m) {
  m.def("matmul", &probe_matmul, py::arg("format"), py::arg("w"), py::arg("n"), py::arg("k"), py::arg("x"),
        py::arg("bias") = py::none(), py::arg("y") = py::none(), py::arg("path") = "auto",
        "y = x · Wᵀ (+ bias) on the device. W: [n, k] of `format` as bytes or a numpy array of its packed "
        "data; x: [m, ldx] float32 (the first k columns are the input, ldx is its row stride); bias: [n]; "
        "y: [m, ldy] float32 to accumulate into (ldy >= n its row stride; columns past n come back "
        "unchanged). path: 'auto' (matmul, by m), 'gemv' or 'gemm'. Returns y: [m, ldy] ([m, n] without y).");
  m.def("gather_rows", &probe_gather_rows, py::arg("format"), py::arg("w"), py::arg("n"), py::arg("k"),
        py::arg("ids"),
        "Rows ids of W: [n, k] of `format`, dequantized to float32: [len(ids), k] (an id outside [0, n) "
        "gives a row of NaN).");
  m.def("supports", [](const std::string& format) { return supports(parse_dtype(format)); }, py::arg("format"),
        "Whether the device matmul kernels run weights of `format` (an unknown name raises ValueError).");
  m.def("bench_matmul", &bench_matmul, py::arg("format"), py::arg("n"), py::arg("k"), py::arg("m"),
        py::arg("iters") = 100, py::arg("path") = "auto",
        "Milliseconds per launch of y: [m, n] = x · Wᵀ for random W: [n, k] of `format` (finite scales) and "
        "random x, averaged over `iters` launches on the default stream after one warm-up launch.");
}

}  // namespace pyserve::gpu
