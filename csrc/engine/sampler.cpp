#include "engine/sampler.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>

namespace pyserve {

void SamplingParams::validate() const {
  if (!(temperature >= 0.f) || !std::isfinite(temperature)) throw std::invalid_argument("temperature must be >= 0");
  if (!(top_p > 0.f && top_p <= 1.f)) throw std::invalid_argument("top_p must be in (0, 1]");
  if (!(min_p >= 0.f && min_p <= 1.f)) throw std::invalid_argument("min_p must be in [0, 1]");
}

int32_t argmax(const float* x, int n) {
  int32_t best = 0;
  for (int i = 1; i < n; ++i)
    if (x[i] > x[best]) best = i;  // first maximum, as torch.argmax
  return best;
}

namespace {
double uniform01(std::mt19937_64& rng) { return static_cast<double>(rng() >> 11) * (1.0 / 9007199254740992.0); }
}  // namespace

int32_t Sampler::sample(const float* logits, int vocab, const SamplingParams& p, std::mt19937_64& rng) {
  if (p.temperature == 0.f || p.top_k == 1) return argmax(logits, vocab);
  const float inv_t = 1.f / p.temperature;
  auto& c = candidates_;
  c.resize(vocab);
  for (int i = 0; i < vocab; ++i) c[i] = {logits[i] * inv_t, i};
  auto by_logit = [](const std::pair<float, int32_t>& a, const std::pair<float, int32_t>& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  };

  size_t keep = c.size();
  if (p.top_k > 0 && static_cast<size_t>(p.top_k) < keep) {
    std::nth_element(c.begin(), c.begin() + p.top_k, c.end(), by_logit);
    keep = p.top_k;
    c.resize(keep);
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
  if (p.min_p > 0.f) {  // drop tokens less likely than min_p x the most likely one
    const float floor = p.min_p * 1.f;  // the max survivor has weight exp(0) = 1
    size_t w = 0;
    total = 0;
    for (const auto& e : c)
      if (e.first >= floor) {
        c[w++] = e;
        total += e.first;
      }
    c.resize(w);
  }
  double r = uniform01(rng) * total;
  for (const auto& e : c) {
    r -= e.first;
    if (r < 0) return e.second;
  }
  return c.back().second;
}

}  // namespace pyserve
