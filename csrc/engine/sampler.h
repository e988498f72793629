#pragma once
// Turns one row of logits into a token id. Greedy at temperature 0; otherwise temperature,
// top-k, top-p and min-p filtering and a draw from the request's own RNG, so that a seeded
// request gives the same tokens whatever else is in the batch.
#include <cstdint>
#include <random>
#include <utility>
#include <vector>

namespace pyserve {

struct SamplingParams {
  float temperature = 1.f;  // 0: greedy
  float top_p = 1.f;        // (0, 1]
  int top_k = 0;            // <= 0: off
  float min_p = 0.f;        // [0, 1]
  bool has_seed = false;
  uint64_t seed = 0;
  int max_tokens = -1;      // < 0: until the context is full
  std::vector<int32_t> stop_token_ids;
  bool ignore_eos = false;
  void validate() const;    // throws std::invalid_argument naming the parameter
};

class Sampler {
 public:
  int32_t sample(const float* logits, int vocab, const SamplingParams& p, std::mt19937_64& rng);

 private:
  std::vector<std::pair<float, int32_t>> candidates_;  // reused across calls
};

int32_t argmax(const float* x, int n);

}  // namespace pyserve
