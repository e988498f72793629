#include "engine/ngram_proposer.h"

#include <algorithm>

namespace pyserve {

void ngram_propose(const int32_t* tokens, int n, int k, const NgramConfig& config, std::vector<int32_t>& out) {
  if (k <= 0) return;
  for (int g = std::min(config.max_n, n - 1); g >= std::max(config.min_n, 1); --g) {
    const int32_t* suffix = tokens + n - g;
    // Latest occurrence first, ending before the suffix itself: start j in [0, n - g - 1].
    for (int j = n - g - 1; j >= 0; --j) {
      if (tokens[j + g - 1] != suffix[g - 1] || !std::equal(suffix, suffix + g, tokens + j)) continue;
      const int from = j + g, to = std::min(n, from + k);
      out.insert(out.end(), tokens + from, tokens + to);
      return;
    }
  }
}

}  // namespace pyserve
