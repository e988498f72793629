#pragma once
// MLC's medusa mode: heads on the target's own final hidden state propose the next tokens, all at
// once, with no draft model and no cache of their own (Medusa-1, Cai et al. 2024). Head k (from 1)
// reads the hidden state h of the row whose logits gave the latest token and proposes the token k
// after it:
//   h_k = h + SiLU(W_k h + b_k)     W_k: [hidden, hidden], b_k: [hidden]
//   draft_k = argmax(E h_k)         E: the target's LM head, or its rows for a draft vocabulary
// A draft vocabulary (the tokens the target says most often, chosen by tools/train_medusa.py) cuts
// the head's cost: the default model's full LM head is a third of the bytes a step reads. Greedy
// drafts are deterministic: the engine keeps one exactly when the target draws that token.
#include <cstdint>
#include <memory>
#include <vector>

#include "backend/backend.h"
#include "engine/scheduler.h"
#include "model/llama.h"
#include "tensor/tensor.h"

namespace pyserve {

class MedusaHeads {
 public:
  // tensors: medusa.{k}.weight [H, H] and medusa.{k}.bias [H] for k in [0, num_heads) (float
  // formats); with a draft vocabulary (token ids) also lm_head [N, H]: the target's LM head rows
  // for those tokens, in any format the backend packs. An empty draft_vocab: the target's LM head.
  MedusaHeads(std::shared_ptr<LlamaModel> target, const TensorMap& tensors, int num_heads,
              std::vector<int32_t> draft_vocab);

  int num_heads() const { return static_cast<int>(heads_.size()); }
  LlamaModel& target() { return *target_; }
  int draft_vocab_size() const { return lm_head_ ? static_cast<int>(vocab_.size()) : target_->config().vocab_size; }

  // hidden: [n, H] (row i: sequence i's latest hidden state). Writes up to `k` drafts (<= num_heads)
  // per row into out[i] (replacing what was there). With leaves (a draft tree), each head's next
  // width - 1 likeliest tokens go to leaves[i] at that head's depth. Computes on the target's
  // backend: the caller holds the target's lock().
  void propose(const float* hidden, int n, int k, std::vector<int32_t>* const* out,
               std::vector<DraftLeaf>* const* leaves = nullptr, int width = 1);

 private:
  struct Head {
    std::unique_ptr<Matrix> w;
    std::vector<float> bias;
  };
  std::shared_ptr<LlamaModel> target_;
  std::vector<Head> heads_;
  std::unique_ptr<Matrix> lm_head_;  // null: the target's
  std::vector<int32_t> vocab_;       // draft row -> token id (with lm_head_)
  // Working memory, grown to the largest call and kept.
  std::vector<float> lin_, h_, logits_;
  std::vector<int32_t> top_;
};

}  // namespace pyserve
