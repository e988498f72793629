// pyserve._C.gpu probes of the element-wise family (elementwise.h): each takes numpy arrays,
// runs one launcher on the default stream and returns numpy results, for tests/gpu's float64
// references. Row strides come from the arrays: a row wider than the kernel's columns is a view
// into a wider buffer (the padding must come back untouched).
#include <stdexcept>
#include <string>
#include <vector>

#include "backend/cuda/elementwise.h"
#include "backend/cuda/probe_util.h"

namespace pyserve::gpu {
namespace {

// --- arrays whose dtype says the KV type (float32: F32, float16: F16) -----------------------------
py::array c_contiguous(const py::array& a, const char* name) {
  py::array c = py::array::ensure(a, py::array::c_style);
  if (!c) throw std::invalid_argument(std::string(name) + ": not convertible to a C-contiguous array");
  return c;
}
KVType kv_type_of(const py::array& a, const char* name) {
  const py::dtype t = a.dtype();
  if (t.kind() == 'f' && t.itemsize() == 4) return KVType::F32;
  if (t.kind() == 'f' && t.itemsize() == 2) return KVType::F16;
  throw std::invalid_argument(std::string(name) + ": dtype must be float32 or float16");
}
DeviceMemory upload_raw(const py::array& a) {
  DeviceMemory m(static_cast<size_t>(a.nbytes()));
  if (a.nbytes() > 0) m.upload(a.data(), static_cast<size_t>(a.nbytes()));
  return m;
}
// A new array shaped and typed like `like`, filled from device memory (after a device sync).
py::array download_like(const DeviceMemory& m, const py::array& like) {
  PYSERVE_GPU_CHECK(gpuDeviceSynchronize());
  py::array out(like.dtype(), std::vector<py::ssize_t>(like.shape(), like.shape() + like.ndim()));
  if (out.nbytes() > 0) m.download(out.mutable_data(), static_cast<size_t>(out.nbytes()));
  return out;
}
std::vector<py::ssize_t> shape_of(const py::array& a) { return {a.shape(), a.shape() + a.ndim()}; }

void require(bool ok, const std::string& message) {
  if (!ok) throw std::invalid_argument(message);
}

// A K/V cache pair: k_cache, v_cache: [num_pages, n_kv_heads, page_size, head_dim], same dtype.
struct CachePair {
  py::array k, v;
  KVType type;
  int n_kv_heads, page_size, head_dim;
  int64_t slots() const { return static_cast<int64_t>(k.shape(0)) * page_size; }
};
CachePair cache_pair(const py::array& k_cache, const py::array& v_cache) {
  CachePair c{c_contiguous(k_cache, "k_cache"), c_contiguous(v_cache, "v_cache"), KVType::F32, 0, 0, 0};
  c.type = kv_type_of(c.k, "k_cache");
  require(kv_type_of(c.v, "v_cache") == c.type, "k_cache and v_cache must have the same dtype");
  require(c.k.ndim() == 4 && shape_of(c.k) == shape_of(c.v),
          "k_cache and v_cache must both be [num_pages, n_kv_heads, page_size, head_dim]");
  c.n_kv_heads = static_cast<int>(c.k.shape(1));
  c.page_size = static_cast<int>(c.k.shape(2));
  c.head_dim = static_cast<int>(c.k.shape(3));
  return c;
}
// Host-side range check: a slot past the cache would write outside the device buffer.
void check_slots(const CArray<int64_t>& slots, py::ssize_t m, int64_t n_slots) {
  require(slots.ndim() == 1 && slots.shape(0) == m, "slots must be [m]");
  for (py::ssize_t i = 0; i < m; ++i)
    require(slots.data()[i] < n_slots, "slot " + std::to_string(slots.data()[i]) + " is past the cache's " +
                                           std::to_string(n_slots) + " slots");
}

// --- probes ---------------------------------------------------------------------------------------
// y defaults to a new [m, dim] array; a given y: [m, ldy] is updated in its first dim columns.
py::array_t<float> rmsnorm_probe(const CArray<float>& x, const CArray<float>& weight, float eps, const py::object& y,
                                 bool accumulate) {
  require(x.ndim() == 2 && weight.ndim() == 1, "x must be [m, ldx] and weight [dim]");
  const int m = static_cast<int>(x.shape(0)), dim = static_cast<int>(weight.shape(0));
  require(x.shape(1) >= dim, "x's rows are narrower than weight");
  CArray<float> y_host = y.is_none() ? CArray<float>(std::vector<py::ssize_t>{m, dim}) : py::cast<CArray<float>>(y);
  require(y_host.ndim() == 2 && y_host.shape(0) == m && y_host.shape(1) >= dim, "y must be [m, ldy >= dim]");
  require(!accumulate || !y.is_none(), "rmsnorm_add needs y");
  DeviceMemory d_x = upload(x), d_w = upload(weight), d_y = upload(y_host);
  if (accumulate)
    rmsnorm_add(d_x.as<float>(), x.shape(1), d_w.as<float>(), m, dim, eps, d_y.as<float>(), y_host.shape(1), nullptr);
  else
    rmsnorm(d_x.as<float>(), x.shape(1), d_w.as<float>(), m, dim, eps, d_y.as<float>(), y_host.shape(1), nullptr);
  return download<float>(d_y, shape_of(y_host));
}

py::tuple add_rmsnorm_probe(const CArray<float>& h, const CArray<float>& delta, const CArray<float>& weight, float eps,
                            const py::object& y) {
  require(h.ndim() == 2 && delta.ndim() == 2 && weight.ndim() == 1, "h, delta must be [m, ld] and weight [dim]");
  const int m = static_cast<int>(h.shape(0)), dim = static_cast<int>(weight.shape(0));
  require(h.shape(1) >= dim && delta.shape(0) == m && delta.shape(1) >= dim, "h and delta must be [m, ld >= dim]");
  CArray<float> y_host = y.is_none() ? CArray<float>(std::vector<py::ssize_t>{m, dim}) : py::cast<CArray<float>>(y);
  require(y_host.ndim() == 2 && y_host.shape(0) == m && y_host.shape(1) >= dim, "y must be [m, ldy >= dim]");
  DeviceMemory d_h = upload(h), d_delta = upload(delta), d_w = upload(weight), d_y = upload(y_host);
  add_rmsnorm(d_h.as<float>(), h.shape(1), d_delta.as<float>(), delta.shape(1), d_w.as<float>(), m, dim, eps,
              d_y.as<float>(), y_host.shape(1), nullptr);
  return py::make_tuple(download<float>(d_h, shape_of(h)), download<float>(d_y, shape_of(y_host)));
}

py::array_t<float> rmsnorm_heads_probe(const CArray<float>& x, int n_heads, int head_dim, const CArray<float>& weight,
                                       float eps) {
  require(x.ndim() == 2 && weight.ndim() == 1 && weight.shape(0) == head_dim, "x must be [m, ld], weight [head_dim]");
  require(x.shape(1) >= static_cast<py::ssize_t>(n_heads) * head_dim, "x's rows are narrower than n_heads * head_dim");
  DeviceMemory d_x = upload(x), d_w = upload(weight);
  rmsnorm_heads(d_x.as<float>(), x.shape(1), static_cast<int>(x.shape(0)), n_heads, head_dim, d_w.as<float>(), eps,
                nullptr);
  return download<float>(d_x, shape_of(x));
}

void check_rope_args(const CArray<int32_t>& positions, const CArray<float>& inv_freq, py::ssize_t m, int head_dim) {
  require(positions.ndim() == 1 && positions.shape(0) == m, "positions must be [m]");
  require(inv_freq.ndim() == 1 && inv_freq.shape(0) == head_dim / 2, "inv_freq must be [head_dim / 2]");
}

py::array_t<float> rope_probe(const CArray<float>& x, int n_heads, int head_dim, const CArray<int32_t>& positions,
                              const CArray<float>& inv_freq) {
  require(x.ndim() == 2, "x must be [m, ld]");
  require(x.shape(1) >= static_cast<py::ssize_t>(n_heads) * head_dim, "x's rows are narrower than n_heads * head_dim");
  check_rope_args(positions, inv_freq, x.shape(0), head_dim);
  DeviceMemory d_x = upload(x), d_pos = upload(positions), d_freq = upload(inv_freq);
  rope(d_x.as<float>(), x.shape(1), static_cast<int>(x.shape(0)), n_heads, head_dim, d_pos.as<int32_t>(),
       d_freq.as<float>(), nullptr);
  return download<float>(d_x, shape_of(x));
}

py::tuple rope_write_kv_probe(const CArray<float>& qkv, int n_heads, const CArray<int32_t>& positions,
                              const CArray<float>& inv_freq, const CArray<int64_t>& slots, const py::array& k_cache,
                              const py::array& v_cache) {
  const CachePair c = cache_pair(k_cache, v_cache);
  const int64_t hd = c.head_dim, q_dim = n_heads * hd, kv_dim = c.n_kv_heads * hd;
  require(qkv.ndim() == 2 && qkv.shape(1) >= q_dim + 2 * kv_dim,
          "qkv must be [m, ld >= (n_heads + 2 n_kv_heads) head_dim]");
  check_rope_args(positions, inv_freq, qkv.shape(0), c.head_dim);
  check_slots(slots, qkv.shape(0), c.slots());
  DeviceMemory d_qkv = upload(qkv), d_pos = upload(positions), d_freq = upload(inv_freq), d_slots = upload(slots);
  DeviceMemory d_k = upload_raw(c.k), d_v = upload_raw(c.v);
  float* q = d_qkv.as<float>();
  rope_write_kv(q, q + q_dim, q + q_dim + kv_dim, qkv.shape(1), static_cast<int>(qkv.shape(0)), n_heads,
                c.n_kv_heads, c.head_dim, d_pos.as<int32_t>(), d_freq.as<float>(), d_slots.as<int64_t>(),
                c.page_size, d_k.get(), d_v.get(), c.type, nullptr);
  return py::make_tuple(download<float>(d_qkv, shape_of(qkv)), download_like(d_k, c.k), download_like(d_v, c.v));
}

py::tuple write_kv_probe(const CArray<float>& k, const CArray<float>& v, const CArray<int64_t>& slots,
                         const py::array& k_cache, const py::array& v_cache) {
  const CachePair c = cache_pair(k_cache, v_cache);
  require(k.ndim() == 2 && shape_of(k) == shape_of(v), "k and v must both be [m, ld]");
  require(k.shape(1) >= static_cast<py::ssize_t>(c.n_kv_heads) * c.head_dim,
          "k's rows are narrower than n_kv_heads * head_dim");
  check_slots(slots, k.shape(0), c.slots());
  DeviceMemory d_k = upload(k), d_v = upload(v), d_slots = upload(slots);
  DeviceMemory d_kc = upload_raw(c.k), d_vc = upload_raw(c.v);
  write_kv(d_k.as<float>(), d_v.as<float>(), k.shape(1), static_cast<int>(k.shape(0)), c.n_kv_heads, c.head_dim,
           d_slots.as<int64_t>(), c.page_size, d_kc.get(), d_vc.get(), c.type, nullptr);
  return py::make_tuple(download_like(d_kc, c.k), download_like(d_vc, c.v));
}

template <bool kGelu>
py::array_t<float> gated_probe(const CArray<float>& gate_up) {
  require(gate_up.ndim() == 2 && gate_up.shape(1) % 2 == 0, "gate_up must be [m, 2 * inter]");
  const int m = static_cast<int>(gate_up.shape(0)), inter = static_cast<int>(gate_up.shape(1) / 2);
  DeviceMemory d_in = upload(gate_up), d_out(static_cast<size_t>(m) * inter * sizeof(float));
  if (kGelu)
    gelu_tanh_mul(d_in.as<float>(), m, inter, d_out.as<float>(), nullptr);
  else
    silu_mul(d_in.as<float>(), m, inter, d_out.as<float>(), nullptr);
  return download<float>(d_out, {m, inter});
}

py::array_t<float> scale_probe(const CArray<float>& x, float s, int64_t offset) {
  require(x.ndim() == 1 && offset >= 0 && offset <= x.shape(0), "x must be [n] and 0 <= offset <= n");
  DeviceMemory d_x = upload(x);
  scale(d_x.as<float>() + offset, x.shape(0) - offset, s, nullptr);
  return download<float>(d_x, shape_of(x));
}

py::array copy_pages_probe(const py::array& cache, const CArray<int32_t>& src, const CArray<int32_t>& dst) {
  const py::array c = c_contiguous(cache, "cache");
  const KVType type = kv_type_of(c, "cache");
  require(c.ndim() == 4 && c.shape(1) == 2, "cache must be [num_layers, 2, num_pages, page_elems]");
  require(src.ndim() == 1 && shape_of(src) == shape_of(dst), "src and dst must both be [n]");
  const int64_t num_pages = c.shape(2), page_elems = c.shape(3);
  for (py::ssize_t j = 0; j < src.shape(0); ++j)
    require(src.data()[j] < num_pages && dst.data()[j] < num_pages, "page id past the cache's pages");
  DeviceMemory d_cache = upload_raw(c), d_src = upload(src), d_dst = upload(dst);
  copy_pages(d_cache.get(), type, static_cast<int>(c.shape(0)), num_pages * page_elems, page_elems,
             d_src.as<int32_t>(), d_dst.as<int32_t>(), static_cast<int>(src.shape(0)), nullptr);
  return download_like(d_cache, c);
}

py::tuple copy_kv_slot_probe(const py::array& k_cache, const py::array& v_cache, int64_t src, int64_t dst) {
  const CachePair c = cache_pair(k_cache, v_cache);
  require(src < c.slots() && dst < c.slots(), "slot past the cache's slots");
  DeviceMemory d_k = upload_raw(c.k), d_v = upload_raw(c.v);
  copy_kv_slot(d_k.get(), d_v.get(), c.type, c.n_kv_heads, c.head_dim, c.page_size, src, dst, nullptr);
  return py::make_tuple(download_like(d_k, c.k), download_like(d_v, c.v));
}

py::array_t<uint8_t> copy_bytes_probe(const CArray<uint8_t>& src) {
  require(src.ndim() == 1 && src.shape(0) % 16 == 0, "src must be [n] bytes, n a multiple of 16");
  DeviceMemory d_src = upload(src), d_dst(static_cast<size_t>(src.shape(0)));
  copy_bytes(d_src.get(), d_dst.get(), src.shape(0), nullptr);
  return download<uint8_t>(d_dst, shape_of(src));
}

double bench_copy(int64_t nbytes, int iters) {
  require(nbytes > 0 && nbytes % 16 == 0, "nbytes must be a positive multiple of 16");
  require(iters > 0, "iters must be positive");
  DeviceMemory src(static_cast<size_t>(nbytes)), dst(static_cast<size_t>(nbytes));
  PYSERVE_GPU_CHECK(gpuMemsetAsync(src.get(), 1, static_cast<size_t>(nbytes), nullptr));
  copy_bytes(src.get(), dst.get(), nbytes, nullptr);  // warm-up: first-touch and launch set-up
  DeviceTimer timer;
  timer.start();
  for (int i = 0; i < iters; ++i) copy_bytes(src.get(), dst.get(), nbytes, nullptr);
  return static_cast<double>(timer.stop_ms()) / iters;
}

}  // namespace

void bind_elementwise(py::module_& m) {
  m.def(
      "rmsnorm",
      [](const CArray<float>& x, const CArray<float>& weight, float eps, const py::object& y) {
        return rmsnorm_probe(x, weight, eps, y, false);
      },
      py::arg("x"), py::arg("weight"), py::arg("eps"), py::arg("y") = py::none(),
      "x: [m, ldx], weight: [dim] -> y: [m, dim] = x[:, :dim] / rms * weight (or the given y: [m, ldy] with its "
      "first dim columns written).");
  m.def(
      "rmsnorm_add",
      [](const CArray<float>& x, const CArray<float>& weight, float eps, const py::object& y) {
        return rmsnorm_probe(x, weight, eps, y, true);
      },
      py::arg("x"), py::arg("weight"), py::arg("eps"), py::arg("y"),
      "x: [m, ldx], weight: [dim], y: [m, ldy] -> y with y[:, :dim] += x[:, :dim] / rms * weight.");
  m.def("add_rmsnorm", &add_rmsnorm_probe, py::arg("h"), py::arg("delta"), py::arg("weight"), py::arg("eps"),
        py::arg("y") = py::none(),
        "h: [m, ldh], delta: [m, ld_delta], weight: [dim] -> (h with h[:, :dim] += delta[:, :dim], "
        "y: [m, dim] = the new h / rms * weight).");
  m.def("rmsnorm_heads", &rmsnorm_heads_probe, py::arg("x"), py::arg("n_heads"), py::arg("head_dim"),
        py::arg("weight"), py::arg("eps"),
        "x: [m, ld] holding [m, n_heads, head_dim] in its first columns, weight: [head_dim] -> x with each head "
        "vector normalised in place.");
  m.def("rope", &rope_probe, py::arg("x"), py::arg("n_heads"), py::arg("head_dim"), py::arg("positions"),
        py::arg("inv_freq"),
        "x: [m, ld] holding [m, n_heads, head_dim], positions: [m] int32, inv_freq: [head_dim / 2] -> x rotated "
        "(rotate-half RoPE, angle = float32(position) * inv_freq, cos/sin in double).");
  m.def("rope_write_kv", &rope_write_kv_probe, py::arg("qkv"), py::arg("n_heads"), py::arg("positions"),
        py::arg("inv_freq"), py::arg("slots"), py::arg("k_cache"), py::arg("v_cache"),
        "qkv: [m, ld] fused rows (q: n_heads, k and v: n_kv_heads head vectors), positions: [m] int32, "
        "inv_freq: [head_dim / 2], slots: [m] int64 (negative: skipped), k_cache, v_cache: [num_pages, "
        "n_kv_heads, page_size, head_dim] float32 or float16 -> (qkv with q and k rotated, k_cache, v_cache).");
  m.def("write_kv", &write_kv_probe, py::arg("k"), py::arg("v"), py::arg("slots"), py::arg("k_cache"),
        py::arg("v_cache"),
        "k, v: [m, ld] holding [m, n_kv_heads, head_dim], slots: [m] int64, caches as in rope_write_kv -> "
        "(k_cache, v_cache) with each token stored at its slot.");
  m.def("silu_mul", &gated_probe<false>, py::arg("gate_up"),
        "gate_up: [m, 2 * inter] -> [m, inter] = silu(gate) * up.");
  m.def("gelu_tanh_mul", &gated_probe<true>, py::arg("gate_up"),
        "gate_up: [m, 2 * inter] -> [m, inter] = gelu_tanh(gate) * up.");
  m.def("scale", &scale_probe, py::arg("x"), py::arg("s"), py::arg("offset") = 0,
        "x: [n] -> x with x[offset:] *= s (offset shifts the device pointer off 16-byte alignment).");
  m.def("copy_pages", &copy_pages_probe, py::arg("cache"), py::arg("src"), py::arg("dst"),
        "cache: [num_layers, 2, num_pages, page_elems] float32 or float16, src, dst: [n] int32 -> the cache with "
        "page dst[j] of every layer's K and V a copy of page src[j] (negative ids skipped).");
  m.def("copy_kv_slot", &copy_kv_slot_probe, py::arg("k_cache"), py::arg("v_cache"), py::arg("src"), py::arg("dst"),
        "k_cache, v_cache: [num_pages, n_kv_heads, page_size, head_dim] -> (k_cache, v_cache) with slot dst's "
        "K/V a copy of slot src's.");
  m.def("copy_bytes", &copy_bytes_probe, py::arg("src"),
        "src: [n] uint8 (n a multiple of 16) -> a device-to-device copy of it by copy_bytes.");
  m.def("bench_copy", &bench_copy, py::arg("nbytes"), py::arg("iters"),
        "Milliseconds per device-to-device copy of nbytes (a multiple of 16) by copy_bytes, averaged over iters.");
}

}  // namespace pyserve::gpu
