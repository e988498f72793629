#include "engine/draft_model.h"

#include <algorithm>
#include <stdexcept>

#include "engine/sampler.h"

namespace pyserve {

namespace {
int pages_for(int tokens, int page_size) { return (std::max(tokens, 1) + page_size - 1) / page_size; }
}  // namespace

DraftModel::DraftModel(std::shared_ptr<LlamaModel> model, int capacity_tokens, int page_size, int step_tokens,
                       std::shared_ptr<EagleInput> eagle, std::vector<int32_t> vocab)
    : model_(std::move(model)),
      cache_(model_->backend(), model_->config().num_layers, pages_for(capacity_tokens, std::max(page_size, 1)),
             std::max(page_size, 1), model_->config().kv_dim()),
      page_size_(std::max(page_size, 1)),
      step_tokens_(std::max(step_tokens, 1)),
      eagle_(std::move(eagle)),
      vocab_(std::move(vocab)) {
  const int V = model_->config().vocab_size;
  if (!vocab_.empty() && static_cast<int>(vocab_.size()) != V)
    throw std::invalid_argument("draft: its vocabulary map has " + std::to_string(vocab_.size()) +
                                " entries for an LM head of " + std::to_string(V) + " rows");
  if (eagle_) {
    const int64_t H = model_->config().hidden_size;
    if (!eagle_->target || eagle_->target->config().hidden_size != H || !eagle_->fc || eagle_->fc->rows() != H ||
        eagle_->fc->cols() != 2 * H || static_cast<int64_t>(eagle_->fc_bias.size()) != H)
      throw std::invalid_argument("eagle: the draft's fc must be [hidden, 2 * hidden] with a bias, for a target of its hidden size");
    zeros_.assign(static_cast<size_t>(H), 0.f);
  }
  model_->reserve(step_tokens_);
  reset();
}

int DraftModel::computed(int64_t seq) const {
  auto it = states_.find(seq);
  return it == states_.end() ? 0 : it->second.computed;
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

void DraftModel::eagle_inputs(const std::vector<const float*>& features) {
  // inputs: [n, H] = fc([f; e(t)]) (+ bias), cat_: [n, 2H]
  const size_t n = batch_.tokens.size(), H = static_cast<size_t>(model_->config().hidden_size);
  cat_.resize(n * 2 * H);
  batch_.inputs.resize(n * H);
  {
    auto target_lock = eagle_->target->lock();  // the embedding table is the target's
    eagle_->target->embed(batch_.tokens.data(), static_cast<int>(n), batch_.inputs.data());
  }
  for (size_t i = 0; i < n; ++i) {
    const float* f = features[i] ? features[i] : zeros_.data();
    std::copy(f, f + H, cat_.begin() + static_cast<std::ptrdiff_t>(i * 2 * H));
    std::copy(batch_.inputs.begin() + static_cast<std::ptrdiff_t>(i * H),
              batch_.inputs.begin() + static_cast<std::ptrdiff_t>((i + 1) * H),
              cat_.begin() + static_cast<std::ptrdiff_t>(i * 2 * H + H));
  }
  model_->backend().matmul(*eagle_->fc, cat_.data(), static_cast<int64_t>(2 * H), static_cast<int>(n),
                           batch_.inputs.data(), static_cast<int64_t>(H), eagle_->fc_bias.data(), false);
}

void DraftModel::run_batch(const std::vector<const float*>& features) {
  const size_t rows = batch_.logit_rows.size();
  const size_t V = static_cast<size_t>(model_->config().vocab_size), H = static_cast<size_t>(model_->config().hidden_size);
  next_.clear();
  if (batch_.tokens.empty()) return;
  if (logits_.size() < std::max<size_t>(rows, 1) * V) logits_.resize(std::max<size_t>(rows, 1) * V);
  {
    auto lock = model_->lock();
    if (eagle_) eagle_inputs(features);
    const float* hidden = model_->forward_hidden(batch_, cache_);
    model_->lm_head(hidden, static_cast<int>(rows), logits_.data());
    if (eagle_) out_hidden_.assign(hidden, hidden + rows * H);
  }
  const int w = std::min(width_, static_cast<int>(V));
  alts_.clear();
  top_.resize(static_cast<size_t>(w));
  for (size_t r = 0; r < rows; ++r) {
    const float* lg = logits_.data() + r * V;
    if (w > 1) {
      top_tokens(lg, static_cast<int>(V), w, top_.data());
    } else {
      top_[0] = argmax(lg, static_cast<int>(V));
    }
    for (int i = 0; i < w; ++i) {
      const int32_t t = vocab_.empty() ? top_[static_cast<size_t>(i)] : vocab_[static_cast<size_t>(top_[static_cast<size_t>(i)])];
      if (i == 0) next_.push_back(t); else alts_.push_back(t);
    }
  }
}

void DraftModel::propose(std::vector<Want>& wants) {
  struct Job {
    Want* want;
    State* state;  // unordered_map nodes stay put when it grows
    int n;         // tokens the target knows
    int k;         // drafts this round
    size_t index;  // its row in job_hidden_
  };
  std::vector<Job> jobs;
  width_ = 1;
  for (Want& w : wants) {
    w.out->clear();
    if (w.leaves) w.leaves->clear();
    if (w.leaves) width_ = std::max(width_, w.width);
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
    jobs.push_back({&w, &s, n, k, jobs.size()});
  }
  if (jobs.empty()) return;
  width_ = std::min(width_, model_->config().vocab_size);
  const size_t H = static_cast<size_t>(model_->config().hidden_size);
  // EAGLE: each job's latest draft feature (the draft's output at its latest row), fed next round.
  job_hidden_.resize(eagle_ ? jobs.size() * H : 0);
  features_.clear();  // per batch row: the f of its input (null: zeros)

  // Catch-up: the tokens accepted since the last round, in forwards of at most step_tokens_; the
  // row of a sequence's last known token gives its first draft.
  std::vector<Job*> owners;  // the job of each logit row of the batch being built
  auto flush = [&] {
    run_batch(features_);
    for (size_t i = 0; i < owners.size(); ++i) {
      Want& w = *owners[i]->want;
      w.out->push_back(next_[i]);
      if (w.leaves)  // the runners-up at this draft's depth
        for (int a = 0; a < std::min(w.width, width_) - 1; ++a)
          w.leaves->push_back({static_cast<int>(w.out->size()) - 1, alts_[i * static_cast<size_t>(width_ - 1) + static_cast<size_t>(a)]});
      if (eagle_)
        std::copy(out_hidden_.begin() + static_cast<std::ptrdiff_t>(i * H),
                  out_hidden_.begin() + static_cast<std::ptrdiff_t>((i + 1) * H),
                  job_hidden_.begin() + static_cast<std::ptrdiff_t>(owners[i]->index * H));
    }
    owners.clear();
    features_.clear();
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
      const Want& w = *j.want;
      for (int p = s.computed; p < s.computed + take; ++p) {
        batch_.tokens.push_back((*w.tokens)[static_cast<size_t>(p)]);
        batch_.positions.push_back(p);
        batch_.page_tables.push_back(s.pages.data());
        const int f = p - 1 - w.features_from;  // the target's feature that drew token p
        features_.push_back(w.features && f >= 0 && f < w.features_count ? w.features + static_cast<size_t>(f) * H
                                                                        : nullptr);
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
      features_.push_back(eagle_ ? job_hidden_.data() + j.index * H : nullptr);
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
