#include "engine/sampler.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

namespace pyserve {

void SamplingParams::validate(int vocab_size) const {
  auto bad = [](const std::string& what) { throw std::invalid_argument(what); };
  if (!(temperature >= 0.f) || !std::isfinite(temperature)) bad("temperature must be >= 0");
  if (!(top_p > 0.f && top_p <= 1.f)) bad("top_p must be in (0, 1]");
  if (!(min_p >= 0.f && min_p <= 1.f)) bad("min_p must be in [0, 1]");
  if (!(repetition_penalty > 0.f) || !std::isfinite(repetition_penalty)) bad("repetition_penalty must be > 0");
  if (!std::isfinite(presence_penalty) || !std::isfinite(frequency_penalty)) bad("penalties must be finite");
  for (const auto& [tok, bias] : logit_bias) {
    if (tok < 0 || tok >= vocab_size)
      bad("logit_bias token id " + std::to_string(tok) + " is outside the vocabulary [0, " + std::to_string(vocab_size) + ")");
    if (!std::isfinite(bias)) bad("logit_bias values must be finite");
  }
  if (min_tokens < 0) bad("min_tokens must be >= 0");
  if (n < 1 || n > 128) bad("n must be in [1, 128]");
  if (logprobs > vocab_size || prompt_logprobs > vocab_size) bad("too many logprobs asked for");
}

void TokenHistory::add_prompt(const std::vector<int32_t>& prompt, int vocab) {
  seen.assign(vocab, 0);
  for (int32_t t : prompt) seen[t] = 1;
}

void TokenHistory::add_generated(int32_t token, int vocab) {
  ++generated[token];
  seen[token] = 1;  // sized by add_prompt, which always comes first
}

int32_t argmax(const float* x, int n) {
  int32_t best = 0;
  for (int i = 1; i < n; ++i)
    if (x[i] > x[best]) best = i;  // first maximum, as torch.argmax
  return best;
}

void top_tokens(const float* x, int n, int w, int32_t* out) {
  int have = 0;  // out[0 : have], largest first
  for (int i = 0; i < n; ++i) {
    if (have == w && !(x[i] > x[out[w - 1]])) continue;
    int at = have < w ? have++ : w - 1;
    while (at > 0 && x[i] > x[out[at - 1]]) {
      out[at] = out[at - 1];
      --at;
    }
    out[at] = i;
  }
}

int32_t masked_argmax(const float* x, int n, const uint32_t* allowed) {
  int32_t best = -1;
  for (int w = 0; w * 32 < n; ++w) {
    uint32_t bits = allowed[w];
    while (bits) {  // set bits in index order: the first maximum wins, as argmax
      const int i = w * 32 + __builtin_ctz(bits);
      bits &= bits - 1;
      if (i >= n) break;
      if (best < 0 || x[i] > x[best]) best = i;
    }
  }
  return best < 0 ? argmax(x, n) : best;  // nothing allowed: the caller finds out (token_allowed)
}

void apply_token_mask(float* x, int n, const uint32_t* allowed) {
  for (int w = 0; w * 32 < n; ++w) {
    const uint32_t bits = allowed[w];
    if (bits == ~0u) continue;
    const int end = std::min(n, w * 32 + 32);
    for (int i = w * 32; i < end; ++i)
      if (!((bits >> (i - w * 32)) & 1u)) x[i] = -INFINITY;
  }
}

TokenLogprob token_logprob(const float* x, int n, int32_t token, int k) {
  float m = -INFINITY;
  for (int i = 0; i < n; ++i) m = std::max(m, x[i]);
  double sum = 0;
  for (int i = 0; i < n; ++i) sum += std::exp(static_cast<double>(x[i] - m));
  const float log_z = m + static_cast<float>(std::log(sum));
  TokenLogprob out;
  out.token = token;
  out.logprob = x[token] - log_z;
  if (k > 0) {
    // Top k in one pass with a k-sized min-heap: no vocabulary-sized buffer per scored token
    // (echo with logprobs scores every prompt token).
    k = std::min(k, n);
    auto more_likely = [](const std::pair<float, int32_t>& a, const std::pair<float, int32_t>& b) {
      return a.first > b.first || (a.first == b.first && a.second < b.second);
    };
    std::vector<std::pair<float, int32_t>> heap;  // heap.front() is the least likely kept
    heap.reserve(k);
    for (int i = 0; i < n; ++i) {
      const std::pair<float, int32_t> e{x[i], i};
      if (static_cast<int>(heap.size()) < k) {
        heap.push_back(e);
        std::push_heap(heap.begin(), heap.end(), more_likely);
      } else if (more_likely(e, heap.front())) {
        std::pop_heap(heap.begin(), heap.end(), more_likely);
        heap.back() = e;
        std::push_heap(heap.begin(), heap.end(), more_likely);
      }
    }
    std::sort(heap.begin(), heap.end(), more_likely);
    for (const auto& [logit, id] : heap) out.top.emplace_back(id, logit - log_z);
  }
  return out;
}

namespace {
constexpr float kGreedyTemperature = 1e-5f;
double uniform01(std::mt19937_64& rng) { return static_cast<double>(rng() >> 11) * (1.0 / 9007199254740992.0); }
}  // namespace

int32_t Sampler::sample(const float* logits, int vocab, const SamplingParams& params, std::mt19937_64& rng,
                        const TokenHistory* history, int num_generated, const std::vector<int32_t>& eos,
                        TokenLogprob* logprob, const uint32_t* allowed) {
  // Temperatures this small are greedy in effect, and dividing by them overflows to inf (NaN
  // probabilities); vLLM draws the same line.
  SamplingParams greedy_copy;
  const bool tiny_t = params.temperature > 0.f && params.temperature < kGreedyTemperature;
  if (tiny_t) {
    greedy_copy = params;
    greedy_copy.temperature = 0.f;
  }
  const SamplingParams& p = tiny_t ? greedy_copy : params;
  const bool masked = num_generated < p.min_tokens;
  if (allowed && (p.temperature == 0.f || p.top_k == 1) && p.logit_bias.empty() && !(p.penalised() && history) &&
      !masked && !(logprob && p.logprobs >= 0))
    return masked_argmax(logits, vocab, allowed);  // greedy under a grammar: no copy of the row
  const bool processed = allowed || !p.logit_bias.empty() || (p.penalised() && history) || masked ||
                         (p.temperature != 0.f && p.temperature != 1.f);
  const float* x = logits;
  if (processed) {
    work_.assign(logits, logits + vocab);
    float* w = work_.data();
    if (allowed) apply_token_mask(w, vocab, allowed);
    for (const auto& [tok, bias] : p.logit_bias) w[tok] += bias;
    if (history && p.repetition_penalty != 1.f && !history->seen.empty())
      for (int i = 0; i < vocab; ++i)
        if (history->seen[i]) w[i] = w[i] > 0 ? w[i] / p.repetition_penalty : w[i] * p.repetition_penalty;
    if (history && (p.presence_penalty != 0.f || p.frequency_penalty != 0.f))
      for (const auto& [tok, count] : history->generated) w[tok] -= p.presence_penalty + p.frequency_penalty * count;
    if (masked) {
      for (int32_t t : eos) w[t] = -INFINITY;
      for (int32_t t : p.stop_token_ids)
        if (t >= 0 && t < vocab) w[t] = -INFINITY;
    }
    if (p.temperature != 0.f && p.temperature != 1.f) {
      const float inv_t = 1.f / p.temperature;
      for (int i = 0; i < vocab; ++i) w[i] *= inv_t;
    }
    x = w;
  }

  int32_t chosen;
  if (p.temperature == 0.f || p.top_k == 1) {
    chosen = argmax(x, vocab);
  } else {
    auto& c = candidates_;
    c.resize(vocab);
    for (int i = 0; i < vocab; ++i) c[i] = {x[i], i};
    auto by_logit = [](const std::pair<float, int32_t>& a, const std::pair<float, int32_t>& b) {
      return a.first > b.first || (a.first == b.first && a.second < b.second);
    };
    if (p.top_k > 0 && static_cast<size_t>(p.top_k) < c.size()) {
      std::nth_element(c.begin(), c.begin() + p.top_k, c.end(), by_logit);
      c.resize(p.top_k);
    }
    // Softmax weights over the survivors (relative to the max, for stability).
    float max_logit = -INFINITY;
    for (const auto& e : c) max_logit = std::max(max_logit, e.first);
    double total = 0;
    for (auto& e : c) {
      e.first = std::exp(e.first - max_logit);
      total += e.first;
    }
    if (p.top_p < 1.f) {
      // Smallest set of most likely tokens whose mass reaches top_p. Sorting the whole vocabulary
      // per token is slow; the nucleus almost always lies in the top 1024, so sort those first.
      size_t head = std::min<size_t>(c.size(), 1024);
      std::nth_element(c.begin(), c.begin() + (head - 1), c.end(), by_logit);
      std::sort(c.begin(), c.begin() + head, by_logit);
      double cum = 0;
      size_t n = 0;
      for (;;) {
        while (n < head && cum < p.top_p * total) cum += c[n++].first;
        if (cum >= p.top_p * total || head == c.size()) break;
        std::sort(c.begin() + head, c.end(), by_logit);
        head = c.size();
      }
      c.resize(std::max<size_t>(n, 1));
      total = 0;
      for (const auto& e : c) total += e.first;
    }
    if (p.min_p > 0.f) {  // drop tokens less likely than min_p x the most likely one (weight 1)
      size_t w = 0;
      total = 0;
      for (const auto& e : c)
        if (e.first >= p.min_p) {
          c[w++] = e;
          total += e.first;
        }
      c.resize(w);
    }
    double r = uniform01(rng) * total;
    chosen = c.back().second;
    for (const auto& e : c) {
      if (e.first <= 0) continue;  // ruled out (a mask's -inf): never drawn, even at rounding's edge
      chosen = e.second;
      r -= e.first;
      if (r < 0) break;
    }
  }
  if (logprob && p.logprobs >= 0) *logprob = token_logprob(x, vocab, chosen, p.logprobs);
  return chosen;
}

}  // namespace pyserve
