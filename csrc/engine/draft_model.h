#pragma once
// MLC's small_draft: a smaller model with the target's vocabulary proposes each sequence's next
// tokens. It keeps its own paged KV cache per sequence, catches up on the tokens the target
// accepted since its last proposal (the whole prompt the first time, in chunks), then proposes its
// greedy continuation. A greedy draft is deterministic: the engine keeps a draft exactly when the
// target draws that same token (rejection sampling with q one-hot), so the output is the target's.
#include <cstdint>
#include <memory>
#include <unordered_map>
#include <vector>

#include "cache/kv_cache.h"
#include "engine/scheduler.h"
#include "model/llama.h"

namespace pyserve {

// What turns an EAGLE draft's inputs into its layer's input rows.
struct EagleInput {
  std::shared_ptr<LlamaModel> target;  // e(t): the target's embeddings
  std::unique_ptr<Matrix> fc;          // [H, 2H], on the draft's backend
  std::vector<float> fc_bias;          // [H]
};

class DraftModel {
 public:
  // capacity_tokens: the draft's KV cache (pages of page_size); step_tokens: tokens per forward.
  // eagle: set for an EAGLE draft. vocab: the token id of each of the draft's LM head rows (empty:
  // row i is token i).
  DraftModel(std::shared_ptr<LlamaModel> model, int capacity_tokens, int page_size, int step_tokens,
             std::shared_ptr<EagleInput> eagle = nullptr, std::vector<int32_t> vocab = {});

  struct Want {
    int64_t seq;                          // the engine's sequence key
    const std::vector<int32_t>* tokens;   // everything the target knows: prompt and output
    int k;                                // drafts wanted
    std::vector<int32_t>* out;            // receives up to k drafts (fewer when pages run out)
    // EAGLE: the target's features f_p for positions p in [features_from, features_from + count),
    // [count, hidden].
    const float* features = nullptr;
    int features_from = 0, features_count = 0;
    // A draft tree: each position's next width - 1 likeliest tokens as leaves (width 1: none).
    std::vector<DraftLeaf>* leaves = nullptr;
    int width = 1;
  };
  // One proposal round for every sequence in `wants`, batched across them.
  void propose(std::vector<Want>& wants);
  // After verification: the draft's K/V is right for the first `valid` tokens only.
  void keep(int64_t seq, int valid);
  void release(int64_t seq);
  void reset();  // forgets every sequence
  // Tokens of the sequence whose K/V the draft holds (0 for one it does not know).
  int computed(int64_t seq) const;
  bool eagle() const { return eagle_ != nullptr; }

  int pages_free() const { return static_cast<int>(free_.size()); }
  int sequences() const { return static_cast<int>(states_.size()); }
  const LlamaModel& model() const { return *model_; }

 private:
  struct State {
    std::vector<int32_t> pages;
    int computed = 0;  // tokens whose K/V the draft's cache holds
  };
  bool reserve(State& s, int tokens);  // pages for `tokens` positions; false when the pool is short
  void trim(State& s);                 // gives back pages past `computed`
  // Runs batch_ (its logit rows' argmax into next_; with EAGLE their hidden rows into out_hidden_).
  void run_batch(const std::vector<const float*>& features);
  // EAGLE: batch_.inputs from the rows' features ([rows, H], null rows: zeros) and tokens.
  void eagle_inputs(const std::vector<const float*>& features);

  std::shared_ptr<LlamaModel> model_;
  KVCache cache_;
  int page_size_, step_tokens_;
  std::vector<int32_t> free_;
  std::unordered_map<int64_t, State> states_;
  ForwardBatch batch_;
  std::vector<float> logits_;   // [rows, vocab]
  std::vector<int32_t> next_;   // argmax of each logit row (a token id)
  int width_ = 1;               // this round's tree width: alts_ holds width_ - 1 a row
  std::vector<int32_t> alts_, top_;  // [rows][width_ - 1] token ids after the argmax; scratch
  std::shared_ptr<EagleInput> eagle_;
  std::vector<int32_t> vocab_;
  std::vector<float> out_hidden_;  // EAGLE: [logit rows, H], the draft's features for the next round
  std::vector<float> cat_, zeros_;  // EAGLE: [rows, 2H] = [f; e(t)]; a zero feature
  std::vector<float> job_hidden_;      // EAGLE, in propose: [jobs, H], each one's latest draft feature
  std::vector<const float*> features_; // in propose: per batch row, the f of its input (null: zeros)
};

}  // namespace pyserve
