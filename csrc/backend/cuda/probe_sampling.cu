// pyserve._C.gpu probes of the sampling family (sampling.h): each takes numpy arrays, runs one
// launcher on the default stream and returns numpy results, for tests/gpu's float64 references.
#include <climits>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "backend/cuda/probe_util.h"
#include "backend/cuda/sampling.h"

namespace pyserve::gpu {
namespace {

void require(bool ok, const std::string& message) {
  if (!ok) throw std::invalid_argument(message);
}

void require_int(py::ssize_t n, const char* name) {
  require(n <= INT_MAX, std::string(name) + " does not fit an int");
}

template <typename T>
void require_rows(const CArray<T>& a, py::ssize_t rows, const char* name) {
  require(a.ndim() == 1 && a.shape(0) == rows, std::string(name) + " must be [rows] = [" + std::to_string(rows) + "]");
}

// logits: [rows, vocab]; the rest [rows] -> tokens: [rows] int32.
py::array_t<int32_t> sample_probe(const CArray<float>& logits, const CArray<float>& temperature,
                                  const CArray<int32_t>& top_k, const CArray<float>& top_p,
                                  const CArray<float>& min_p, const CArray<float>& uniform) {
  require(logits.ndim() == 2, "logits must be [rows, vocab]");
  const py::ssize_t rows = logits.shape(0), vocab = logits.shape(1);
  require_int(rows, "rows");
  require_int(vocab, "vocab");
  require_rows(temperature, rows, "temperature");
  require_rows(top_k, rows, "top_k");
  require_rows(top_p, rows, "top_p");
  require_rows(min_p, rows, "min_p");
  require_rows(uniform, rows, "uniform");
  DeviceMemory d_logits = upload(logits), d_t = upload(temperature), d_k = upload(top_k), d_p = upload(top_p),
               d_min_p = upload(min_p), d_u = upload(uniform);
  DeviceMemory d_tokens(static_cast<size_t>(rows) * sizeof(int32_t));
  const size_t ws_bytes = sample_workspace_bytes(static_cast<int>(rows), static_cast<int>(vocab));
  DeviceMemory workspace(ws_bytes);
  SamplingParams params;
  params.temperature = d_t.as<float>();
  params.top_k = d_k.as<int32_t>();
  params.top_p = d_p.as<float>();
  params.min_p = d_min_p.as<float>();
  params.uniform = d_u.as<float>();
  sample(d_logits.as<float>(), static_cast<int>(rows), static_cast<int>(vocab), params, d_tokens.as<int32_t>(),
         workspace.get(), ws_bytes, nullptr);
  return download<int32_t>(d_tokens, {rows});
}

py::array_t<int32_t> argmax_probe(const CArray<float>& logits) {
  require(logits.ndim() == 2, "logits must be [rows, vocab]");
  const py::ssize_t rows = logits.shape(0), vocab = logits.shape(1);
  require_int(rows, "rows");
  require_int(vocab, "vocab");
  DeviceMemory d_logits = upload(logits), d_tokens(static_cast<size_t>(rows) * sizeof(int32_t));
  argmax(d_logits.as<float>(), static_cast<int>(rows), static_cast<int>(vocab), d_tokens.as<int32_t>(), nullptr);
  return download<int32_t>(d_tokens, {rows});
}

// Offsets are checked here, on the host: the kernel trusts them.
py::tuple verify_greedy_probe(const CArray<int32_t>& target, const CArray<int32_t>& drafts,
                              const CArray<int32_t>& offsets) {
  require(target.ndim() == 1 && drafts.ndim() == 1 && offsets.ndim() == 1 && offsets.shape(0) >= 1,
          "target, drafts must be 1-D and offsets [n_seqs + 1]");
  const py::ssize_t n_seqs = offsets.shape(0) - 1;
  require_int(n_seqs, "n_seqs");
  const int32_t* o = offsets.data();
  require(o[0] == 0, "offsets[0] must be 0");
  for (py::ssize_t s = 0; s < n_seqs; ++s)
    require(o[s + 1] - o[s] >= 1, "sequence " + std::to_string(s) + " has no target row (offsets must increase)");
  require(o[n_seqs] == target.shape(0), "target must have offsets[-1] rows");
  require(o[n_seqs] - n_seqs == drafts.shape(0), "drafts must have offsets[-1] - n_seqs entries");
  DeviceMemory d_target = upload(target), d_drafts = upload(drafts), d_offsets = upload(offsets);
  DeviceMemory d_accepted(static_cast<size_t>(n_seqs) * sizeof(int32_t)),
      d_next(static_cast<size_t>(n_seqs) * sizeof(int32_t));
  verify_greedy(d_target.as<int32_t>(), d_drafts.as<int32_t>(), d_offsets.as<int32_t>(), static_cast<int>(n_seqs),
                d_accepted.as<int32_t>(), d_next.as<int32_t>(), nullptr);
  return py::make_tuple(download<int32_t>(d_accepted, {n_seqs}), download<int32_t>(d_next, {n_seqs}));
}

double bench_sample(int rows, int vocab, int iters, float temperature, int top_k, float top_p, float min_p) {
  require(rows > 0 && vocab > 0, "rows and vocab must be positive");
  require(iters > 0, "iters must be positive");
  // Logits like a language model's: a normal bulk, the draws spread over the rows.
  std::mt19937 gen(1234);
  std::normal_distribution<float> normal(0.f, 3.f);
  std::uniform_real_distribution<float> unit(0.f, 1.f);
  std::vector<float> logits(static_cast<size_t>(rows) * vocab), t(rows, temperature), p(rows, top_p),
      mp(rows, min_p), u(rows);
  std::vector<int32_t> k(rows, top_k);
  for (float& x : logits) x = normal(gen);
  for (float& x : u) x = unit(gen);
  DeviceMemory d_logits = to_device(logits), d_t = to_device(t), d_k = to_device(k), d_p = to_device(p),
               d_min_p = to_device(mp), d_u = to_device(u);
  DeviceMemory d_tokens(static_cast<size_t>(rows) * sizeof(int32_t));
  const size_t ws_bytes = sample_workspace_bytes(rows, vocab);
  DeviceMemory workspace(ws_bytes);
  SamplingParams params;
  params.temperature = d_t.as<float>();
  params.top_k = d_k.as<int32_t>();
  params.top_p = d_p.as<float>();
  params.min_p = d_min_p.as<float>();
  params.uniform = d_u.as<float>();
  auto launch = [&] {
    sample(d_logits.as<float>(), rows, vocab, params, d_tokens.as<int32_t>(), workspace.get(), ws_bytes, nullptr);
  };
  launch();  // warm-up
  DeviceTimer timer;
  timer.start();
  for (int i = 0; i < iters; ++i) launch();
  return static_cast<double>(timer.stop_ms()) / iters;
}

}  // namespace

void bind_sampling(py::module_& m) {
  m.def("sample", &sample_probe, py::arg("logits"), py::arg("temperature"), py::arg("top_k"), py::arg("top_p"),
        py::arg("min_p"), py::arg("uniform"),
        "logits: [rows, vocab] float32; temperature, top_p, min_p, uniform: [rows] float32; top_k: [rows] int32 -> "
        "tokens: [rows] int32: per row, top-k then top-p then min-p on softmax(logits / temperature), then the "
        "token at uniform * kept mass of the kept tokens' running mass in id order (temperature < 1e-5 or "
        "top_k == 1: argmax).");
  m.def("argmax", &argmax_probe, py::arg("logits"),
        "logits: [rows, vocab] float32 -> tokens: [rows] int32, each row's first maximum.");
  m.def("verify_greedy", &verify_greedy_probe, py::arg("target"), py::arg("drafts"), py::arg("offsets"),
        "target: [offsets[-1]] int32 argmax tokens, drafts: [offsets[-1] - n_seqs] int32, offsets: [n_seqs + 1] "
        "int32 -> (accepted, next): [n_seqs] int32 each: the longest draft prefix equal to the target's tokens "
        "and the target's token after it.");
  m.def("bench_sample", &bench_sample, py::arg("rows"), py::arg("vocab"), py::arg("iters"),
        py::arg("temperature") = 0.7f, py::arg("top_k") = 50, py::arg("top_p") = 0.9f, py::arg("min_p") = 0.f,
        "Milliseconds per sample launch on [rows, vocab] normal(0, 3) logits with these parameters on every row, "
        "averaged over iters.");
}

}  // namespace pyserve::gpu
