// Probes of paged attention for tests/gpu/test_attention.py and tools/bench_gpu.py: numpy arrays
// in, the launcher on the default stream, numpy arrays out.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "backend/cuda/attention.h"
#include "backend/cuda/probe_util.h"

namespace pyserve::gpu {

namespace {

KVType parse_kv_type(const std::string& s) {
  if (s == "f32") return KVType::F32;
  if (s == "f16") return KVType::F16;
  throw std::invalid_argument("kv_type must be 'f32' or 'f16', not '" + s + "'");
}

// A KV cache block [num_pages, n_kv_heads, page_size, head_dim] in device memory: float32 values
// for f32, IEEE half bits (numpy float16 or uint16) for f16.
DeviceMemory upload_cache(const py::array& cache, KVType kv_type, const char* name) {
  if (kv_type == KVType::F32) return upload(py::cast<CArray<float>>(cache));
  const py::dtype dt = cache.dtype();
  if (dt.itemsize() != 2 || (dt.kind() != 'f' && dt.kind() != 'u'))
    throw std::invalid_argument(std::string(name) + ": an f16 cache must be float16 or uint16 (the bits)");
  const py::array c = py::array::ensure(cache, py::array::c_style);
  DeviceMemory m(static_cast<size_t>(c.nbytes()));
  if (c.nbytes() > 0) m.upload(c.data(), static_cast<size_t>(c.nbytes()));
  return m;
}

constexpr float kPadSentinel = -12345.f;  // row padding of q and out: the kernels never touch it

py::array_t<float> probe_attention(const CArray<float>& q, const py::array& k_cache, const py::array& v_cache,
                                   const CArray<int32_t>& page_table, const CArray<int32_t>& token_seq,
                                   const CArray<int32_t>& positions, int n_kv_heads, float scale, int page_size,
                                   int window, int sink, const py::object& own_slots_obj, const std::string& kv_type_name,
                                   const std::string& kernel, int row_pad, int64_t workspace_bytes_arg) {
  const KVType kv_type = parse_kv_type(kv_type_name);
  if (q.ndim() != 3) throw std::invalid_argument("attention: q must be [n_tokens, n_heads, head_dim]");
  const int n_tokens = static_cast<int>(q.shape(0)), n_heads = static_cast<int>(q.shape(1));
  const int head_dim = static_cast<int>(q.shape(2));
  if (k_cache.ndim() != 4 || v_cache.ndim() != 4)
    throw std::invalid_argument("attention: k_cache and v_cache must be [num_pages, n_kv_heads, page_size, head_dim]");
  for (int d = 0; d < 4; ++d)
    if (k_cache.shape(d) != v_cache.shape(d)) throw std::invalid_argument("attention: k_cache and v_cache differ in shape");
  if (k_cache.shape(1) != n_kv_heads || k_cache.shape(2) != page_size || k_cache.shape(3) != head_dim)
    throw std::invalid_argument("attention: the cache's shape does not match n_kv_heads, page_size, head_dim");
  if (page_table.ndim() != 2) throw std::invalid_argument("attention: page_table must be [n_seqs, max_pages]");
  if (token_seq.ndim() != 1 || positions.ndim() != 1 || token_seq.shape(0) != n_tokens ||
      positions.shape(0) != n_tokens)
    throw std::invalid_argument("attention: token_seq and positions must be [n_tokens]");
  if (row_pad < 0) throw std::invalid_argument("attention: row_pad must be >= 0");
  const bool has_own = !own_slots_obj.is_none();
  CArray<int64_t> own_slots = has_own ? py::cast<CArray<int64_t>>(own_slots_obj) : CArray<int64_t>(0);
  if (has_own && (own_slots.ndim() != 1 || own_slots.shape(0) != n_tokens))
    throw std::invalid_argument("attention: own_slots must be [n_tokens]");

  // The kernels trust their indices: check them here, so a bad test is an exception, not a fault.
  const int64_t num_pages = k_cache.shape(0);
  const int n_seqs = static_cast<int>(page_table.shape(0)), max_pages = static_cast<int>(page_table.shape(1));
  auto table = page_table.unchecked<2>();
  auto seqs = token_seq.unchecked<1>();
  auto pos = positions.unchecked<1>();
  for (int i = 0; i < n_tokens; ++i) {
    if (seqs(i) < 0 || seqs(i) >= n_seqs) throw std::invalid_argument("attention: token_seq out of range");
    if (pos(i) < 0 || static_cast<int64_t>(pos(i)) >= static_cast<int64_t>(max_pages) * page_size)
      throw std::invalid_argument("attention: a position past the page table");
    const bool leaf = has_own && own_slots.at(i) >= 0;
    if (leaf && own_slots.at(i) >= num_pages * page_size) throw std::invalid_argument("attention: own_slots out of range");
    const int last = leaf ? pos(i) - 1 : pos(i);  // the last position the token reads
    for (int pg = 0; last >= 0 && pg <= last / page_size; ++pg)
      if (table(seqs(i), pg) < 0 || table(seqs(i), pg) >= num_pages)
        throw std::invalid_argument("attention: a page-table entry out of range");
  }

  // q and out at row stride n_heads * head_dim + row_pad, the padding a sentinel.
  const int64_t row = static_cast<int64_t>(n_heads) * head_dim, stride = row + row_pad;
  if (n_tokens == 0) return py::array_t<float>(std::vector<py::ssize_t>{0, n_heads, head_dim});
  std::vector<float> q_host(static_cast<size_t>(n_tokens * stride), kPadSentinel);
  for (int i = 0; i < n_tokens; ++i) std::memcpy(&q_host[i * stride], q.data() + i * row, row * sizeof(float));
  DeviceMemory q_dev = to_device(q_host);
  DeviceMemory out_dev = to_device(q_host);  // the padding starts as the sentinel too
  DeviceMemory k_dev = upload_cache(k_cache, kv_type, "k_cache");
  DeviceMemory v_dev = upload_cache(v_cache, kv_type, "v_cache");
  DeviceMemory table_dev = upload(page_table);
  DeviceMemory seq_dev = upload(token_seq);
  DeviceMemory pos_dev = upload(positions);
  DeviceMemory own_dev = has_own ? upload(own_slots) : DeviceMemory();

  PagedAttention a;
  a.q = q_dev.as<float>();
  a.q_stride = stride;
  a.n_tokens = n_tokens;
  a.n_heads = n_heads;
  a.n_kv_heads = n_kv_heads;
  a.head_dim = head_dim;
  a.scale = scale;
  a.k_cache = k_dev.get();
  a.v_cache = v_dev.get();
  a.kv_type = kv_type;
  a.page_size = page_size;
  a.page_table = table_dev.as<int32_t>();
  a.max_pages = max_pages;
  a.token_seq = seq_dev.as<int32_t>();
  a.positions = pos_dev.as<int32_t>();
  a.window = window;
  a.sink = sink;
  a.own_slots = has_own ? own_dev.as<int64_t>() : nullptr;
  a.out = out_dev.as<float>();
  a.out_stride = stride;

  const size_t ws_bytes = workspace_bytes_arg >= 0 ? static_cast<size_t>(workspace_bytes_arg)
                                                   : attention_workspace_bytes(n_tokens, n_heads, head_dim, max_pages * page_size);
  DeviceMemory workspace(ws_bytes);
  if (kernel == "auto") {
    std::vector<char> seen(static_cast<size_t>(n_seqs), 0);
    bool decode_only = true;
    for (int i = 0; i < n_tokens; ++i) {
      decode_only = decode_only && !seen[seqs(i)];
      seen[seqs(i)] = 1;
    }
    attention(a, workspace.get(), ws_bytes, decode_only, nullptr);
  } else if (kernel == "decode") {
    attention_decode(a, workspace.get(), ws_bytes, nullptr);
  } else if (kernel == "prefill") {
    attention_prefill(a, nullptr);
  } else {
    throw std::invalid_argument("attention: kernel must be 'auto', 'decode' or 'prefill'");
  }

  py::array_t<float> raw = download<float>(out_dev, {n_tokens, static_cast<py::ssize_t>(stride)});
  py::array_t<float> out(std::vector<py::ssize_t>{n_tokens, n_heads, head_dim});
  const float* src = raw.data();
  for (int i = 0; i < n_tokens; ++i) {
    for (int64_t e = row; e < stride; ++e)
      if (std::memcmp(&src[i * stride + e], &kPadSentinel, sizeof(float)) != 0)
        throw std::runtime_error("attention: the kernel wrote into the row padding of out");
    std::memcpy(out.mutable_data() + i * row, src + i * stride, row * sizeof(float));
  }
  return out;
}

// A decode step of `batch` sequences, each `context` tokens long (pages in order), on a cache
// filled with one finite byte pattern: milliseconds per attention() launch.
double bench_attention_decode(int batch, int context, int n_heads, int n_kv_heads, int head_dim, int page_size,
                              const std::string& kv_type_name, int iters) {
  const KVType kv_type = parse_kv_type(kv_type_name);
  if (batch <= 0 || context <= 0 || page_size <= 0 || iters <= 0 || n_heads <= 0 || n_kv_heads <= 0 || head_dim <= 0)
    throw std::invalid_argument("bench_attention_decode: every size and iters must be positive");
  const int pages_per_seq = (context + page_size - 1) / page_size;
  const int64_t num_pages = static_cast<int64_t>(batch) * pages_per_seq;
  const size_t elem = kv_type == KVType::F32 ? 4 : 2;
  const size_t cache_bytes = static_cast<size_t>(num_pages) * n_kv_heads * page_size * head_dim * elem;
  DeviceMemory k_dev(cache_bytes), v_dev(cache_bytes);
  // 0x3c bytes: 0.0115 as f32, 1.06 as f16
  PYSERVE_GPU_CHECK(gpuMemsetAsync(k_dev.get(), 0x3c, cache_bytes, nullptr));
  PYSERVE_GPU_CHECK(gpuMemsetAsync(v_dev.get(), 0x3c, cache_bytes, nullptr));
  std::vector<int32_t> table(static_cast<size_t>(num_pages)), seqs(batch), positions(batch, context - 1);
  for (int64_t p = 0; p < num_pages; ++p) table[p] = static_cast<int32_t>(p);
  for (int b = 0; b < batch; ++b) seqs[b] = b;
  const int64_t row = static_cast<int64_t>(n_heads) * head_dim;
  DeviceMemory q_dev(static_cast<size_t>(batch * row) * sizeof(float)), out_dev(q_dev.bytes());
  PYSERVE_GPU_CHECK(gpuMemsetAsync(q_dev.get(), 0x3c, q_dev.bytes(), nullptr));
  DeviceMemory table_dev = to_device(table), seq_dev = to_device(seqs), pos_dev = to_device(positions);

  PagedAttention a;
  a.q = q_dev.as<float>();
  a.q_stride = row;
  a.n_tokens = batch;
  a.n_heads = n_heads;
  a.n_kv_heads = n_kv_heads;
  a.head_dim = head_dim;
  a.scale = 1.f / std::sqrt(static_cast<float>(head_dim));
  a.k_cache = k_dev.get();
  a.v_cache = v_dev.get();
  a.kv_type = kv_type;
  a.page_size = page_size;
  a.page_table = table_dev.as<int32_t>();
  a.max_pages = pages_per_seq;
  a.token_seq = seq_dev.as<int32_t>();
  a.positions = pos_dev.as<int32_t>();
  a.out = out_dev.as<float>();
  a.out_stride = row;
  const size_t ws_bytes = attention_workspace_bytes(batch, n_heads, head_dim, pages_per_seq * page_size);
  DeviceMemory workspace(ws_bytes);

  attention(a, workspace.get(), ws_bytes, true, nullptr);  // warm-up
  DeviceTimer timer(nullptr);
  timer.start();
  for (int i = 0; i < iters; ++i) attention(a, workspace.get(), ws_bytes, true, nullptr);
  return static_cast<double>(timer.stop_ms()) / iters;
}

}  // namespace

void bind_attention(py::module_& m) {
  m.def("attention", &probe_attention, py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("page_table"),
        py::arg("token_seq"), py::arg("positions"), py::arg("n_kv_heads"), py::arg("scale"), py::arg("page_size"),
        py::arg("window") = 0, py::arg("sink") = 0, py::arg("own_slots") = py::none(), py::arg("kv_type") = "f32",
        py::arg("kernel") = "auto", py::arg("row_pad") = 0, py::arg("workspace_bytes") = -1,
        "Paged attention of q: [n_tokens, n_heads, head_dim] over k_cache / v_cache: [num_pages, n_kv_heads,\n"
        "page_size, head_dim] (float32, or float16 / uint16 bits with kv_type='f16'). page_table: [n_seqs,\n"
        "max_pages] int32; token_seq, positions: [n_tokens] int32; own_slots: None or [n_tokens] int64 (-1, or a\n"
        "draft-tree leaf's cache slot). kernel: 'auto' (decode when every token's sequence is its own, else\n"
        "prefill), 'decode' or 'prefill'. row_pad: extra floats per row of q and out (the kernels must not touch\n"
        "them); workspace_bytes: -1 for attention_workspace_bytes, else that many (fewer splits if short).\n"
        "Returns out: [n_tokens, n_heads, head_dim] float32.");
  m.def("attention_workspace_bytes", &attention_workspace_bytes, py::arg("n_tokens"), py::arg("n_heads"),
        py::arg("head_dim"), py::arg("max_context"),
        "Workspace bytes of attention() for a batch whose longest context is max_context (0: no split-K).");
  m.def("bench_attention_decode", &bench_attention_decode, py::arg("batch"), py::arg("context"), py::arg("n_heads"),
        py::arg("n_kv_heads"), py::arg("head_dim"), py::arg("page_size") = 16, py::arg("kv_type") = "f32",
        py::arg("iters") = 50,
        "Milliseconds per attention() launch for a decode batch of `batch` sequences of `context` tokens each\n"
        "(bytes read: batch * context * n_kv_heads * head_dim * 2 * (4 for f32, 2 for f16)).");
}

}  // namespace pyserve::gpu
