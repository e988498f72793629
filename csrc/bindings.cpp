// pyserve._C: the Python face of the C++ engine. Conversions only; the logic lives elsewhere.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <chrono>
#include <cstring>
#include <numeric>
#include <random>
#include <thread>

#include "backend/cpu/cpu_backend.h"
#include "backend/cpu/cpu_features.h"
#include "cache/radix_tree.h"
#include "engine/engine.h"
#include "engine/grammar.h"
#include "model/llama.h"
#include "tensor/dequantize.h"

namespace py = pybind11;
using namespace pyserve;

namespace {

template <class T>
T get_or(const py::dict& d, const char* key, T fallback) {
  if (!d.contains(key) || d[key].is_none()) return fallback;
  return d[key].cast<T>();
}

ModelConfig model_config_from(const py::dict& d) {
  ModelConfig c;
  c.architecture = get_or<std::string>(d, "architecture", "llama");
  c.vocab_size = d["vocab_size"].cast<int>();
  c.hidden_size = d["hidden_size"].cast<int>();
  c.intermediate_size = d["intermediate_size"].cast<int>();
  c.num_layers = d["num_hidden_layers"].cast<int>();
  c.num_heads = d["num_attention_heads"].cast<int>();
  if (c.num_heads <= 0) throw std::invalid_argument("invalid model config: num_attention_heads must be positive");
  c.num_kv_heads = get_or<int>(d, "num_key_value_heads", c.num_heads);
  c.head_dim = get_or<int>(d, "head_dim", c.hidden_size / c.num_heads);
  c.rms_norm_eps = get_or<float>(d, "rms_norm_eps", 1e-5f);
  c.rope_theta = get_or<double>(d, "rope_theta", 10000.0);
  c.max_position_embeddings = get_or<int>(d, "max_position_embeddings", 2048);
  c.tie_word_embeddings = get_or<bool>(d, "tie_word_embeddings", false);
  c.attention_bias = get_or<bool>(d, "attention_bias", false);
  c.sliding_window = get_or<int>(d, "sliding_window", 0);
  c.attention_sink = get_or<int>(d, "attention_sink", 0);
  // Gemma 3: per-layer attention types ("sliding_attention" | "full_attention"), the local rope
  // base, the attention score scalar.
  if (d.contains("layer_types") && !d["layer_types"].is_none()) {
    for (const std::string& t : d["layer_types"].cast<std::vector<std::string>>()) {
      if (t != "sliding_attention" && t != "full_attention")
        throw std::invalid_argument("invalid model config: layer type '" + t +
                                    "' (supported: sliding_attention, full_attention)");
      c.layer_sliding.push_back(t == "sliding_attention");
    }
  }
  c.rope_local_theta = get_or<double>(d, "rope_local_theta", 0.0);
  c.query_pre_attn_scalar = get_or<double>(d, "query_pre_attn_scalar", 0.0);
  if (d.contains("rope_scaling") && !d["rope_scaling"].is_none()) {
    py::dict rs = d["rope_scaling"].cast<py::dict>();
    c.rope_type = get_or<std::string>(rs, "rope_type", get_or<std::string>(rs, "type", "default"));
    c.rope_factor = get_or<double>(rs, "factor", 1.0);
    c.rope_low_freq_factor = get_or<double>(rs, "low_freq_factor", 1.0);
    c.rope_high_freq_factor = get_or<double>(rs, "high_freq_factor", 4.0);
    c.rope_original_max_position = get_or<double>(rs, "original_max_position_embeddings", 8192.0);
  }
  c.validate();
  return c;
}

py::dict model_config_to_dict(const ModelConfig& c) {
  py::dict d;
  d["architecture"] = c.architecture;
  d["vocab_size"] = c.vocab_size;
  d["hidden_size"] = c.hidden_size;
  d["intermediate_size"] = c.intermediate_size;
  d["num_hidden_layers"] = c.num_layers;
  d["num_attention_heads"] = c.num_heads;
  d["num_key_value_heads"] = c.num_kv_heads;
  d["head_dim"] = c.head_dim;
  d["sliding_window"] = c.sliding_window;
  d["attention_sink"] = c.attention_sink;
  d["release_window"] = c.release_window();
  std::vector<int> windows;
  for (int l = 0; l < c.num_layers; ++l) windows.push_back(c.window(l));
  d["layer_windows"] = windows;
  return d;
}

// The model plus the backend it computes on.
struct PyModel {
  std::shared_ptr<LlamaModel> model;
};

// (name, format, buffer, shape) tuples -> views of the buffers (infos keeps each buffer's request
// alive while the views are read).
TensorMap tensor_map_from(const py::list& tensors, std::vector<py::buffer_info>& infos) {
  infos.reserve(tensors.size());
  TensorMap map;
  for (const py::handle& item : tensors) {
    py::tuple t = item.cast<py::tuple>();
    if (t.size() != 4) throw std::invalid_argument("tensors: expected (name, format, buffer, shape) tuples");
    TensorView v;
    v.name = t[0].cast<std::string>();
    v.dtype = parse_dtype(t[1].cast<std::string>());
    infos.push_back(t[2].cast<py::buffer>().request());
    const py::buffer_info& info = infos.back();
    v.data = info.ptr;
    v.shape = t[3].cast<std::vector<int64_t>>();
    const int64_t bytes = info.size * info.itemsize;
    const DTypeInfo& di = dtype_info(v.dtype);
    if (v.shape.empty() || v.shape.back() % di.block_elems != 0)
      throw std::invalid_argument("tensor '" + v.name + "': its last dimension must be a multiple of " +
                                  std::to_string(di.block_elems) + " for format " + di.name);
    if (bytes != v.bytes())
      throw std::invalid_argument("tensor '" + v.name + "': buffer holds " + std::to_string(bytes) +
                                  " bytes, shape and format need " + std::to_string(v.bytes()));
    map.add(std::move(v));
  }
  return map;
}

// "cpu", or a GPU: "cuda" / "rocm" (device 0) or "cuda:N" / "rocm:N", of the vendor this build has.
std::shared_ptr<Backend> make_backend(const std::string& device, int num_threads, const std::string& isa) {
  if (device == "cpu") return make_cpu_backend(num_threads, isa);
  const size_t colon = device.find(':');
  const std::string kind = device.substr(0, colon);
  if (kind != "cuda" && kind != "rocm")
    throw std::invalid_argument("device must be cpu, cuda[:N] or rocm[:N], got '" + device + "'");
  int index = 0;
  if (colon != std::string::npos) {
    const std::string n = device.substr(colon + 1);
    if (n.empty() || n.find_first_not_of("0123456789") != std::string::npos || n.size() > 4)
      throw std::invalid_argument("device '" + device + "': the index after ':' must be a number");
    index = std::stoi(n);
  }
  if (gpu_device_kind() != "none" && kind != gpu_device_kind())
    throw std::invalid_argument("device '" + device + "': this build's GPU backend is " + gpu_device_kind());
  return make_gpu_backend(index);
}

PyModel make_model(const py::dict& config, const py::list& tensors, int num_threads, const std::string& isa,
                   const std::string& device) {
  ModelConfig c = model_config_from(config);
  std::vector<py::buffer_info> infos;
  TensorMap map = tensor_map_from(tensors, infos);
  auto backend = make_backend(device, num_threads, isa);
  PyModel m;
  {
    py::gil_scoped_release release;
    m.model = std::make_shared<LlamaModel>(c, map, backend);
  }
  // The backend packed copies of everything (quant panels, float panels, norm vectors): the
  // caller's buffers, and the file mapping behind them, may go as soon as this returns.
  return m;
}

// One sequence with a private cache: for parity tests and tools, not for serving. Its pages are
// handed out in reverse so the page table is never the identity.
class Session {
 public:
  Session(PyModel m, int max_tokens, int page_size)
      : model_(m.model),
        checked_(max_tokens >= 1 && page_size >= 1 ? 0 : throw std::invalid_argument("Session: max_tokens and page_size must be >= 1")),
        cache_(model_->backend(), model_->config().num_layers, (max_tokens + page_size - 1) / page_size,
               page_size, model_->config().kv_dim()) {
    for (int p = cache_.num_pages() - 1; p >= 0; --p) pages_.push_back(p);
  }

