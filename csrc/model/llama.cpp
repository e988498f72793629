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
      for (const char* p : {"self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"}) {
        std::vector<float> b = t.get(layer_name(i, p)).to_f32();
        L.qkv_bias.insert(L.qkv_bias.end(), b.begin(), b.end());
      }
      if (static_cast<int64_t>(L.qkv_bias.size()) != Q + 2 * KV)
        throw std::invalid_argument("layer " + std::to_string(i) + ": q/k/v bias sizes do not match the projections");
    }
    L.o = backend_->pack({&t.get(layer_name(i, "self_attn.o_proj.weight"), {H, Q})});
    L.gate_up = backend_->pack({&t.get(layer_name(i, "mlp.gate_proj.weight"), {I, H}),
                                &t.get(layer_name(i, "mlp.up_proj.weight"), {I, H})});
    L.down = backend_->pack({&t.get(layer_name(i, "mlp.down_proj.weight"), {H, I})});
    weight_bytes_ += L.qkv->bytes() + L.o->bytes() + L.gate_up->bytes() + L.down->bytes();
  }
}

std::vector<float> LlamaModel::norm_weight(const TensorMap& t, const std::string& name, int64_t dim) const {
  std::vector<float> w = t.get(name, {dim}).to_f32();
  if (config_.is_gemma3())
    for (float& x : w) x = 1.f + x;  // HF Gemma3RMSNorm: x * (1.0 + weight.float()), in float32
  return w;
}

void LlamaModel::reserve(int n) {
  if (n <= ws_.capacity) return;
  const ModelConfig& c = config_;
  const size_t N = static_cast<size_t>(n);
  ws_.h.resize(N * c.hidden_size);
  ws_.xn.resize(N * c.hidden_size);
  ws_.qkv.resize(N * (c.q_dim() + 2 * c.kv_dim()));
  ws_.attn.resize(N * c.q_dim());
  ws_.gate_up.resize(N * 2 * c.intermediate_size);
  ws_.act.resize(N * c.intermediate_size);
  ws_.cos.resize(N * c.head_dim / 2);
  ws_.sin.resize(N * c.head_dim / 2);
  ws_.final_x.resize(N * c.hidden_size);
  if (any_local_rope_) {
    ws_.cos_local.resize(N * c.head_dim / 2);
    ws_.sin_local.resize(N * c.head_dim / 2);
  }
  if (c.is_gemma3()) ws_.block_out.resize(N * c.hidden_size);
  ws_.slots.resize(N);
  ws_.capacity = n;
}

void LlamaModel::forward(const ForwardBatch& batch, KVCache& cache, float* logits) {
  std::lock_guard<std::mutex> lock(forward_mu_);
  const float* hidden = forward_hidden(batch, cache);
  lm_head(hidden, static_cast<int>(batch.logit_rows.size()), logits);
}

void LlamaModel::embed(const int32_t* ids, int m, float* out) {
  if (m > 0) backend_->gather_rows(*embed_, ids, m, out);
}

void LlamaModel::lm_head(const float* hidden, int rows, float* logits) {
  if (rows <= 0) return;
  const Matrix& head = lm_head_ ? *lm_head_ : *embed_;
  backend_->matmul(head, hidden, config_.hidden_size, rows, logits, config_.vocab_size, nullptr, false);
}

