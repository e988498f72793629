#pragma once
// Token selection on the device (sampling.cu, verify.cu): the engine's host sampler applies
// penalties, logit bias and grammar masks to the logits first; these kernels do the rest
// without sorting the vocabulary.
#include <cstdint>

#include "backend/cuda/gpu_compat.h"

namespace pyserve::gpu {

// Per-row sampling parameters (device arrays of `rows` entries).
struct SamplingParams {
  const float* temperature = nullptr;  // <= 0: greedy (argmax, lowest index on ties)
  const int32_t* top_k = nullptr;      // <= 0 or >= vocab: off
  const float* top_p = nullptr;        // >= 1: off
  const float* min_p = nullptr;        // <= 0: off
  const float* uniform = nullptr;      // one draw in [0, 1) per row, from the request's seeded RNG
};

size_t sample_workspace_bytes(int rows, int vocab);
// tokens: [rows] = a draw from softmax(logits[r] / temperature[r]) restricted to the tokens that
// survive top-k, then top-p (the smallest set of the likeliest tokens whose mass reaches top_p),
// then min-p (p >= min_p * p_max), renormalised, taken by inverse CDF at uniform[r] over token ids
// in increasing order. The kept set is found by searching a probability threshold (a few passes
// over the row), never by a full sort. logits: [rows, vocab] float32.
void sample(const float* logits, int rows, int vocab, const SamplingParams& params, int32_t* tokens,
            void* workspace, size_t workspace_bytes, gpuStream_t stream);
// tokens: [rows] = argmax of each row (lowest index on ties).
void argmax(const float* logits, int rows, int vocab, int32_t* tokens, gpuStream_t stream);

// Greedy verification of speculative drafts. For sequence s, its rows of target argmax are
// target[offsets[s] .. offsets[s + 1]) (one more row than drafts) and its drafts
// drafts[offsets[s] - s .. offsets[s + 1] - s - 1). accepted[s] = the length of the longest draft
// prefix equal to the target's argmax; next[s] = the target's token after it.
void verify_greedy(const int32_t* target, const int32_t* drafts, const int32_t* offsets, int n_seqs,
                   int32_t* accepted, int32_t* next, gpuStream_t stream);

}  // namespace pyserve::gpu