  py::array_t<float> forward(const std::vector<int32_t>& tokens, bool all_logits) {
    if (tokens.empty()) throw std::invalid_argument("forward: no tokens");
    if (length_ + static_cast<int64_t>(tokens.size()) > cache_.capacity_tokens())
      throw std::invalid_argument("forward: the session's cache is full");
    ForwardBatch b;
    for (size_t i = 0; i < tokens.size(); ++i) {
      b.tokens.push_back(tokens[i]);
      b.positions.push_back(static_cast<int32_t>(length_ + i));
      b.page_tables.push_back(pages_.data());
      if (all_logits || i + 1 == tokens.size()) b.logit_rows.push_back(static_cast<int32_t>(i));
    }
    const int vocab = model_->config().vocab_size;
    py::array_t<float> out({static_cast<py::ssize_t>(b.logit_rows.size()), static_cast<py::ssize_t>(vocab)});
    float* dst = out.mutable_data();
    {
      py::gil_scoped_release release;
      model_->forward(b, cache_, dst);
    }
    length_ += static_cast<int64_t>(tokens.size());
    return out;
  }
  // A draft tree in one pass: `chain` (the last known token, then drafts) appended as forward()
  // would, and each leaf (depth d: an alternative to chain[d + 1]) at its depth with its K/V after
  // the chain's. Logits of every row: the chain's, then the leaves'. The leaves' K/V is then
  // dropped (the session's length grows by the chain only).
  py::array_t<float> forward_tree(const std::vector<int32_t>& chain, const std::vector<std::pair<int, int32_t>>& leaves) {
    const int64_t n = static_cast<int64_t>(chain.size()), L = static_cast<int64_t>(leaves.size());
    if (chain.empty()) throw std::invalid_argument("forward_tree: no tokens");
    if (length_ + n + L > cache_.capacity_tokens()) throw std::invalid_argument("forward_tree: the session's cache is full");
    ForwardBatch b;
    for (int64_t i = 0; i < n; ++i) {
      b.tokens.push_back(chain[static_cast<size_t>(i)]);
      b.positions.push_back(static_cast<int32_t>(length_ + i));
      b.kv_positions.push_back(static_cast<int32_t>(length_ + i));
    }
    for (int64_t l = 0; l < L; ++l) {
      const int depth = leaves[static_cast<size_t>(l)].first;
      if (depth < 0 || depth + 1 >= n) throw std::invalid_argument("forward_tree: a leaf's depth has no parent in the chain");
      b.tokens.push_back(leaves[static_cast<size_t>(l)].second);
      b.positions.push_back(static_cast<int32_t>(length_ + 1 + depth));
      b.kv_positions.push_back(static_cast<int32_t>(length_ + n + l));
    }
    for (size_t i = 0; i < b.tokens.size(); ++i) {
      b.page_tables.push_back(pages_.data());
      b.logit_rows.push_back(static_cast<int32_t>(i));
    }
    const int vocab = model_->config().vocab_size;
    py::array_t<float> out({static_cast<py::ssize_t>(b.logit_rows.size()), static_cast<py::ssize_t>(vocab)});
    float* dst = out.mutable_data();
    {
      py::gil_scoped_release release;
      model_->forward(b, cache_, dst);
    }
    length_ += n;
    return out;
  }
  void reset() { length_ = 0; }
  int64_t length() const { return length_; }

