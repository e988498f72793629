// Greedy verification of speculative drafts (sampling.h): the longest draft prefix the target
// model's argmax agrees with, and the target's own token after it (the bonus token when every
// draft is accepted). A sequence has a handful of drafts, so one thread walks each sequence.
#include <stdexcept>
#include <string>

#include "backend/cuda/sampling.h"

namespace pyserve::gpu {
namespace {

constexpr int kThreads = 128;

// target: [offsets[n_seqs]] argmax tokens; drafts: [offsets[n_seqs] - n_seqs]; offsets: [n_seqs + 1];
// accepted, next: [n_seqs]. Sequence s owns target rows [offsets[s], offsets[s + 1]) and the one
// fewer drafts from offsets[s] - s.
__global__ void verify_greedy_kernel(const int32_t* target, const int32_t* drafts, const int32_t* offsets,
                                     int n_seqs, int32_t* accepted, int32_t* next) {
  const int s = blockIdx.x * blockDim.x + threadIdx.x;
  if (s >= n_seqs) return;
  const int begin = offsets[s], end = offsets[s + 1];
  const int n_drafts = end - begin - 1;
  if (n_drafts < 0) {  // malformed offsets (no target row): nothing to read; the caller sees -1
    accepted[s] = 0;
    next[s] = -1;
    return;
  }
  const int32_t* t = target + begin;
  const int32_t* d = drafts + (begin - s);
  int n = 0;
  while (n < n_drafts && d[n] == t[n]) ++n;
  accepted[s] = n;
  next[s] = t[n];  // row n exists: n <= n_drafts = rows - 1
}

}  // namespace

void verify_greedy(const int32_t* target, const int32_t* drafts, const int32_t* offsets, int n_seqs,
                   int32_t* accepted, int32_t* next, gpuStream_t stream) {
  if (n_seqs < 0) throw std::invalid_argument("verify_greedy: n_seqs must be >= 0");
  if (n_seqs == 0) return;
  if (target == nullptr || offsets == nullptr || accepted == nullptr || next == nullptr)
    throw std::invalid_argument("verify_greedy: target, offsets, accepted and next must not be null");
  // drafts may be null when no sequence has a draft (the kernel then never reads it).
  const int blocks = (n_seqs + kThreads - 1) / kThreads;
  verify_greedy_kernel<<<blocks, kThreads, 0, stream>>>(target, drafts, offsets, n_seqs, accepted, next);
  PYSERVE_GPU_CHECK_LAUNCH();
}

}  // namespace pyserve::gpu
