#include "model/llama.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

namespace pyserve {

namespace {
std::string layer_name(int i, const char* rest) { return "model.layers." + std::to_string(i) + "." + rest; }
}  // namespace

LlamaModel::LlamaModel(const ModelConfig& config, const TensorMap& t, std::shared_ptr<Backend> backend)
    : config_(config), backend_(std::move(backend)) {
  config_.validate();
  const ModelConfig& c = config_;
  const int64_t H = c.hidden_size, Q = c.q_dim(), KV = c.kv_dim(), I = c.intermediate_size, V = c.vocab_size;

  const TensorView& embed = t.get("model.embed_tokens.weight", {V, H});
  embed_ = backend_->pack({&embed});
  if (c.tie_word_embeddings || !t.has("lm_head.weight")) {
    weight_bytes_ += embed_->bytes();
  } else {
    lm_head_ = backend_->pack({&t.get("lm_head.weight", {V, H})});
    weight_bytes_ += lm_head_->bytes();
  }
  final_norm_ = norm_weight(t, "model.norm.weight", H);
  inv_freq_ = rope_inv_freq(c);
  for (int i = 0; i < c.num_layers; ++i) any_local_rope_ = any_local_rope_ || c.local_rope(i);
  if (any_local_rope_) inv_freq_local_ = rope_inv_freq(c, true);

  layers_.resize(c.num_layers);
  for (int i = 0; i < c.num_layers; ++i) {
    Layer& L = layers_[i];
    L.attn_norm = norm_weight(t, layer_name(i, "input_layernorm.weight"), H);
    if (c.is_gemma3()) {
      // Gemma's post_attention_layernorm norms the attention output; the MLP's input norm is
      // pre_feedforward_layernorm.
      L.ffn_norm = norm_weight(t, layer_name(i, "pre_feedforward_layernorm.weight"), H);
      L.post_attn_norm = norm_weight(t, layer_name(i, "post_attention_layernorm.weight"), H);
      L.post_ffn_norm = norm_weight(t, layer_name(i, "post_feedforward_layernorm.weight"), H);
      L.q_norm = norm_weight(t, layer_name(i, "self_attn.q_norm.weight"), c.head_dim);
      L.k_norm = norm_weight(t, layer_name(i, "self_attn.k_norm.weight"), c.head_dim);
    } else {
      L.ffn_norm = norm_weight(t, layer_name(i, "post_attention_layernorm.weight"), H);
    }
    L.qkv = backend_->pack({&t.get(layer_name(i, "self_attn.q_proj.weight"), {Q, H}),
                            &t.get(layer_name(i, "self_attn.k_proj.weight"), {KV, H}),
                            &t.get(layer_name(i, "self_attn.v_proj.weight"), {KV, H})});
    if (c.attention_bias) {
      std::vector<float> bias;
      for (const char* p : {"self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"}) {
        std::vector<float> b = t.get(layer_name(i, p)).to_f32();
        bias.insert(bias.end(), b.begin(), b.end());
      }
      if (static_cast<int64_t>(bias.size()) != Q + 2 * KV)
        throw std::invalid_argument("layer " + std::to_string(i) + ": q/k/v bias sizes do not match the projections");
      L.qkv_bias = backend_->upload(bias.data(), bias.size());
    }
    L.o = backend_->pack({&t.get(layer_name(i, "self_attn.o_proj.weight"), {H, Q})});
    L.gate_up = backend_->pack({&t.get(layer_name(i, "mlp.gate_proj.weight"), {I, H}),
                                &t.get(layer_name(i, "mlp.up_proj.weight"), {I, H})});
    L.down = backend_->pack({&t.get(layer_name(i, "mlp.down_proj.weight"), {H, I})});
    weight_bytes_ += L.qkv->bytes() + L.o->bytes() + L.gate_up->bytes() + L.down->bytes();
  }
}

LlamaModel::Param LlamaModel::norm_weight(const TensorMap& t, const std::string& name, int64_t dim) const {
  std::vector<float> w = t.get(name, {dim}).to_f32();
  if (config_.is_gemma3())
    for (float& x : w) x = 1.f + x;  // HF Gemma3RMSNorm: x * (1.0 + weight.float()), in float32
  return backend_->upload(w.data(), w.size());
}

void LlamaModel::reserve(int n) {
  if (n <= ws_.capacity) return;
  const ModelConfig& c = config_;
  const size_t N = static_cast<size_t>(n);
  Backend& be = *backend_;
  ws_.h = be.allocate(N * c.hidden_size);
  ws_.xn = be.allocate(N * c.hidden_size);
  ws_.qkv = be.allocate(N * (c.q_dim() + 2 * c.kv_dim()));
  ws_.attn = be.allocate(N * c.q_dim());
  ws_.gate_up = be.allocate(N * 2 * c.intermediate_size);
  ws_.act = be.allocate(N * c.intermediate_size);
  ws_.final_x = be.allocate(N * c.hidden_size);
  if (c.is_gemma3()) ws_.block_out = be.allocate(N * c.hidden_size);
  ws_.capacity = n;
}

void LlamaModel::forward(const ForwardBatch& batch, KVCache& cache, float* logits) {
  std::lock_guard<std::mutex> lock(forward_mu_);
  const float* hidden = forward_hidden(batch, cache);
  lm_head(hidden, static_cast<int>(batch.logit_rows.size()), logits);
}

void LlamaModel::embed(const int32_t* ids, int m, float* out) {
  if (m <= 0) return;
  if (!backend_->host_memory())
    throw std::logic_error("embed: host rows from a device backend (EAGLE drafts run on the CPU backend)");
  backend_->gather_rows(*embed_, ids, m, out);
}

void LlamaModel::lm_head(const float* hidden, int rows, float* logits) {
  if (rows <= 0) return;
  const Matrix& head = lm_head_ ? *lm_head_ : *embed_;
  Backend& be = *backend_;
  const int64_t H = config_.hidden_size, V = config_.vocab_size;
  if (be.host_memory()) {
    be.matmul(head, hidden, H, rows, logits, V, nullptr, false);
    return;
  }
  // A device backend: the host's rows go over, the logits come back.
  reserve(rows);
  if (rows > ws_.logit_rows) {
    ws_.logits = be.allocate(static_cast<size_t>(rows) * V);
    ws_.logit_rows = rows;
  }
  be.to_device(ws_.final_x->data(), hidden, static_cast<size_t>(rows) * H);
  be.matmul(head, ws_.final_x->data(), H, rows, ws_.logits->data(), V, nullptr, false);
  be.to_host(logits, ws_.logits->data(), static_cast<size_t>(rows) * V);
}

// The host side of a step: RoPE's angles, cache slots, and the padded page table.
StepInputs LlamaModel::build_step(const ForwardBatch& batch, int num_pages, int ps) {
  const ModelConfig& c = config_;
  const int n = static_cast<int>(batch.tokens.size()), half = c.head_dim / 2;
  HostStep& st = step_;
  st.cos.resize(static_cast<size_t>(n) * half);
  st.sin.resize(static_cast<size_t>(n) * half);
  if (any_local_rope_) {
    st.cos_local.resize(static_cast<size_t>(n) * half);
    st.sin_local.resize(static_cast<size_t>(n) * half);
  }
  st.slots.resize(static_cast<size_t>(n));
  st.token_seq.resize(static_cast<size_t>(n));
  // Sequences by page table: a batch's tokens of one sequence are usually adjacent, so the last
  // one seen is checked first. needed[s]: pages of row s any token reads or writes.
  std::vector<const int32_t*>& tables = seq_tables_;
  std::vector<int>& needed = seq_pages_;
  tables.clear();
  needed.clear();
  // cos/sin: [n, head_dim/2]; angle = pos * inv_freq in float32, as HF computes it.
  for (int i = 0; i < n; ++i) {
    const int pos = batch.positions[i];
    if (pos < 0) throw std::out_of_range("forward: negative position");
    // (A sliding window's positions run past the cache's size: its pages are reused.)
    const int kv_pos = batch.kv_positions.empty() ? pos : batch.kv_positions[i];
    if (kv_pos < 0) throw std::out_of_range("forward: negative KV position");
    const int32_t* table = batch.page_tables[i];
    const int32_t page = table[kv_pos / ps];
    if (page < 0 || page >= num_pages) throw std::out_of_range("forward: a token's KV page is outside the cache");
    int s = tables.empty() || tables.back() != table ? -1 : static_cast<int>(tables.size()) - 1;
    for (int j = 0; s < 0 && j < static_cast<int>(tables.size()); ++j)
      if (tables[j] == table) s = j;
    if (s < 0) {
      s = static_cast<int>(tables.size());
      tables.push_back(table);
      needed.push_back(0);
    }
    needed[s] = std::max(needed[s], std::max(pos, kv_pos) / ps + 1);
    st.token_seq[i] = s;
    for (int d = 0; d < half; ++d) {
      const float angle = static_cast<float>(pos) * inv_freq_[d];
      st.cos[i * half + d] = static_cast<float>(std::cos(static_cast<double>(angle)));
      st.sin[i * half + d] = static_cast<float>(std::sin(static_cast<double>(angle)));
    }
    if (any_local_rope_) {
      for (int d = 0; d < half; ++d) {
        const float angle = static_cast<float>(pos) * inv_freq_local_[d];
        st.cos_local[i * half + d] = static_cast<float>(std::cos(static_cast<double>(angle)));
        st.sin_local[i * half + d] = static_cast<float>(std::sin(static_cast<double>(angle)));
      }
    }
    st.slots[i] = static_cast<int64_t>(page) * ps + kv_pos % ps;
  }
  const int n_seqs = static_cast<int>(tables.size());
  const int max_pages = *std::max_element(needed.begin(), needed.end());
  st.page_table.assign(static_cast<size_t>(n_seqs) * max_pages, -1);  // -1: never read
  for (int s = 0; s < n_seqs; ++s)
    std::copy(tables[s], tables[s] + needed[s], st.page_table.begin() + static_cast<int64_t>(s) * max_pages);

  bool leaves = false;
  if (!batch.kv_positions.empty()) {
    if (batch.kv_positions.size() != static_cast<size_t>(n)) throw std::invalid_argument("forward: kv_positions is not [n]");
    st.own_slots.resize(static_cast<size_t>(n));
    for (int i = 0; i < n; ++i) {
      const bool leaf = batch.kv_positions[i] != batch.positions[i];
      if (leaf && batch.positions[i] == 0) throw std::invalid_argument("forward: a tree leaf at position 0 has no parent");
      st.own_slots[i] = leaf ? st.slots[i] : -1;
      leaves = leaves || leaf;
    }
  }

  StepInputs in;
  in.n_tokens = n;
  in.tokens = batch.tokens.data();
  in.positions = batch.positions.data();
  in.slots = st.slots.data();
  in.own_slots = leaves ? st.own_slots.data() : nullptr;
  in.half_dim = half;
  in.cos = st.cos.data();
  in.sin = st.sin.data();
  in.cos_local = any_local_rope_ ? st.cos_local.data() : nullptr;
  in.sin_local = any_local_rope_ ? st.sin_local.data() : nullptr;
  in.n_seqs = n_seqs;
  in.max_pages = max_pages;
  in.page_table = st.page_table.data();
  in.token_seq = st.token_seq.data();
  return in;
}

const float* LlamaModel::forward_hidden(const ForwardBatch& batch, KVCache& cache) {
  const ModelConfig& c = config_;
  const int n = static_cast<int>(batch.tokens.size());
  if (n == 0) return nullptr;  // no logit rows to read
  if (batch.positions.size() != batch.tokens.size() || batch.page_tables.size() != batch.tokens.size())
    throw std::invalid_argument("forward: tokens, positions and page_tables differ in length");
  reserve(std::max<int>(n, static_cast<int>(batch.logit_rows.size())));  // final_x holds the logit rows
  Backend& be = *backend_;
  const int H = c.hidden_size, Q = c.q_dim(), KV = c.kv_dim(), I = c.intermediate_size;
  const int QKV = Q + 2 * KV, ps = cache.page_size();

  const StepInputs in = be.prepare(build_step(batch, cache.num_pages(), ps));
  float* h = ws_.h->data();
  float* xn = ws_.xn->data();
  float* qkv = ws_.qkv->data();
  float* attn = ws_.attn->data();

  // x: [n, H] token embeddings (Gemma: times sqrt(H), rounded to float32 as HF's embed_scale is),
  // or the caller's input rows
  if (!batch.inputs.empty()) {
    if (batch.inputs.size() != static_cast<size_t>(n) * H) throw std::invalid_argument("forward: inputs are not [n, hidden]");
    be.to_device(h, batch.inputs.data(), batch.inputs.size());
  } else {
    be.gather_rows(*embed_, in.tokens, n, h);
    if (c.is_gemma3()) be.scale(h, static_cast<int64_t>(n) * H, static_cast<float>(std::sqrt(static_cast<double>(H))));
  }

  AttentionBatch ab;
  ab.q = qkv;
  ab.q_stride = QKV;
  ab.n_tokens = n;
  ab.n_heads = c.num_heads;
  ab.n_kv_heads = c.num_kv_heads;
  ab.head_dim = c.head_dim;
  ab.scale = c.attention_scale();
  ab.page_size = ps;
  ab.page_table = in.page_table;
  ab.n_seqs = in.n_seqs;
  ab.max_pages = in.max_pages;
  ab.token_seq = in.token_seq;
  ab.positions = in.positions;
  ab.own_slots = in.own_slots;
  ab.out = attn;
  ab.out_stride = Q;

  const bool gemma = c.is_gemma3();
  // A block's output [n, H] joins the residual h: added straight on, or (Gemma) normed first.
  auto add_to_residual = [&](const Matrix& w, const float* x, int ldx, const Param& post_norm) {
    if (!gemma) {
      be.matmul(w, x, ldx, n, h, H, nullptr, true);
      return;
    }
    be.matmul(w, x, ldx, n, ws_.block_out->data(), H, nullptr, false);
    be.rmsnorm_add(ws_.block_out->data(), H, ptr(post_norm), n, H, c.rms_norm_eps, h, H);
  };

  for (int l = 0; l < c.num_layers; ++l) {
    Layer& L = layers_[l];
    const bool local = c.local_rope(l);
    const float* cos = local ? in.cos_local : in.cos;
    const float* sin = local ? in.sin_local : in.sin;
    // attention block: h += o(attn(rope(q), rope(k), v))
    be.rmsnorm(h, H, ptr(L.attn_norm), n, H, c.rms_norm_eps, xn, H);
    // qkv: [n, Q + 2 KV]
    be.matmul(*L.qkv, xn, H, n, qkv, QKV, ptr(L.qkv_bias), false);
    if (gemma) {  // q and k: each head RMS-normed before rope
      be.rmsnorm_heads(qkv, QKV, n, c.num_heads, c.head_dim, ptr(L.q_norm), c.rms_norm_eps);
      be.rmsnorm_heads(qkv + Q, QKV, n, c.num_kv_heads, c.head_dim, ptr(L.k_norm), c.rms_norm_eps);
    }
    be.rope(qkv, QKV, n, c.num_heads, c.head_dim, cos, sin);
    be.rope(qkv + Q, QKV, n, c.num_kv_heads, c.head_dim, cos, sin);
    be.write_kv(qkv + Q, qkv + Q + KV, QKV, n, c.num_kv_heads, c.head_dim, ps, in.slots, cache.k(l), cache.v(l));
    ab.k_cache = cache.k(l);
    ab.v_cache = cache.v(l);
    ab.window = c.window(l);
    ab.sink = c.sink(l);
    be.attention(ab);  // attn: [n, Q]
    add_to_residual(*L.o, attn, Q, L.post_attn_norm);
    // MLP block: h += down(act(gate(x)) * up(x)), act silu (GeGLU's tanh GELU for Gemma)
    be.rmsnorm(h, H, ptr(L.ffn_norm), n, H, c.rms_norm_eps, xn, H);
    be.matmul(*L.gate_up, xn, H, n, ws_.gate_up->data(), 2 * I, nullptr, false);
    if (gemma) be.gelu_tanh_mul(ws_.gate_up->data(), n, I, ws_.act->data());
    else be.silu_mul(ws_.gate_up->data(), n, I, ws_.act->data());
    add_to_residual(*L.down, ws_.act->data(), I, L.post_ffn_norm);
  }

  // Only the rows that will be sampled (or inspected) go through the final norm and LM head.
  const int r = static_cast<int>(batch.logit_rows.size());
  float* final_x = ws_.final_x->data();
  for (int j = 0; j < r; ++j) {
    const int row = batch.logit_rows[j];
    if (row < 0 || row >= n) throw std::out_of_range("forward: logit row outside the batch");
    be.rmsnorm(h + static_cast<int64_t>(row) * H, H, ptr(final_norm_), 1, H, c.rms_norm_eps,
               final_x + static_cast<int64_t>(j) * H, H);
  }
  if (be.host_memory()) return final_x;
  step_.final_x.resize(static_cast<size_t>(r) * H);
  be.to_host(step_.final_x.data(), final_x, step_.final_x.size());
  return step_.final_x.data();
}

}  // namespace pyserve