 private:
  std::shared_ptr<LlamaModel> model_;
  int checked_;  // arguments validated before the cache is sized from them
  KVCache cache_;
  std::vector<int32_t> pages_;
  int64_t length_ = 0;
};

SamplingParams sampling_fields(const py::dict& d);

// A value of the wrong type or range is the caller's mistake: ValueError, not RuntimeError.
SamplingParams sampling_from(const py::dict& d) {
  try {
    return sampling_fields(d);
  } catch (const py::cast_error& e) {
    throw std::invalid_argument(std::string("sampling parameter out of range or of the wrong type: ") + e.what());
  }
}

SamplingParams sampling_fields(const py::dict& d) {
  SamplingParams p;
  p.temperature = get_or<float>(d, "temperature", 1.f);
  p.top_p = get_or<float>(d, "top_p", 1.f);
  p.top_k = get_or<int>(d, "top_k", 0);
  p.min_p = get_or<float>(d, "min_p", 0.f);
  if (d.contains("seed") && !d["seed"].is_none()) {
    p.has_seed = true;
    p.seed = static_cast<uint64_t>(d["seed"].cast<int64_t>());
  }
  p.max_tokens = get_or<int>(d, "max_tokens", -1);
  p.min_tokens = get_or<int>(d, "min_tokens", 0);
  p.presence_penalty = get_or<float>(d, "presence_penalty", 0.f);
  p.frequency_penalty = get_or<float>(d, "frequency_penalty", 0.f);
  p.repetition_penalty = get_or<float>(d, "repetition_penalty", 1.f);
  if (d.contains("logit_bias") && !d["logit_bias"].is_none())
    for (const auto& kv : d["logit_bias"].cast<py::dict>())
      p.logit_bias.emplace_back(kv.first.cast<int32_t>(), kv.second.cast<float>());
  p.logprobs = get_or<int>(d, "logprobs", -1);
  p.prompt_logprobs = get_or<int>(d, "prompt_logprobs", -1);
  p.n = get_or<int>(d, "n", 1);
  p.stop_token_ids = get_or<std::vector<int32_t>>(d, "stop_token_ids", {});
  p.ignore_eos = get_or<bool>(d, "ignore_eos", false);
  p.pin_prompt = get_or<bool>(d, "pin_prompt", false);
  if (d.contains("grammar") && !d["grammar"].is_none())
    p.grammar = d["grammar"].cast<std::shared_ptr<CompiledGrammar>>();
  return p;
}

EngineConfig engine_config_from(const py::dict& d) {
  EngineConfig c;
  c.max_num_seqs = get_or<int>(d, "max_num_seqs", c.max_num_seqs);
  c.max_batch_tokens = get_or<int>(d, "max_batch_tokens", c.max_batch_tokens);
  c.page_size = get_or<int>(d, "page_size", c.page_size);
  c.kv_capacity_tokens = get_or<int>(d, "kv_capacity_tokens", c.kv_capacity_tokens);
  c.max_model_len = get_or<int>(d, "max_model_len", c.max_model_len);
  c.eos_token_ids = get_or<std::vector<int32_t>>(d, "eos_token_ids", {});
  c.notify_fd = get_or<int>(d, "notify_fd", -1);
  c.prompt_logit_rows = get_or<int>(d, "prompt_logit_rows", c.prompt_logit_rows);
  c.chunked_prefill = get_or<bool>(d, "chunked_prefill", c.chunked_prefill);
  c.tracing = get_or<bool>(d, "tracing", c.tracing);
  c.prefix_cache = get_or<bool>(d, "prefix_cache", c.prefix_cache);
  c.prefix_cache_max_recycling = get_or<int>(d, "prefix_cache_max_recycling", c.prefix_cache_max_recycling);
  const std::string mode = get_or<std::string>(d, "speculative_mode", "disable");
  if (mode == "disable") c.speculative_mode = SpeculativeMode::disable;
  else if (mode == "ngram") c.speculative_mode = SpeculativeMode::ngram;
  else if (mode == "small_draft") c.speculative_mode = SpeculativeMode::small_draft;
  else if (mode == "eagle") c.speculative_mode = SpeculativeMode::eagle;
  else if (mode == "medusa") c.speculative_mode = SpeculativeMode::medusa;
  else throw std::invalid_argument("speculative_mode '" + mode + "' is not supported (supported: disable, ngram, small_draft, eagle, medusa)");
  if (d.contains("eagle") && !d["eagle"].is_none()) c.eagle = d["eagle"].cast<std::shared_ptr<EagleInput>>();
  c.draft_vocab = get_or<std::vector<int32_t>>(d, "draft_vocab", {});
  if (d.contains("draft_model") && !d["draft_model"].is_none()) c.draft_model = d["draft_model"].cast<PyModel>().model;
  if (d.contains("medusa") && !d["medusa"].is_none()) c.medusa = d["medusa"].cast<std::shared_ptr<MedusaHeads>>();
  c.spec_draft_length = get_or<int>(d, "spec_draft_length", c.spec_draft_length);
  c.spec_tree_width = get_or<int>(d, "spec_tree_width", c.spec_tree_width);
  if (c.spec_tree_width < 1 || c.spec_tree_width > 16) throw std::invalid_argument("spec_tree_width must be in [1, 16]");
  c.spec_token_cost = get_or<double>(d, "spec_token_cost", c.spec_token_cost);
  c.spec_draft_cost = get_or<double>(d, "spec_draft_cost", c.spec_draft_cost);
  if (c.spec_draft_length < 0) throw std::invalid_argument("spec_draft_length must be >= 0 (0: automatic)");
  c.ngram.min_n = get_or<int>(d, "ngram_min", c.ngram.min_n);
  c.ngram.max_n = get_or<int>(d, "ngram_max", c.ngram.max_n);
  if (c.ngram.min_n < 1 || c.ngram.max_n < c.ngram.min_n)
    throw std::invalid_argument("n-gram lengths must satisfy 1 <= ngram_min <= ngram_max");
  return c;
}

// An Engine's destructor joins its thread: never with the GIL held (a step may take a while, and
// nothing the engine thread does needs Python, but the event loop should not stall on it).
struct GilFreeDelete {
  void operator()(Engine* e) const {
    if (PyGILState_Check()) {
      py::gil_scoped_release release;
      std::default_delete<Engine>()(e);
    } else {
      std::default_delete<Engine>()(e);
    }
  }
};
using EnginePtr = std::unique_ptr<Engine, GilFreeDelete>;

EnginePtr make_engine(PyModel m, const py::dict& d) {
  EngineConfig c = engine_config_from(d);
  py::gil_scoped_release release;
  return EnginePtr(new Engine(m.model, c));
}

std::unique_ptr<EngineCore> make_engine_core(PyModel m, const py::dict& d) {
  EngineConfig c = engine_config_from(d);
  c.notify_fd = -1;
  py::gil_scoped_release release;
  return std::make_unique<EngineCore>(m.model, c);
}

py::list lp_list(const std::vector<TokenLogprob>& v) {
  py::list l;
  for (const TokenLogprob& t : v) l.append(py::make_tuple(t.token, t.logprob, py::cast(t.top)));
  return l;
}

// (request_id, index, new_token_ids, finished, finish_reason, num_prompt_tokens, logprobs,
//  prompt_logprobs, error, num_cached_tokens)
py::list outputs_list(std::vector<EngineOutput> outputs) {
  py::list out;
  for (EngineOutput& o : outputs)
    out.append(py::make_tuple(
        o.id, o.index, py::cast(o.tokens), o.finished,
        o.finished ? py::object(py::str(o.finish_reason)) : py::object(py::none()), o.num_prompt_tokens,
        o.logprobs.empty() ? py::object(py::none()) : py::object(lp_list(o.logprobs)),
        o.has_prompt_logprobs ? py::object(lp_list(o.prompt_logprobs)) : py::object(py::none()),
        o.error.empty() ? py::object(py::none()) : py::object(py::str(o.error)), o.num_cached_tokens));
  return out;
}

const char* kOutputsDoc =
    "[(request_id, index, new_token_ids, finished, finish_reason, num_prompt_tokens, logprobs, "
    "prompt_logprobs, error, num_cached_tokens)]; logprobs entries are (token, logprob, [(token, logprob), ...]); "
    "finish_reason is stop | length | abort | error, and error says what went wrong";

py::dict stats_dict(const EngineStats& s) {
  py::dict d;
  d["num_running"] = s.num_running;
  d["num_waiting"] = s.num_waiting;
  d["kv_pages_used"] = s.kv_pages_used;
  d["kv_pages_total"] = s.kv_pages_total;
  d["kv_pages_cached"] = s.kv_pages_cached;
  d["kv_pages_free"] = s.kv_pages_free;
  d["prefix_cache_nodes"] = s.prefix_cache_nodes;
  d["page_size"] = s.page_size;
  d["kv_capacity_tokens"] = s.kv_capacity_tokens;
  d["steps"] = s.steps;
  d["prompt_tokens_computed"] = s.prompt_tokens_computed;
  d["tokens_generated"] = s.tokens_generated;
  d["preemptions"] = s.preemptions;
  d["requests_failed"] = s.requests_failed;
  d["step_failures"] = s.step_failures;
  d["live_choices"] = s.live_choices;
  d["step_index"] = s.step_index;
  d["spec_verifies"] = s.spec_verifies;
  d["spec_draft_tokens"] = s.spec_draft_tokens;
  d["spec_accepted_leaves"] = s.spec_accepted_leaves;
  d["spec_accepted_tokens"] = s.spec_accepted_tokens;
  d["grammar_masks"] = s.grammar_masks;
  d["grammar_mask_seconds"] = s.grammar_mask_seconds;
  d["spec_accepted_by_position"] = s.spec_accepted_by_position;
  return d;
}

// --- kernel entry points for tests and benchmarks ------------------------------------------

using FArray = py::array_t<float, py::array::c_style | py::array::forcecast>;

py::array_t<float> kernel_gemm(FArray w, FArray x, std::optional<FArray> bias, std::optional<FArray> y0,
                               const std::string& isa, int threads) {
  if (w.ndim() != 2 || x.ndim() != 2 || w.shape(1) != x.shape(1))
    throw std::invalid_argument("gemm: need w [n, k] and x [m, k]");
  const int64_t n = w.shape(0), k = w.shape(1), m = x.shape(0);
  cpu::CpuBackend be(threads, cpu::select_kernels(isa));
  TensorView tv;
  tv.name = "w";
  tv.data = w.data();
  tv.shape = {n, k};
  auto packed = be.pack({&tv});
  py::array_t<float> y({m, n});
  if (y0) {
    if (y0->ndim() != 2 || y0->shape(0) != m || y0->shape(1) != n) throw std::invalid_argument("gemm: y must be [m, n]");
    std::memcpy(y.mutable_data(), y0->data(), sizeof(float) * m * n);
  }
  if (bias && bias->size() != n) throw std::invalid_argument("gemm: bias must have n elements");
  be.matmul(*packed, x.data(), k, static_cast<int>(m), y.mutable_data(), n, bias ? bias->data() : nullptr,
            y0.has_value());
  return y;
}

py::array_t<float> kernel_attention(FArray q, FArray k_cache, FArray v_cache, int page_size,
                                    std::vector<py::array_t<int32_t, py::array::c_style | py::array::forcecast>> tables,
                                    std::vector<int32_t> positions, int window, int sink, const std::string& isa, int threads) {
  // q: [T, H, D]; k_cache/v_cache: [slots, KVH, D]
  if (q.ndim() != 3 || k_cache.ndim() != 3 || v_cache.ndim() != 3) throw std::invalid_argument("attention: bad ranks");
  const int T = static_cast<int>(q.shape(0)), H = static_cast<int>(q.shape(1)), D = static_cast<int>(q.shape(2));
  const int KVH = static_cast<int>(k_cache.shape(1));
  if (static_cast<int>(tables.size()) != T || static_cast<int>(positions.size()) != T)
    throw std::invalid_argument("attention: one page table and position per token");
  // Tokens given the same table array are one sequence (a prefill block), one row of the padded
  // table.
  int64_t max_pages = 1;
  for (auto& t : tables) max_pages = std::max<int64_t>(max_pages, t.size());
  std::vector<const int32_t*> rows;
  std::vector<int32_t> table, token_seq(static_cast<size_t>(T));
  for (int i = 0; i < T; ++i) {
    auto it = std::find(rows.begin(), rows.end(), tables[i].data());
    token_seq[i] = static_cast<int32_t>(it - rows.begin());
    if (it != rows.end()) continue;
    rows.push_back(tables[i].data());
    table.resize(rows.size() * max_pages, -1);
    std::copy(tables[i].data(), tables[i].data() + tables[i].size(), table.end() - max_pages);
  }
  cpu::CpuBackend be(threads, cpu::select_kernels(isa));
  // Lay the caller's [slots, KVH, D] rows out the way the backend keeps its cache.
  const int64_t slots = k_cache.shape(0);
  if (slots % page_size != 0) throw std::invalid_argument("attention: slots must be whole pages");
  auto k_buf = be.allocate(static_cast<size_t>(slots) * KVH * D);
  auto v_buf = be.allocate(static_cast<size_t>(slots) * KVH * D);
  std::vector<int64_t> slot_ids(static_cast<size_t>(slots));
  std::iota(slot_ids.begin(), slot_ids.end(), 0);
  be.write_kv(k_cache.data(), v_cache.data(), static_cast<int64_t>(KVH) * D, static_cast<int>(slots), KVH, D,
              page_size, slot_ids.data(), k_buf->data(), v_buf->data());
  py::array_t<float> out({T, H, D});
  AttentionBatch b;
  b.q = q.data();
  b.q_stride = static_cast<int64_t>(H) * D;
  b.n_tokens = T;
  b.n_heads = H;
  b.n_kv_heads = KVH;
  b.head_dim = D;
  b.scale = 1.f / std::sqrt(static_cast<float>(D));
  b.k_cache = k_buf->data();
  b.v_cache = v_buf->data();
  b.page_size = page_size;
  b.page_table = table.data();
  b.n_seqs = static_cast<int>(rows.size());
  b.max_pages = static_cast<int>(max_pages);
  b.token_seq = token_seq.data();
  b.positions = positions.data();
  b.window = window;
  b.sink = sink;
  b.out = out.mutable_data();
  b.out_stride = static_cast<int64_t>(H) * D;
  be.attention(b);
  return out;
}

// x · Wᵀ (+ bias) (+ y) for W: [n, k] in `format` (raw block bytes), through CpuBackend::pack and
// matmul: the native quantized kernels where the format has them, the dequantized fallback else.
py::array_t<float> kernel_qgemm(const std::string& format, py::buffer w, int64_t n, int64_t k, FArray x,
                                std::optional<FArray> bias, std::optional<FArray> y0, const std::string& isa,
                                int threads) {
  TensorView tv;
  tv.name = "w";
  tv.dtype = parse_dtype(format);
  tv.shape = {n, k};
  py::buffer_info info = w.request();
  if (k % dtype_info(tv.dtype).block_elems != 0) throw std::invalid_argument("qgemm: k must be whole blocks");
  if (info.size * info.itemsize != tv.bytes()) throw std::invalid_argument("qgemm: w holds the wrong number of bytes");
  tv.data = info.ptr;
  if (x.ndim() != 2 || x.shape(1) != k) throw std::invalid_argument("qgemm: x must be [m, k]");
  const int64_t m = x.shape(0);
  cpu::CpuBackend be(threads, cpu::select_kernels(isa));
  auto packed = be.pack({&tv});
  py::array_t<float> y({m, n});
  if (y0) {
    if (y0->ndim() != 2 || y0->shape(0) != m || y0->shape(1) != n) throw std::invalid_argument("qgemm: y must be [m, n]");
    std::memcpy(y.mutable_data(), y0->data(), sizeof(float) * m * n);
  }
  if (bias && bias->size() != n) throw std::invalid_argument("qgemm: bias must have n elements");
  be.matmul(*packed, x.data(), k, static_cast<int>(m), y.mutable_data(), n, bias ? bias->data() : nullptr,
            y0.has_value());
  return y;
}

// Rows `ids` of W (the embedding lookup), dequantized by the backend.
py::array_t<float> kernel_qgather(const std::string& format, py::buffer w, int64_t n, int64_t k,
                                  std::vector<int32_t> ids, const std::string& isa) {
  TensorView tv;
  tv.name = "w";
  tv.dtype = parse_dtype(format);
  tv.shape = {n, k};
  py::buffer_info info = w.request();
  if (info.size * info.itemsize != tv.bytes()) throw std::invalid_argument("qgather: w holds the wrong number of bytes");
  tv.data = info.ptr;
  cpu::CpuBackend be(1, cpu::select_kernels(isa));
  auto packed = be.pack({&tv});
  py::array_t<float> out({static_cast<int64_t>(ids.size()), k});
  be.gather_rows(*packed, ids.data(), static_cast<int>(ids.size()), out.mutable_data());
  return out;
}

py::array_t<float> kernel_dequantize(const std::string& format, py::buffer data, int64_t n) {
  const DType t = parse_dtype(format);
  py::buffer_info info = data.request();
  if (info.size * info.itemsize < dtype_bytes(t, n))
    throw std::invalid_argument("dequantize: the buffer is smaller than " + std::to_string(n) + " elements");
  py::array_t<float> out(n);
  dequantize(t, info.ptr, n, out.mutable_data());
  return out;
}

// Seconds per matmul of x: [m, k] by a random packed W: [n, k] (packing excluded), best of
// repeats. With cold = true the calls rotate through enough copies of W (>= 256 MiB) that each
// reads its weights from memory, not from cache, as a decode step does.
double bench_gemm(int n, int k, int m, const std::string& isa, int threads, int repeats, bool cold,
                  const std::string& format) {
  cpu::CpuBackend be(threads, cpu::select_kernels(isa));
  std::mt19937 rng(0);
  std::normal_distribution<float> dist;
  const DType dtype = parse_dtype(format);
  if (k % dtype_info(dtype).block_elems != 0) throw std::invalid_argument("bench_gemm: k must be whole blocks");
  std::vector<float> x(static_cast<size_t>(m) * k), y(static_cast<size_t>(m) * n);
  for (float& v : x) v = dist(rng);
  // The weights: random floats, or random blocks whose f16 scales are all 1/128 (no NaN or
  // denormal slow paths; the values do not matter to the speed).
  std::vector<uint8_t> w(static_cast<size_t>(dtype_bytes(dtype, static_cast<int64_t>(n) * k)));
  if (dtype == DType::F32) {
    float* f = reinterpret_cast<float*>(w.data());
    for (size_t i = 0; i < w.size() / 4; ++i) f[i] = dist(rng);
  } else {
    for (uint8_t& b : w) b = static_cast<uint8_t>(rng());
    // Every f16 field (d, m, dmin) of every block set to 1/128: no NaN or denormal slow paths.
    std::vector<int> f16_offsets;
    switch (dtype) {
      case DType::Q4_1: case DType::Q5_1: case DType::Q4_K: case DType::Q5_K: f16_offsets = {0, 2}; break;
      case DType::Q2_K: f16_offsets = {80, 82}; break;
      case DType::Q3_K: f16_offsets = {108}; break;
      case DType::Q6_K: f16_offsets = {208}; break;
      case DType::F16: case DType::BF16: break;
      default: f16_offsets = {0}; break;
    }
    const int bb = dtype_info(dtype).block_bytes;
    for (size_t off = 0; off < w.size(); off += bb)
      for (int f : f16_offsets) {
        const uint16_t h = 0x2000;
        std::memcpy(w.data() + off + f, &h, 2);
      }
    if (dtype == DType::F16 || dtype == DType::BF16) {
      auto* h = reinterpret_cast<uint16_t*>(w.data());
      for (size_t i = 0; i < w.size() / 2; ++i) h[i] = static_cast<uint16_t>(dtype == DType::F16 ? 0x2000 + (rng() & 0xFF) : 0x3c00 + (rng() & 0xFF));
    }
  }
  TensorView tv;
  tv.name = "w";
  tv.dtype = dtype;
  tv.data = w.data();
  tv.shape = {n, k};
  const size_t bytes = w.size();
  const size_t copies = cold ? std::max<size_t>(1, (size_t{256} << 20) / bytes + 1) : 1;
  std::vector<std::vector<uint8_t>> storage(copies - 1, w);  // quantized matrices read in place
  std::vector<std::unique_ptr<Matrix>> packed;
  packed.push_back(be.pack({&tv}));
  for (auto& copy : storage) {
    TensorView c = tv;
    c.data = copy.data();
    packed.push_back(be.pack({&c}));
  }
  storage.clear();  // packing copied them (quant panels and float panels alike)
  py::gil_scoped_release release;
  double best = 1e30;
  for (int r = 0; r < repeats; ++r) {
    double total = 0;
    for (size_t c = 0; c < copies; ++c) {
      const auto t0 = std::chrono::steady_clock::now();
      be.matmul(*packed[c], x.data(), k, m, y.data(), n, nullptr, false);
      total += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    }
    best = std::min(best, total / copies);
  }
  return best;
}

// Streaming read bandwidth over `nbytes` with `threads` threads, best of `repeats` passes (GB/s),
// read with the widest vector loads this CPU has: the ceiling decode speed is measured against.
double read_bandwidth_gbps(int64_t nbytes, int threads, int repeats) {
  const int64_t n = nbytes / 4;
  const cpu::KernelTable& kernels = cpu::select_kernels("auto");
  cpu::AlignedFloats buf = cpu::allocate_floats(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(i & 1023);
  cpu::ThreadPool pool(threads);
  std::vector<float> sink(threads, 0.f);
  double best = 0;
  py::gil_scoped_release release;
  for (int r = 0; r < repeats; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    // One contiguous half per thread, like the GEMV's split of weight groups.
    pool.parallel_for(threads, [&](int64_t b, int64_t e, int) {
      for (int64_t t = b; t < e; ++t) {
        const int64_t lo = n * t / threads, hi = n * (t + 1) / threads;
        sink[t] += kernels.stream_sum(buf.get() + lo, hi - lo);
      }
    });
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, static_cast<double>(n * 4) / s / 1e9);
  }
  volatile float keep = std::accumulate(sink.begin(), sink.end(), 0.f);
  (void)keep;
  return best;
}

// Scheduler + BlockPool without a model, for unit tests of the scheduling policy.
class SchedulerHarness {
 public:
  // prefix_cache: a PrefixCache keeping max_recycling finished sequences (-1: any number).
  SchedulerHarness(int num_pages, int page_size, int max_num_seqs, int max_batch_tokens, bool prefix_cache,
                   int max_recycling, bool chunked_prefill, int window, int sink)
      : pool_(num_pages),
        cache_(prefix_cache ? std::make_unique<PrefixCache>(pool_, page_size, max_recycling) : nullptr),
        scheduler_({max_num_seqs, max_batch_tokens, page_size, chunked_prefill, window, sink}, pool_, cache_.get()) {}
  // A prompt of distinct tokens (no prefix in common with any other sequence).
  void add(int64_t id, int num_prompt_tokens) {
    std::vector<int32_t> tokens(static_cast<size_t>(num_prompt_tokens));
    for (int i = 0; i < num_prompt_tokens; ++i) tokens[i] = static_cast<int32_t>(id * 100000 + i);
    add_tokens(id, std::move(tokens));
  }
  void add_tokens(int64_t id, std::vector<int32_t> tokens) {
    auto e = std::make_unique<Entry>();
    e->tokens = std::move(tokens);
    e->seq.id = id;
    e->seq.num_tokens = static_cast<int>(e->tokens.size());
    e->seq.tokens = &e->tokens;
    scheduler_.add(&e->seq);
    seqs_[id] = std::move(e);
  }
  void remove(int64_t id) {
    scheduler_.remove(&seqs_.at(id)->seq);
    seqs_.erase(id);
  }
  // Runs one step: returns [(id, start, count, sample)] and applies it as the engine would
  // (computed tokens advance and enter the cache; a sampled chunk appends a token: 7 + the
  // sequence's length, the same for every sequence, so equal prompts stay equal).
  std::vector<std::tuple<int64_t, int, int, bool>> step() {
    std::vector<std::tuple<int64_t, int, int, bool>> out;
    const std::vector<ScheduledChunk> plan = scheduler_.schedule();
    for (const PageCopy& c : scheduler_.pending_copies()) copies_.emplace_back(c.seq->id, c.source.page, c.dst);
    scheduler_.copies_done();
    for (const ScheduledChunk& c : plan) {
      out.emplace_back(c.seq->id, c.start, c.count, c.sample);
      c.seq->num_computed += c.count;
      scheduler_.computed(c.seq);
      if (c.sample) {
        Entry& e = *seqs_.at(c.seq->id);
        e.tokens.push_back(7 + c.seq->num_tokens);
        c.seq->num_tokens += 1;
      }
    }
    return out;
  }
  std::vector<int64_t> rejected() {
    std::vector<int64_t> ids;
    for (Sequence* s : scheduler_.take_rejected()) ids.push_back(s->id);
    return ids;
  }
  std::vector<int64_t> running() const {
    std::vector<int64_t> ids;
    for (Sequence* s : scheduler_.running()) ids.push_back(s->id);
    return ids;
  }
  std::vector<int64_t> waiting() const {
    std::vector<int64_t> ids;
    for (Sequence* s : scheduler_.waiting()) ids.push_back(s->id);
    return ids;
  }
  std::vector<int32_t> pages(int64_t id) const { return seqs_.at(id)->seq.pages; }
  std::vector<int32_t> tokens(int64_t id) const { return seqs_.at(id)->tokens; }
  int num_tokens(int64_t id) const { return seqs_.at(id)->seq.num_tokens; }
  int num_computed(int64_t id) const { return seqs_.at(id)->seq.num_computed; }
  int num_cached_tokens(int64_t id) const { return seqs_.at(id)->seq.num_cached_tokens; }
  int free_pages() const { return pool_.num_free(); }
  int cached_pages() const { return cache_ ? static_cast<int>(cache_->cached_pages()) : 0; }
  int used_pages() const { return pool_.num_used() - cached_pages(); }
  int total_pages() const { return pool_.num_pages(); }
  int refcount(int32_t page) const { return pool_.refcount(page); }
  int64_t tree_pages() const { return cache_ ? cache_->tree().num_pages() : 0; }
  int64_t preemptions() const { return scheduler_.num_preemptions(); }
  // The page copies the steps so far asked for: [(id, src, dst)].
  std::vector<std::tuple<int64_t, int32_t, int32_t>> take_copies() {
    auto out = std::move(copies_);
    copies_.clear();
    return out;
  }

