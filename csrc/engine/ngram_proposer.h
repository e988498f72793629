#pragma once
// Prompt lookup (vLLM's n-gram speculation): the tokens that followed the latest earlier
// occurrence of the sequence's last n tokens are a cheap guess at what comes next, and a good one
// wherever the output quotes, edits or repeats its input. Pure logic: unit-tested on its own.
#include <cstdint>
#include <vector>

namespace pyserve {

struct NgramConfig {
  int min_n = 1;  // the shortest suffix worth matching
  int max_n = 4;  // longer suffixes are tried first: a longer match predicts better
};

// Appends to `out` up to k tokens proposed to follow tokens[0 : n]: for the longest suffix of
// length max_n .. min_n that occurs earlier, the tokens after its latest earlier occurrence.
// Nothing when no suffix recurs.
void ngram_propose(const int32_t* tokens, int n, int k, const NgramConfig& config, std::vector<int32_t>& out);

}  // namespace pyserve
