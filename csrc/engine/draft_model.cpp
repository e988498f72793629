#include "engine/draft_model.h"

#include <algorithm>
#include <stdexcept>

#include "engine/sampler.h"

namespace pyserve {

namespace {
int pages_for(int tokens, int page_size) { return (std::max(tokens, 1) + page_size - 1) / page_size; }
}  // namespace

DraftModel::DraftModel(std::shared_ptr<LlamaModel> model, int capacity_tokens, int page_size, int step_tokens)
    : model_(std::move(model)),
      cache_(model_->backend(), model_->config().num_layers, pages_for(capacity_tokens, std::max(page_size, 1)),
             std::max(page_size, 1), model_->config().kv_dim()),
      page_size_(std::max(page_size, 1)),
      step_tokens_(std::max(step_tokens, 1)) {
  model_->reserve(step_tokens_);
  reset();
}

void DraftModel::reset() {
  states_.clear();
  free_.clear();
  for (int p = cache_.num_pages() - 1; p >= 0; --p) free_.push_back(p);
}

bool DraftModel::reserve(State& s, int tokens) {
  const size_t need = static_cast<size_t>(pages_for(tokens, page_size_));
  if (need > s.pages.size() + free_.size()) return false;
  while (s.pages.size() < need) {
    s.pages.push_back(free_.back());
    free_.pop_back();
  }
  return true;
}

void DraftModel::trim(State& s) {
  const size_t need = s.computed > 0 ? static_cast<size_t>(pages_for(s.computed, page_size_)) : 0;
  while (s.pages.size() > need) {
    free_.push_back(s.pages.back());
    s.pages.pop_back();
  }
}

void DraftModel::keep(int64_t seq, int valid) {
  auto it = states_.find(seq);
  if (it == states_.end()) return;
  it->second.computed = std::min(it->second.computed, std::max(valid, 0));
  trim(it->second);
}

void DraftModel::release(int64_t seq) {
  auto it = states_.find(seq);
  if (it == states_.end()) return;
  it->second.computed = 0;
  trim(it->second);
  states_.erase(it);
}

void DraftModel::run_batch() {
  const size_t rows = batch_.logit_rows.size();
  const size_t V = static_cast<size_t>(model_->config().vocab_size);
  next_.clear();
  if (batch_.tokens.empty()) return;
  if (logits_.size() < std::max<size_t>(rows, 1) * V) logits_.resize(std::max<size_t>(rows, 1) * V);
  model_->forward(batch_, cache_, logits_.data());  // (takes the model's lock)
  for (size_t r = 0; r < rows; ++r) next_.push_back(argmax(logits_.data() + r * V, static_cast<int>(V)));
}

void DraftModel::propose(std::vector<Want>& wants) {
  struct Job {
    Want* want;
    State* state;  // unordered_map nodes stay put when it grows
    int n;         // tokens the target knows
    int k;         // drafts this round
  };
  std::vector<Job> jobs;
  for (Want& w : wants) {
    w.out->clear();
    const int n = static_cast<int>(w.tokens->size());
    if (w.k <= 0 || n == 0) continue;
    State& s = states_[w.seq];
    // The first draft comes from the logits at position n - 1: that token is fed (again) at least.
    s.computed = std::min(s.computed, n - 1);
    int k = w.k;
    while (k > 0 && !reserve(s, n + k - 1)) --k;  // K/V for the tokens and the k - 1 drafts fed back
    if (k == 0) {
      trim(s);
      continue;  // the draft's cache is full: no drafts for this one this step
    }
    jobs.push_back({&w, &s, n, k});
  }
  if (jobs.empty()) return;

  // Catch-up: the tokens accepted since the last round, in forwards of at most step_tokens_; the
  // row of a sequence's last known token gives its first draft.
  std::vector<Job*> owners;  // the job of each logit row of the batch being built
  auto flush = [&] {
    run_batch();
    for (size_t i = 0; i < owners.size(); ++i) owners[i]->want->out->push_back(next_[i]);
    owners.clear();
    batch_.clear();
  };
  batch_.clear();
  for (Job& j : jobs) {
    State& s = *j.state;
    while (s.computed < j.n) {
      const int room = step_tokens_ - static_cast<int>(batch_.tokens.size());
      if (room == 0) {
        flush();
        continue;
      }
      const int take = std::min(room, j.n - s.computed);
      for (int p = s.computed; p < s.computed + take; ++p) {
        batch_.tokens.push_back((*j.want->tokens)[static_cast<size_t>(p)]);
        batch_.positions.push_back(p);
        batch_.page_tables.push_back(s.pages.data());
      }
      s.computed += take;
      if (s.computed == j.n) {
        batch_.logit_rows.push_back(static_cast<int32_t>(batch_.tokens.size()) - 1);
        owners.push_back(&j);
      }
    }
  }
  flush();

  // Drafting: each round feeds every sequence's newest draft and takes the argmax after it.
  int longest = 0;
  for (const Job& j : jobs) longest = std::max(longest, j.k);
  for (int round = 1; round < longest; ++round) {
    for (Job& j : jobs) {
      std::vector<int32_t>& out = *j.want->out;
      if (round >= j.k || static_cast<int>(out.size()) != round) continue;
      batch_.tokens.push_back(out.back());
      batch_.positions.push_back(j.n + round - 1);
      batch_.page_tables.push_back(j.state->pages.data());
      batch_.logit_rows.push_back(static_cast<int32_t>(batch_.tokens.size()) - 1);
      owners.push_back(&j);
      j.state->computed = j.n + round;
    }
    flush();
  }
}

}  // namespace pyserve