 private:
  std::vector<std::tuple<int64_t, int32_t, int32_t>> copies_;
  struct Entry {
    std::vector<int32_t> tokens;
    Sequence seq;
  };
  BlockPool pool_;
  std::unique_ptr<PrefixCache> cache_;
  Scheduler scheduler_;
  std::map<int64_t, std::unique_ptr<Entry>> seqs_;
};

}  // namespace

#ifdef PYSERVE_GPU
namespace pyserve::gpu {
void bind_gpu(py::module_& parent);  // backend/cuda/probe.cu: the pyserve._C.gpu submodule
}  // namespace pyserve::gpu
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyserve's C++ engine: model, paged KV cache, scheduler, CPU kernels";

  m.def("devices", [] {
          std::vector<std::string> d{"cpu"};
          // A GPU build on a machine with a device serves it too, under its vendor's name.
          if (gpu_device_count() > 0) d.push_back(gpu_device_kind());
          return d;
        },
        "The devices this build can serve here: cpu, plus cuda or rocm where the build has the GPU backend and "
        "the machine a device.");
#ifdef PYSERVE_GPU
  pyserve::gpu::bind_gpu(m);
#endif

  m.def("cpu_features", [] {
    const auto& f = cpu::cpu_features();
    py::dict d;
    d["avx2"] = f.avx2;
    d["avx512"] = f.avx512;
    d["avx512_vnni"] = f.avx512_vnni;
    d["avx512_bf16"] = f.avx512_bf16;
    d["amx"] = f.amx;
    d["best_isa"] = f.best_isa();
    return d;
  });

  py::class_<PyModel>(m, "Model")
      .def(py::init(&make_model), py::arg("config"), py::arg("tensors"), py::arg("num_threads") = 0,
           py::arg("isa") = "auto", py::arg("device") = "cpu",
           "config: dict of ModelConfig fields; tensors: [(name, format, buffer, shape)]")
      .def_property_readonly("backend", [](const PyModel& p) { return p.model->backend().name(); })
      .def_property_readonly("num_threads", [](const PyModel& p) { return p.model->backend().num_threads(); })
      .def_property_readonly("weight_bytes", [](const PyModel& p) { return p.model->weight_bytes(); })
      .def_property_readonly("config", [](const PyModel& p) { return model_config_to_dict(p.model->config()); });

  py::class_<EagleInput, std::shared_ptr<EagleInput>>(m, "EagleInput")
      .def(py::init([](const PyModel& target, const PyModel& draft, const py::list& tensors) {
             std::vector<py::buffer_info> infos;
             TensorMap map = tensor_map_from(tensors, infos);
             const int64_t H = draft.model->config().hidden_size;
             if (!draft.model->backend().host_memory() || !target.model->backend().host_memory())
               throw std::invalid_argument("EAGLE drafts run on the CPU backend only (for now)");
             auto e = std::make_shared<EagleInput>();
             e->target = target.model;
             py::gil_scoped_release unlocked;
             e->fc = draft.model->backend().pack({&map.get("fc.weight", {H, 2 * H})});
             e->fc_bias = map.get("fc.bias", {H}).to_f32();
             return e;
           }),
           py::arg("target"), py::arg("draft"), py::arg("tensors"),
           "an EAGLE draft's input: fc.weight [H, 2H] and fc.bias [H] (packed on the draft's backend) over the "
           "target's features and embeddings");

  py::class_<MedusaHeads, std::shared_ptr<MedusaHeads>>(m, "MedusaHeads")
      .def(py::init([](const PyModel& target, const py::list& tensors, int num_heads, std::vector<int32_t> draft_vocab) {
             std::vector<py::buffer_info> infos;
             TensorMap map = tensor_map_from(tensors, infos);
             if (!target.model->backend().host_memory())
               throw std::invalid_argument("Medusa heads run on the CPU backend only (for now)");
             py::gil_scoped_release unlocked;
             return std::make_shared<MedusaHeads>(target.model, map, num_heads, std::move(draft_vocab));
           }),
           py::arg("target"), py::arg("tensors"), py::arg("num_heads"), py::arg("draft_vocab") = std::vector<int32_t>{},
           "tensors: [(name, format, buffer, shape)]: medusa.K.weight / .bias, and lm_head with a draft vocabulary")
      .def_property_readonly("num_heads", &MedusaHeads::num_heads)
      .def_property_readonly("draft_vocab_size", &MedusaHeads::draft_vocab_size)
      .def("propose",
           [](MedusaHeads& h, py::array_t<float, py::array::c_style | py::array::forcecast> hidden, int k) {
             if (hidden.ndim() != 2 || hidden.shape(1) != h.target().config().hidden_size)
               throw std::invalid_argument("hidden: expected [n, " + std::to_string(h.target().config().hidden_size) + "]");
             const int n = static_cast<int>(hidden.shape(0));
             std::vector<std::vector<int32_t>> drafts(static_cast<size_t>(n));
             std::vector<std::vector<int32_t>*> out;
             for (auto& d : drafts) out.push_back(&d);
             {
               py::gil_scoped_release unlocked;
               auto lock = h.target().lock();
               h.propose(hidden.data(), n, k, out.data());
             }
             return drafts;
           },
           py::arg("hidden"), py::arg("k"), "hidden: [n, hidden_size] -> each row's first k drafts (tools and tests)");

  py::class_<Session>(m, "Session")
      .def(py::init<PyModel, int, int>(), py::arg("model"), py::arg("max_tokens"), py::arg("page_size") = 16)
      .def("forward", &Session::forward, py::arg("tokens"), py::arg("all_logits") = true,
           "Appends tokens to the sequence; returns logits [len(tokens) or 1, vocab].")
      .def("forward_tree", &Session::forward_tree, py::arg("chain"), py::arg("leaves"),
           "chain (last known token + drafts) and leaves [(depth, token)] in one pass; logits of every row")
      .def("reset", &Session::reset)
      .def_property_readonly("length", &Session::length);

  // Structured output (engine/grammar.h): llguidance through its C API, loaded at run time.
  py::class_<GrammarVocabulary, std::shared_ptr<GrammarVocabulary>>(m, "GrammarVocabulary")
      .def(py::init([](const std::string& library, const std::vector<py::bytes>& tokens, int32_t eos,
                       std::vector<int32_t> also_eos) {
             std::vector<std::string> raw(tokens.begin(), tokens.end());
             py::gil_scoped_release unlocked;
             return std::make_shared<GrammarVocabulary>(library, raw, eos, std::move(also_eos));
           }),
           py::arg("library"), py::arg("tokens"), py::arg("eos"), py::arg("also_eos") = std::vector<int32_t>{},
           "library: llguidance's extension module; tokens: each id's bytes (special ones after a 0xFF byte)")
      .def_property_readonly("vocab_size", &GrammarVocabulary::vocab_size)
      .def("compile",
           [](const std::shared_ptr<GrammarVocabulary>& v, const std::string& kind, const std::string& data) {
             py::gil_scoped_release unlocked;
             return std::make_shared<CompiledGrammar>(v, kind, data);
           },
           py::arg("kind"), py::arg("data"),
           "kind: json_schema | regex | lark | llguidance. ValueError with the reason when it does not compile.");
  py::class_<CompiledGrammar, std::shared_ptr<CompiledGrammar>>(m, "Grammar")
      .def("matcher", [](const CompiledGrammar& g) { return std::shared_ptr<GrammarMatcher>(g.start()); },
           "A matcher at the start (what the engine walks per choice; here for tests).");
  py::class_<GrammarMatcher, std::shared_ptr<GrammarMatcher>>(m, "GrammarMatcher")
      .def("mask", [](GrammarMatcher& g) {
             py::array_t<uint32_t> out(g.vocabulary().mask_words());
             g.fill_mask(out.mutable_data());
             return out;
           }, "uint32 words, bit t % 32 of word t / 32 set when token t may come next")
      .def("consume", &GrammarMatcher::consume, py::arg("token"))
      .def("valid_prefix", [](GrammarMatcher& g, const std::vector<int32_t>& t) {
             return g.valid_prefix(t.data(), static_cast<int>(t.size()));
           })
      .def_property_readonly("accepting", &GrammarMatcher::accepting)
      .def_property_readonly("stopped", &GrammarMatcher::stopped)
      .def_property_readonly("error", &GrammarMatcher::error);

  py::class_<Engine, EnginePtr>(m, "Engine")
      .def(py::init(&make_engine), py::arg("model"), py::arg("config"))
      .def("add_request",
           [](Engine& e, int64_t id, std::vector<int32_t> prompt, const py::dict& params) {
             e.add_request(id, std::move(prompt), sampling_from(params));
           },
           py::arg("request_id"), py::arg("prompt"), py::arg("params"))
      .def("abort", &Engine::abort, py::arg("request_id"), py::arg("index") = -1,
           "Aborts every choice of the request, or only choice `index`.")
      .def("fetch", [](Engine& e) { return outputs_list(e.fetch()); }, kOutputsDoc)
      .def("stats", [](const Engine& e) { return stats_dict(e.stats()); })
      .def_property_readonly("failure", &Engine::failure,
                             "None while the engine works; why it stopped, once it has failed")
      .def("inject_fault",
           [](Engine& e, const std::string& phase, int64_t at_step, int64_t request, bool alloc, int times) {
             e.inject_fault(parse_phase(phase), at_step, request, alloc, times);
           },
           py::arg("phase"), py::arg("at_step") = 0, py::arg("request_id") = -1, py::arg("alloc") = false,
           py::arg("times") = 1, "Test-only: make a phase throw (see FaultSwitch).")
      .def("reset", &Engine::reset,
           "Ends every request (abort) and empties the prefix cache, pinned prompts too (MLC's reset_engine).")
      .def("trace", [](const Engine& e) {
        py::list out;
        for (const TraceEvent& t : e.trace()) {
          py::dict args;
          for (const auto& [k, v] : t.args) args[py::str(k)] = v;
          if (!t.note.empty()) args["reason"] = t.note;
          out.append(py::make_tuple(t.name, std::string(1, t.ph), t.ts_us, t.dur_us, t.tid, args));
        }
        return out;
      }, "With tracing on: [(name, ph, ts_us, dur_us, tid, args)], oldest first (tid 0: engine steps; else a request id)")
      .def("shutdown", &Engine::shutdown, py::call_guard<py::gil_scoped_release>());

  // The synchronous core, for tests that step the engine one step at a time.
  py::class_<EngineCore>(m, "EngineCore")
      .def(py::init(&make_engine_core), py::arg("model"), py::arg("config"))
      .def("add_request",
           [](EngineCore& e, int64_t id, std::vector<int32_t> prompt, const py::dict& params) {
             e.add_request(id, std::move(prompt), sampling_from(params));
           },
           py::arg("request_id"), py::arg("prompt"), py::arg("params"))
      .def("abort", &EngineCore::abort, py::arg("request_id"), py::arg("index") = -1)
      .def("step", &EngineCore::step, py::call_guard<py::gil_scoped_release>(),
           "Runs one step; False when nothing could run.")
      .def("take_outputs", [](EngineCore& e) { return outputs_list(e.take_outputs()); }, kOutputsDoc)
      .def("end_all", [](EngineCore& e, const std::string& reason, const std::string& message) {
             if (reason != "abort" && reason != "error") throw std::invalid_argument("reason: abort or error");
             e.end_all(reason == "abort" ? "abort" : "error", message);
           }, py::arg("reason") = "abort", py::arg("message") = "")
      .def("reset_cache", &EngineCore::reset_cache, "Empties the prefix cache (no request may be live).")
      .def_property_readonly("idle", &EngineCore::idle)
      .def_property_readonly("step_index", &EngineCore::step_index)
      .def("stats", [](const EngineCore& e) { return stats_dict(e.stats()); })
      .def("inject_fault",
           [](EngineCore& e, const std::string& phase, int64_t at_step, int64_t request, bool alloc, int times) {
             e.faults().arm(parse_phase(phase), at_step, request, alloc, times);
           },
           py::arg("phase"), py::arg("at_step") = 0, py::arg("request_id") = -1, py::arg("alloc") = false,
           py::arg("times") = 1, "Test-only: make a phase throw (see FaultSwitch).");

  py::module_ k = m.def_submodule("kernels", "CPU kernels, exposed for tests and benchmarks");
  k.def("gemm", &kernel_gemm, py::arg("w"), py::arg("x"), py::arg("bias") = py::none(),
        py::arg("y") = py::none(), py::arg("isa") = "auto", py::arg("threads") = 1,
        "x · wᵀ (+ bias) (+ y) through the packed layout and the chosen ISA's kernel");
  k.def("attention", &kernel_attention, py::arg("q"), py::arg("k_cache"), py::arg("v_cache"),
        py::arg("page_size"), py::arg("page_tables"), py::arg("positions"), py::arg("window") = 0,
        py::arg("sink") = 0, py::arg("isa") = "auto", py::arg("threads") = 1);
  k.def("qgemm", &kernel_qgemm, py::arg("format"), py::arg("w"), py::arg("n"), py::arg("k"), py::arg("x"),
        py::arg("bias") = py::none(), py::arg("y") = py::none(), py::arg("isa") = "auto", py::arg("threads") = 1,
        "x · wᵀ (+ bias) (+ y) with w: [n, k] as raw `format` blocks");
  k.def("qgather", &kernel_qgather, py::arg("format"), py::arg("w"), py::arg("n"), py::arg("k"), py::arg("ids"),
        py::arg("isa") = "auto");
  k.def("is_native_format", [](const std::string& f) { cpu::PanelFormat q; return cpu::panel_format(parse_dtype(f), &q); },
        "whether `format` runs natively as quant panels (float formats take the float panels)");
  k.def("silu_mul", [](FArray gate_up, const std::string& isa, int threads) {
    if (gate_up.ndim() != 2 || gate_up.shape(1) % 2 != 0) throw std::invalid_argument("silu_mul: need gate_up [m, 2 inter]");
    const int m = static_cast<int>(gate_up.shape(0)), inter = static_cast<int>(gate_up.shape(1) / 2);
    cpu::CpuBackend be(threads, cpu::select_kernels(isa));
    py::array_t<float> out({m, inter});
    be.silu_mul(gate_up.data(), m, inter, out.mutable_data());
    return out;
  }, py::arg("gate_up"), py::arg("isa") = "auto", py::arg("threads") = 1,
     "out: [m, inter] = silu(gate_up[:, :inter]) * gate_up[:, inter:], through CpuBackend::silu_mul.");
  k.def("packed_bytes", [](const std::string& f, int64_t n, int64_t k) -> int64_t {
    // What the backend really builds for W (zeros: the layout does not depend on the values).
    TensorView tv;
    tv.name = "w";
    tv.dtype = parse_dtype(f);
    tv.shape = {n, k};
    std::vector<uint8_t> zeros(static_cast<size_t>(tv.bytes()));
    tv.data = zeros.data();
    cpu::CpuBackend be(1, cpu::select_kernels("scalar"));
    return static_cast<int64_t>(be.pack({&tv})->bytes());
  }, py::arg("format"), py::arg("n"), py::arg("k"), "Bytes the backend reads for one pass over W: [n, k] of `format`.");
  k.def("dequantize", &kernel_dequantize, py::arg("format"), py::arg("data"), py::arg("n"),
        "The scalar reference dequantization of n elements of `format` (e.g. q4_k) from raw block bytes");
  k.def("bench_gemm", &bench_gemm, py::arg("n"), py::arg("k"), py::arg("m"), py::arg("isa") = "auto",
        py::arg("threads") = 1, py::arg("repeats") = 5, py::arg("cold") = false, py::arg("format") = "f32",
        "seconds per matmul, packing excluded (best of repeats); cold: weights come from memory");
  k.def("read_bandwidth_gbps", &read_bandwidth_gbps, py::arg("nbytes"), py::arg("threads"),
        py::arg("repeats") = 5);

  py::module_ t = m.def_submodule("testing", "pure-logic pieces, exposed for unit tests");
  t.def(
      "ngram_propose",
      [](const std::vector<int32_t>& tokens, int k, int min_n, int max_n) {
        std::vector<int32_t> out;
        ngram_propose(tokens.data(), static_cast<int>(tokens.size()), k, NgramConfig{min_n, max_n}, out);
        return out;
      },
      py::arg("tokens"), py::arg("k"), py::arg("min_n") = 1, py::arg("max_n") = 4);
  t.def(
      "choose_draft_lengths",
      [](const std::vector<std::pair<int, double>>& candidates, const std::vector<double>& later, double token_cost,
         int others) {
        std::vector<DraftCandidate> c;
        for (const auto& [n, a] : candidates) c.push_back({n, a});
        return choose_draft_lengths(c, later, token_cost, others);
      },
      py::arg("candidates"), py::arg("later"), py::arg("token_cost"), py::arg("others") = 0);
  py::class_<SchedulerHarness>(t, "Scheduler")
      .def(py::init<int, int, int, int, bool, int, bool, int, int>(), py::arg("num_pages"), py::arg("page_size"),
           py::arg("max_num_seqs"), py::arg("max_batch_tokens"), py::arg("prefix_cache") = false,
           py::arg("max_recycling") = -1, py::arg("chunked_prefill") = false, py::arg("window") = 0,
           py::arg("sink") = 0)
      .def("add", &SchedulerHarness::add)
      .def("add_tokens", &SchedulerHarness::add_tokens)
      .def("remove", &SchedulerHarness::remove)
      .def("step", &SchedulerHarness::step)
      .def("rejected", &SchedulerHarness::rejected)
      .def("running", &SchedulerHarness::running)
      .def("waiting", &SchedulerHarness::waiting)
      .def("pages", &SchedulerHarness::pages)
      .def("tokens", &SchedulerHarness::tokens)
      .def("num_tokens", &SchedulerHarness::num_tokens)
      .def("num_computed", &SchedulerHarness::num_computed)
      .def("num_cached_tokens", &SchedulerHarness::num_cached_tokens)
      .def("free_pages", &SchedulerHarness::free_pages)
      .def("cached_pages", &SchedulerHarness::cached_pages)
      .def("used_pages", &SchedulerHarness::used_pages)
      .def("total_pages", &SchedulerHarness::total_pages)
      .def("refcount", &SchedulerHarness::refcount)
      .def("tree_pages", &SchedulerHarness::tree_pages)
      .def("preemptions", &SchedulerHarness::preemptions)
      .def("take_copies", &SchedulerHarness::take_copies);

  using Tree = RadixTree;
  py::class_<Tree>(t, "RadixTree", "The prefix cache's radix tree over token ids (pure logic; page ids only)")
      .def(py::init<int>(), py::arg("page_size"))
      .def("match", [](Tree& tr, const std::vector<int32_t>& tokens, int64_t max_pages) {
        Tree::Match m = tr.match(tokens.data(), static_cast<int64_t>(tokens.size()), max_pages);
        return py::make_tuple(m.pages, m.node);
      }, py::arg("tokens"), py::arg("max_pages") = int64_t{1} << 40, "-> (pages, node)")
      .def("insert", [](Tree& tr, const std::vector<int32_t>& tokens, const std::vector<int32_t>& pages) {
        if (tokens.size() < pages.size() * static_cast<size_t>(tr.page_size()))
          throw std::invalid_argument("insert: fewer tokens than the pages hold");
        Tree::Insertion i = tr.insert(tokens.data(), pages);
        return py::make_tuple(i.node, i.adopted_from);
      }, py::arg("tokens"), py::arg("pages"), "-> (node, adopted_from)")
      .def("lock", &Tree::lock)
      .def("unlock", &Tree::unlock)
      .def("match_partial", [](Tree& tr, int64_t node, const std::vector<int32_t>& tokens) {
        Tree::Partial p = tr.match_partial(node, tokens.data(), static_cast<int64_t>(tokens.size()));
        return py::make_tuple(p.page, p.tokens, p.owner);
      }, py::arg("node"), py::arg("tokens"), "-> (page, tokens, owner)")
      .def("pin_tail", &Tree::pin_tail, py::arg("node"), py::arg("page"))
      .def("unpin_tail", &Tree::unpin_tail, py::arg("node"), py::arg("page"))
      .def("insert_tail", [](Tree& tr, int64_t node, const std::vector<int32_t>& tokens, int32_t page) {
        std::vector<int32_t> released;
        const bool adopted = tr.insert_tail(node, tokens.data(), static_cast<int>(tokens.size()), page, released);
        return py::make_tuple(adopted, released);
      }, py::arg("node"), py::arg("tokens"), py::arg("page"), "-> (adopted, released pages)")
      .def("evict", [](Tree& tr, int64_t pages) {
        std::vector<int32_t> out;
        tr.evict(pages, out);
        return out;
      })
      .def("evict_path", [](Tree& tr, int64_t node, const std::vector<int64_t>& keep) {
        std::vector<int32_t> out;
        tr.evict_path(node, [&](int64_t id) { return std::find(keep.begin(), keep.end(), id) != keep.end(); }, out);
        return out;
      }, py::arg("node"), py::arg("keep") = std::vector<int64_t>{})
      .def("clear", [](Tree& tr) {
        std::vector<int32_t> out;
        tr.clear(out);
        return out;
      })
      .def("contains", &Tree::contains)
      .def("lock_count", &Tree::lock_count)
      .def_property_readonly("num_pages", &Tree::num_pages)
      .def_property_readonly("evictable_pages", &Tree::evictable_pages)
      .def_property_readonly("num_nodes", &Tree::num_nodes);
}
