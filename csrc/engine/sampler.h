#pragma once
// Turns one row of logits into a token id, the way OpenAI's parameters ask: a grammar's
// allowed-token mask (structured output) first, then logit_bias, then
// repetition / presence / frequency penalties, then EOS masking until min_tokens, then
// temperature; logprobs are taken here (the log-softmax of these processed logits); finally
// top-k, top-p and min-p filtering and a draw from the request's own RNG, so a seeded request
// gives the same tokens whatever else is in the batch. Temperature 0 is greedy.
#include <cstdint>
#include <memory>
#include <random>
#include <unordered_map>
#include <utility>
#include <vector>

namespace pyserve {

class CompiledGrammar;

struct SamplingParams {
  float temperature = 1.f;  // 0: greedy
  float top_p = 1.f;        // (0, 1]
  int top_k = 0;            // <= 0: off
  float min_p = 0.f;        // [0, 1]
  float presence_penalty = 0.f;    // OpenAI: minus this once for every token already generated
  float frequency_penalty = 0.f;   // OpenAI: minus this times the token's generated count
  float repetition_penalty = 1.f;  // HF/vLLM: tokens in prompt or output: / p if > 0, * p if < 0
  std::vector<std::pair<int32_t, float>> logit_bias;
  bool has_seed = false;
  uint64_t seed = 0;
  int max_tokens = -1;      // < 0: until the context is full
  int min_tokens = 0;       // EOS and stop_token_ids are masked until this many tokens
  std::vector<int32_t> stop_token_ids;
  bool ignore_eos = false;
  int logprobs = -1;        // < 0: none; k >= 0: the sampled token's logprob and the top k
  int prompt_logprobs = -1; // < 0: none; k >= 0: each prompt token's logprob and the top k
  int n = 1;                // choices; they share the prompt's KV pages
  // Structured output: the tokens each step may draw (null: any). Shared, immutable; each choice
  // walks its own matcher (request.h).
  std::shared_ptr<const CompiledGrammar> grammar;
  bool pin_prompt = false;  // MLC's debug_config.pinned_system_prompt: the prompt's pages stay cached until reset
  void validate(int vocab_size) const;  // throws std::invalid_argument naming the parameter
  bool penalised() const { return presence_penalty != 0.f || frequency_penalty != 0.f || repetition_penalty != 1.f; }
};

struct TokenLogprob {
  int32_t token = 0;
  float logprob = 0.f;
  std::vector<std::pair<int32_t, float>> top;  // most likely first
};

// What the penalties need to know of one sequence so far.
struct TokenHistory {
  std::unordered_map<int32_t, int> generated;  // token -> times generated
  std::vector<uint8_t> seen;                   // token in prompt or output (repetition penalty)
  void add_prompt(const std::vector<int32_t>& prompt, int vocab);
  void add_generated(int32_t token, int vocab);
};

class Sampler {
 public:
  // logits: one row (not modified). history may be null when no penalty is asked for.
  // eos: token ids masked while num_generated < min_tokens. logprob (optional) receives the
  // sampled token's logprob and top-k when params.logprobs >= 0. allowed (optional): a bit per
  // token (bit t of word t / 32); tokens without one are ruled out before anything else.
  int32_t sample(const float* logits, int vocab, const SamplingParams& p, std::mt19937_64& rng,
                 const TokenHistory* history, int num_generated, const std::vector<int32_t>& eos,
                 TokenLogprob* logprob, const uint32_t* allowed = nullptr);

 private:
  std::vector<float> work_;                            // processed logits
  std::vector<std::pair<float, int32_t>> candidates_;  // reused across calls
};

int32_t argmax(const float* x, int n);
// The w largest of x (w <= n) into out, largest first (the first of equals first, as argmax).
void top_tokens(const float* x, int n, int w, int32_t* out);
// argmax over the tokens whose bit in `allowed` is set (the first maximum, as argmax).
int32_t masked_argmax(const float* x, int n, const uint32_t* allowed);
// Sets x[t] = -inf for every token t whose bit in `allowed` is clear.
void apply_token_mask(float* x, int n, const uint32_t* allowed);
inline bool token_allowed(const uint32_t* allowed, int32_t t) { return (allowed[t >> 5] >> (t & 31)) & 1u; }
// log-softmax of x at `token`, plus the top k (most likely first).
TokenLogprob token_logprob(const float* x, int n, int32_t token, int k);

}  // namespace pyserve
