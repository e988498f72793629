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
#include "model/llama.h"

namespace pyserve {

class DraftModel {
 public:
  // capacity_tokens: the draft's KV cache (pages of page_size); step_tokens: tokens per forward.
  DraftModel(std::shared_ptr<LlamaModel> model, int capacity_tokens, int page_size, int step_tokens);

  struct Want {
    int64_t seq;                          // the engine's sequence key
    const std::vector<int32_t>* tokens;   // everything the target knows: prompt and output
    int k;                                // drafts wanted
    std::vector<int32_t>* out;            // receives up to k drafts (fewer when pages run out)
  };
  // One proposal round for every sequence in `wants`, batched across them.
  void propose(std::vector<Want>& wants);
  // After verification: the draft's K/V is right for the first `valid` tokens only.
  void keep(int64_t seq, int valid);
  void release(int64_t seq);
  void reset();  // forgets every sequence

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
  // Runs batch_ (its logit rows' argmax into next_).
  void run_batch();

  std::shared_ptr<LlamaModel> model_;
  KVCache cache_;
  int page_size_, step_tokens_;
  std::vector<int32_t> free_;
  std::unordered_map<int64_t, State> states_;
  ForwardBatch batch_;
  std::vector<float> logits_;   // [rows, vocab]
  std::vector<int32_t> next_;   // argmax of each logit row
};

}  // namespace pyserve
