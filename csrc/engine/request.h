#pragma once
// One choice of a request, as the engine core keeps it.
#include <cstdint>
#include <memory>
#include <random>
#include <vector>

#include "engine/draft_policy.h"
#include "engine/feature_store.h"
#include "engine/grammar.h"
#include "engine/sampler.h"
#include "engine/scheduler.h"

namespace pyserve {

struct Request {
  Sequence seq;
  int64_t id = 0;
  int index = 0;
  std::vector<int32_t> tokens;  // prompt then generated
  int num_prompt = 0;
  int num_generated = 0;
  SamplingParams params;
  std::mt19937_64 rng;
  std::unique_ptr<TokenHistory> history;  // only when a penalty is asked for
  std::unique_ptr<GrammarMatcher> grammar; // structured output: where its output stands in the grammar
  bool forked = false;                     // choice 0 of n > 1: the others exist
  bool prompt_logprobs_done = false;
  bool prompt_logprobs_sent = false;
  std::vector<TokenLogprob> prompt_logprobs;
  AcceptanceEstimate spec_acceptance;  // how often its drafts are kept (automatic draft length)
  int spec_untested = 0;               // decode steps since its drafts were last tested
  // medusa / eagle: the target's final hidden states the drafts read (Medusa: the row that drew the
  // latest token; EAGLE: those its draft has not consumed).
  FeatureStore spec_features;

  // Choice 0 of an n > 1 request that has not forked yet stands for all of its choices.
  int choices_represented() const { return (index == 0 && !forked) ? params.n : 1; }
};

// n <= 128 (SamplingParams::validate), so 256 keys per id never collide.
inline int64_t request_key(int64_t id, int index) { return id * 256 + index; }

}  // namespace pyserve
