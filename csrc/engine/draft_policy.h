#pragma once
// How many drafts each decoding sequence verifies this step, when the draft length is automatic.
// Pure logic over estimates, unit-tested on its own.
//
// A step's time grows with its tokens: t(T) = 1 + token_cost * (T - 1) in units of a one-token
// step (token_cost: about 0 where a step is memory-bound, as a GPU's small batches are; about
// 0.2 on a 2-core CPU, where every token is compute). A draft at position j of a sequence whose
// first draft is accepted with probability a, and whose later drafts are accepted (the one before
// kept) with probabilities c_1, c_2, ..., is kept with probability a c_1 ... c_j: drafts come in
// runs (a quote is copied for a while), so c_j is measured apart from a. Drafts join the batch
// most likely first while each one's chance of being kept is worth the time it adds: p > token_cost
// * E / t, with E the tokens the step is expected to emit and t its time (the step's tokens per
// second rise with every draft added, and stop rising at the first one that would lower them).
#include <vector>

namespace pyserve {

struct DraftCandidate {
  int proposed = 0;   // drafts the proposer offers
  double first = 0;   // estimated chance that its first draft is accepted
  // Verify the first draft whatever it costs: an estimate never tested (or not for long) would
  // otherwise never learn that this sequence has started to quote its input.
  bool explore = false;
};

// Drafts to verify per candidate (<= proposed). later[j - 1]: the chance that draft j (from 0) is
// accepted when draft j - 1 was (past its end: its last value). `others`: tokens of the step
// besides these sequences' last tokens (prompt chunks), which already cost their time.
std::vector<int> choose_draft_lengths(const std::vector<DraftCandidate>& candidates, const std::vector<double>& later,
                                      double token_cost, int others = 0);

// A chance estimated from decayed counts of trials kept and rejected, smoothed by a prior of one
// of each (a sequence's first drafts; the engine's drafts at each later position).
struct AcceptanceEstimate {
  double kept = 0, rejected = 0;
  double value() const { return (kept + 1.0) / (kept + rejected + 2.0); }
  void update(bool accepted, double decay) {
    kept = decay * kept + (accepted ? 1 : 0);
    rejected = decay * rejected + (accepted ? 0 : 1);
  }
};

}  // namespace pyserve