const float* LlamaModel::forward_hidden(const ForwardBatch& batch, KVCache& cache) {
  const ModelConfig& c = config_;
  const int n = static_cast<int>(batch.tokens.size());
  if (n == 0) return ws_.final_x.data();
  if (batch.positions.size() != batch.tokens.size() || batch.page_tables.size() != batch.tokens.size())
    throw std::invalid_argument("forward: tokens, positions and page_tables differ in length");
  reserve(std::max<int>(n, static_cast<int>(batch.logit_rows.size())));  // final_x holds the logit rows
  Backend& be = *backend_;
  const int H = c.hidden_size, Q = c.q_dim(), KV = c.kv_dim(), I = c.intermediate_size;
  const int QKV = Q + 2 * KV, half = c.head_dim / 2, ps = cache.page_size();

  // x: [n, H] token embeddings (Gemma: times sqrt(H), rounded to float32 as HF's embed_scale is),
  // or the caller's input rows
  if (!batch.inputs.empty()) {
    if (batch.inputs.size() != static_cast<size_t>(n) * H) throw std::invalid_argument("forward: inputs are not [n, hidden]");
    std::copy(batch.inputs.begin(), batch.inputs.end(), ws_.h.begin());
  } else {
    be.gather_rows(*embed_, batch.tokens.data(), n, ws_.h.data());
    if (c.is_gemma3()) be.scale(ws_.h.data(), static_cast<int64_t>(n) * H, static_cast<float>(std::sqrt(static_cast<double>(H))));
  }

  // cos/sin: [n, head_dim/2]; angle = pos * inv_freq in float32, as HF computes it.
  for (int i = 0; i < n; ++i) {
    const int pos = batch.positions[i];
    if (pos < 0) throw std::out_of_range("forward: negative position");
    // (A sliding window's positions run past the cache's size: its pages are reused.)
    const int kv_pos = batch.kv_positions.empty() ? pos : batch.kv_positions[i];
    if (kv_pos < 0) throw std::out_of_range("forward: negative KV position");
    const int32_t page = batch.page_tables[i][kv_pos / ps];
    if (page < 0 || page >= cache.num_pages()) throw std::out_of_range("forward: a token's KV page is outside the cache");
    for (int d = 0; d < half; ++d) {
      const float angle = static_cast<float>(pos) * inv_freq_[d];
      ws_.cos[i * half + d] = static_cast<float>(std::cos(static_cast<double>(angle)));
      ws_.sin[i * half + d] = static_cast<float>(std::sin(static_cast<double>(angle)));
    }
    if (any_local_rope_) {
      for (int d = 0; d < half; ++d) {
        const float angle = static_cast<float>(pos) * inv_freq_local_[d];
        ws_.cos_local[i * half + d] = static_cast<float>(std::cos(static_cast<double>(angle)));
        ws_.sin_local[i * half + d] = static_cast<float>(std::sin(static_cast<double>(angle)));
      }
    }
    ws_.slots[i] = static_cast<int64_t>(page) * ps + kv_pos % ps;
  }
  bool leaves = false;
  if (!batch.kv_positions.empty()) {
    if (batch.kv_positions.size() != static_cast<size_t>(n)) throw std::invalid_argument("forward: kv_positions is not [n]");
    ws_.own_slots.resize(static_cast<size_t>(n));
    for (int i = 0; i < n; ++i) {
      const bool leaf = batch.kv_positions[i] != batch.positions[i];
      if (leaf && batch.positions[i] == 0) throw std::invalid_argument("forward: a tree leaf at position 0 has no parent");
      ws_.own_slots[i] = leaf ? ws_.slots[i] : -1;
      leaves = leaves || leaf;
    }
  }

  AttentionBatch ab;
  ab.q = ws_.qkv.data();
  ab.q_stride = QKV;
  ab.n_tokens = n;
  ab.n_heads = c.num_heads;
  ab.n_kv_heads = c.num_kv_heads;
  ab.head_dim = c.head_dim;
  ab.scale = c.attention_scale();
  ab.page_size = ps;
  ab.page_tables = batch.page_tables.data();
  ab.positions = batch.positions.data();
  ab.own_slots = leaves ? ws_.own_slots.data() : nullptr;
  ab.out = ws_.attn.data();
  ab.out_stride = Q;

  const bool gemma = c.is_gemma3();
  // A block's output [n, H] joins the residual h: added straight on, or (Gemma) normed first.
  auto add_to_residual = [&](const Matrix& w, const float* x, int ldx, const std::vector<float>& post_norm) {
    if (!gemma) {
      be.matmul(w, x, ldx, n, ws_.h.data(), H, nullptr, true);
      return;
    }
    be.matmul(w, x, ldx, n, ws_.block_out.data(), H, nullptr, false);
    be.rmsnorm_add(ws_.block_out.data(), H, post_norm.data(), n, H, c.rms_norm_eps, ws_.h.data(), H);
  };

  for (int l = 0; l < c.num_layers; ++l) {
    Layer& L = layers_[l];
    const bool local = c.local_rope(l);
    const float* cos = local ? ws_.cos_local.data() : ws_.cos.data();
    const float* sin = local ? ws_.sin_local.data() : ws_.sin.data();
    // attention block: h += o(attn(rope(q), rope(k), v))
    be.rmsnorm(ws_.h.data(), H, L.attn_norm.data(), n, H, c.rms_norm_eps, ws_.xn.data(), H);
    // qkv: [n, Q + 2 KV]
    be.matmul(*L.qkv, ws_.xn.data(), H, n, ws_.qkv.data(), QKV,
              L.qkv_bias.empty() ? nullptr : L.qkv_bias.data(), false);
    if (gemma) {  // q and k: each head RMS-normed before rope
      be.rmsnorm_heads(ws_.qkv.data(), QKV, n, c.num_heads, c.head_dim, L.q_norm.data(), c.rms_norm_eps);
      be.rmsnorm_heads(ws_.qkv.data() + Q, QKV, n, c.num_kv_heads, c.head_dim, L.k_norm.data(), c.rms_norm_eps);
    }
    be.rope(ws_.qkv.data(), QKV, n, c.num_heads, c.head_dim, cos, sin);
    be.rope(ws_.qkv.data() + Q, QKV, n, c.num_kv_heads, c.head_dim, cos, sin);
    be.write_kv(ws_.qkv.data() + Q, ws_.qkv.data() + Q + KV, QKV, n, c.num_kv_heads, c.head_dim, ps,
                ws_.slots.data(), cache.k(l), cache.v(l));
    ab.k_cache = cache.k(l);
    ab.v_cache = cache.v(l);
    ab.window = c.window(l);
    ab.sink = c.sink(l);
    be.attention(ab);  // attn: [n, Q]
    add_to_residual(*L.o, ws_.attn.data(), Q, L.post_attn_norm);
    // MLP block: h += down(act(gate(x)) * up(x)), act silu (GeGLU's tanh GELU for Gemma)
    be.rmsnorm(ws_.h.data(), H, L.ffn_norm.data(), n, H, c.rms_norm_eps, ws_.xn.data(), H);
    be.matmul(*L.gate_up, ws_.xn.data(), H, n, ws_.gate_up.data(), 2 * I, nullptr, false);
    if (gemma) be.gelu_tanh_mul(ws_.gate_up.data(), n, I, ws_.act.data());
    else be.silu_mul(ws_.gate_up.data(), n, I, ws_.act.data());
    add_to_residual(*L.down, ws_.act.data(), I, L.post_ffn_norm);
  }

  // Only the rows that will be sampled (or inspected) go through the final norm and LM head.
  const int r = static_cast<int>(batch.logit_rows.size());
  for (int j = 0; j < r; ++j) {
    const int row = batch.logit_rows[j];
    if (row < 0 || row >= n) throw std::out_of_range("forward: logit row outside the batch");
    be.rmsnorm(ws_.h.data() + static_cast<int64_t>(row) * H, H, final_norm_.data(), 1, H,
               c.rms_norm_eps, ws_.final_x.data() + static_cast<int64_t>(j) * H, H);
  }
  return ws_.final_x.data();
}

}  // namespace pyserve
