#include "engine/draft_policy.h"

#include <algorithm>
#include <cmath>

namespace pyserve {

std::vector<int> choose_draft_lengths(const std::vector<DraftCandidate>& candidates, const std::vector<double>& later,
                                      double token_cost, int others) {
  std::vector<int> out(candidates.size(), 0);
  struct Draft { double p; size_t seq; int j; };
  std::vector<Draft> drafts;
  for (size_t i = 0; i < candidates.size(); ++i) {
    double p = std::clamp(candidates[i].first, 0.0, 1.0);
    for (int j = 0; j < candidates[i].proposed; ++j) {
      if (j > 0) p *= later.empty() ? 0.0 : std::clamp(later[std::min<size_t>(j - 1, later.size() - 1)], 0.0, 1.0);
      drafts.push_back({p, i, j});
    }
  }
  // Most likely first; a sequence's drafts come in order (their p only falls along it).
  std::stable_sort(drafts.begin(), drafts.end(), [](const Draft& a, const Draft& b) { return a.p > b.p; });
  double tokens = static_cast<double>(candidates.size() + others);
  double expected = static_cast<double>(candidates.size());
  double time = 1 + token_cost * (tokens - 1);
  for (size_t i = 0; i < candidates.size(); ++i)
    if (candidates[i].explore && candidates[i].proposed > 0) {
      out[i] = 1;
      expected += std::clamp(candidates[i].first, 0.0, 1.0);
      time += token_cost;
    }
  for (const Draft& d : drafts) {
    if (d.j < out[d.seq]) continue;  // an explored first draft, counted already
    if (d.p * time <= token_cost * expected) break;  // (E + p) / (t + c) <= E / t
    ++out[d.seq];
    expected += d.p;
    time += token_cost;
  }
  return out;
}

}  // namespace pyserve
