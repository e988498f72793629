#include "engine/medusa_heads.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "engine/sampler.h"

namespace pyserve {

MedusaHeads::MedusaHeads(std::shared_ptr<LlamaModel> target, const TensorMap& tensors, int num_heads,
                         std::vector<int32_t> draft_vocab)
    : target_(std::move(target)), vocab_(std::move(draft_vocab)) {
  if (num_heads < 1) throw std::invalid_argument("medusa: num_heads must be >= 1");
  const int64_t H = target_->config().hidden_size;
  const int V = target_->config().vocab_size;
  Backend& be = target_->backend();
  for (int k = 0; k < num_heads; ++k) {
    const std::string p = "medusa." + std::to_string(k) + ".";
    Head h;
    h.w = be.pack({&tensors.get(p + "weight", {H, H})});
    h.bias = tensors.get(p + "bias", {H}).to_f32();
    heads_.push_back(std::move(h));
  }
  if (!vocab_.empty()) {
    for (int32_t t : vocab_)
      if (t < 0 || t >= V)
        throw std::invalid_argument("medusa: draft vocabulary token " + std::to_string(t) + " is outside [0, " +
                                    std::to_string(V) + ")");
    lm_head_ = be.pack({&tensors.get("lm_head", {static_cast<int64_t>(vocab_.size()), H})});
  }
}

void MedusaHeads::propose(const float* hidden, int n, int k, std::vector<int32_t>* const* out,
                          std::vector<DraftLeaf>* const* leaves, int width) {
  k = std::min(k, num_heads());
  if (n <= 0 || k <= 0) return;
  const size_t H = static_cast<size_t>(target_->config().hidden_size);
  const size_t N = static_cast<size_t>(draft_vocab_size());
  const size_t rows = static_cast<size_t>(n) * static_cast<size_t>(k);
  Backend& be = target_->backend();
  // h_: [n, k, H] -- row i * k + j is sequence i's head j.
  lin_.resize(static_cast<size_t>(n) * H);
  h_.resize(rows * H);
  for (int j = 0; j < k; ++j) {
    // lin: [n, H] = hidden · W_jᵀ + b_j
    be.matmul(*heads_[static_cast<size_t>(j)].w, hidden, static_cast<int64_t>(H), n, lin_.data(),
              static_cast<int64_t>(H), heads_[static_cast<size_t>(j)].bias.data(), false);
    for (int i = 0; i < n; ++i) {
      const float* x = hidden + static_cast<size_t>(i) * H;
      const float* l = lin_.data() + static_cast<size_t>(i) * H;
      float* y = h_.data() + (static_cast<size_t>(i) * k + j) * H;
      for (size_t c = 0; c < H; ++c) y[c] = x[c] + l[c] / (1.f + std::exp(-l[c]));  // h + SiLU(W h + b)
    }
  }
  // logits: [n * k, N]
  logits_.resize(rows * N);
  if (lm_head_)
    be.matmul(*lm_head_, h_.data(), static_cast<int64_t>(H), static_cast<int>(rows), logits_.data(),
              static_cast<int64_t>(N), nullptr, false);
  else
    target_->lm_head(h_.data(), static_cast<int>(rows), logits_.data());
  const int w = leaves ? std::max(1, std::min(width, static_cast<int>(N))) : 1;
  top_.resize(static_cast<size_t>(w));
  auto token = [&](int32_t row) { return lm_head_ ? vocab_[static_cast<size_t>(row)] : row; };
  for (int i = 0; i < n; ++i) {
    out[i]->clear();
    if (leaves) leaves[i]->clear();
    for (int j = 0; j < k; ++j) {
      const float* lg = logits_.data() + (static_cast<size_t>(i) * k + j) * N;
      top_tokens(lg, static_cast<int>(N), w, top_.data());  // the first of equals first
      out[i]->push_back(token(top_[0]));
      for (int a = 1; a < w; ++a) leaves[i]->push_back({j, token(top_[static_cast<size_t>(a)])});
    }
  }
}

}  // namespace pyserve
