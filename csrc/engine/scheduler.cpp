#include "engine/scheduler.h"

#include <algorithm>
#include <stdexcept>

namespace pyserve {

Scheduler::Scheduler(SchedulerConfig config, BlockPool& pool, PrefixCache* cache)
    : config_(config), pool_(pool), cache_(cache) {
  if (config_.max_num_seqs < 1 || config_.max_batch_tokens < 1 || config_.page_size < 1)
    throw std::invalid_argument("scheduler: max_num_seqs, max_batch_tokens and page_size must be >= 1");
  // Every running sequence must be able to decode one token per step.
  config_.max_batch_tokens = std::max(config_.max_batch_tokens, config_.max_num_seqs);
}

void Scheduler::add(Sequence* s) { waiting_.push_back(s); }
void Scheduler::add_front(Sequence* s) { waiting_.push_front(s); }

void Scheduler::free_pages(Sequence* s, bool finished) {
  if (s->cache_node >= 0) {
    computed(s);  // what it computed stays cached, its partly filled last page too
    const int ps = config_.page_size, tail = s->num_computed % ps, last = s->num_computed / ps;
    if (tail > 0 && s->tokens && last < static_cast<int>(s->pages.size()) && last == s->cached_pages &&
        (!finished || cache_->max_recycling() != 0))
      cache_->insert_tail(s->cache_node, s->tokens->data() + last * ps, tail, s->pages[last]);
    const PrefixCache::NodeId node = s->cache_node;
    s->cache_node = -1;
    s->cached_pages = 0;
    cache_->release(node, finished);
  }
  for (int32_t p : s->pages)
    if (p >= 0) pool_.release(p);
  s->pages.clear();
  s->released_end = 0;
}

void Scheduler::remove(Sequence* s) {
  auto r = std::find(running_.begin(), running_.end(), s);
  if (r != running_.end()) running_.erase(r);
  auto w = std::find(waiting_.begin(), waiting_.end(), s);
  if (w != waiting_.end()) waiting_.erase(w);
  free_pages(s, true);
}

void Scheduler::computed(Sequence* s) {
  if (cache_ && s->cache_node >= 0 && s->tokens && s->released_end == 0) {
    const int full = std::min(s->num_computed / config_.page_size, static_cast<int>(s->pages.size()));
    if (full > s->cached_pages) {
      std::vector<int32_t> pages(s->pages.begin(), s->pages.begin() + full);
      s->cache_node = cache_->insert(s->tokens->data(), pages, s->cache_node);
      std::copy(pages.begin(), pages.end(), s->pages.begin());  // duplicates swapped for the tree's
      s->cached_pages = full;
      const int pin_pages = s->pin_tokens / config_.page_size;
      if (s->pin_tokens > 0 && full >= pin_pages) {
        if (pin_pages > 0) cache_->pin(s->tokens->data(), std::vector<int32_t>(pages.begin(), pages.begin() + pin_pages));
        s->pin_tokens = 0;
      }
    }
  }
  release_out_of_window(s);
}

void Scheduler::trim(Sequence* s) {
  // Pages past num_tokens were written only by rejected drafts: never cached, never shared.
  const size_t keep = static_cast<size_t>(pages_for(s->num_tokens));
  while (s->pages.size() > keep) {
    pool_.release(s->pages.back());
    s->pages.pop_back();
  }
}

int Scheduler::live_pages(int tokens) const {
  const int all = pages_for(tokens);
  if (config_.window <= 0) return all;
  // the sink's pages, the window's (it may straddle one more) and the page being written
  return std::min(all, pages_for(config_.sink) + pages_for(config_.window) + 2);
}

void Scheduler::release_out_of_window(Sequence* s) {
  if (config_.window <= 0) return;
  const int ps = config_.page_size;
  // Every later query (at >= num_computed) attends from lo = num_computed - window + 1 on: pages
  // wholly below lo, past the sink's, are never read again.
  const int lo = s->num_computed - config_.window + 1;
  const int sink_pages = pages_for(config_.sink);
  const int end = std::min(lo > 0 ? lo / ps : 0, static_cast<int>(s->pages.size()));
  if (end <= std::max(sink_pages, s->released_end)) return;
  for (int i = std::max(sink_pages, s->released_end); i < end; ++i) {
    pool_.release(s->pages[i]);  // a page the tree owns stays on the path this sequence locks
    s->pages[i] = -1;
  }
  s->released_end = end;
  // Once the window has passed every page the sequence put in the tree, its lock moves back to
  // the sink's pages: the rest of the path becomes evictable like any cached prefix.
  if (cache_ && s->cache_node >= 0 && s->tokens && s->cached_pages > sink_pages && end >= s->cached_pages) {
    const int keep = std::min(sink_pages, s->cached_pages);
    PrefixCache::Hit hit = cache_->match(s->tokens->data(), static_cast<int64_t>(keep) * ps, keep);
    for (int32_t p : hit.pages) pool_.release(p);  // the sequence holds its own references
    cache_->release(s->cache_node, false);
    s->cache_node = hit.node;
    s->cached_pages = static_cast<int>(hit.pages.size());
  }
}

void Scheduler::fork(Sequence* parent, Sequence* child, int pages) {
  pages = std::min(pages, static_cast<int>(parent->pages.size()));
  if (parent->cache_node >= 0 && child->tokens) {
    // The parent's computed prompt pages are in the tree: the child takes exactly those `pages`
    // from it, locked as deep as it shares (so whatever the child holds of the tree's lies on its
    // own locked path, and a tail it leaves later sits after the right prefix).
    PrefixCache::Hit hit = cache_->match(child->tokens->data(), static_cast<int64_t>(pages) * config_.page_size, pages);
    child->pages = std::move(hit.pages);
    child->cache_node = hit.node;
    child->cached_pages = static_cast<int>(child->pages.size());
    child->num_computed = child->cached_pages * config_.page_size;
    return;
  }
  child->pages.reserve(static_cast<size_t>(pages));
  for (int p = 0; p < pages; ++p) {
    if (parent->pages[p] >= 0) pool_.retain(parent->pages[p]);  // a released page stays a hole
    child->pages.push_back(parent->pages[p]);
  }
  child->released_end = std::min(parent->released_end, pages);
  if (child->released_end <= pages_for(config_.sink)) child->released_end = 0;
  child->num_computed = pages * config_.page_size;
}

bool Scheduler::reuse_prefix(Sequence* s) {
  if (!cache_ || !s->tokens || s->num_computed > 0 || !s->pages.empty() || s->cache_node >= 0) return false;
  const int ps = config_.page_size;
  // At least the last token is computed: its logits are what the sequence samples from.
  const int64_t max_pages = s->share_prefix ? (s->num_tokens - 1) / ps : 0;
  PrefixCache::Hit hit = cache_->match(s->tokens->data(), s->num_tokens, max_pages);
  s->pages = std::move(hit.pages);
  s->cache_node = hit.node;
  s->cached_pages = static_cast<int>(s->pages.size());
  s->num_computed = s->cached_pages * ps;
  // The next page in part: copied from a cached page that starts with the same tokens.
  const int64_t rest = s->num_tokens - 1 - s->num_computed;
  if (s->share_prefix && rest > 0) {
    const RadixTree::Partial part = cache_->match_partial(s->cache_node, s->tokens->data() + s->num_computed, rest);
    if (part.tokens > 0) {
      if (cache_->allocate(1, s->pages)) {
        copies_.push_back({part, s->pages.back(), s});
        s->num_computed += part.tokens;
      } else {
        cache_->release_partial(part);
      }
    }
  }
  if (s->num_cached_tokens < 0) s->num_cached_tokens = s->num_computed;
  return true;
}

void Scheduler::drop_copies(const Sequence* s) {
  for (auto it = copies_.begin(); it != copies_.end();) {
    if (it->seq == s) {
      cache_->release_partial(it->source);
      it = copies_.erase(it);
    } else {
      ++it;
    }
  }
}

void Scheduler::copies_done() {
  for (const PageCopy& c : copies_) cache_->release_partial(c.source);
  copies_.clear();
}

void Scheduler::reset() {
  waiting_.clear();
  running_.clear();
  rejected_.clear();
  copies_.clear();  // their locks go with the cache's reset
}

bool Scheduler::grow(Sequence* s, int tokens) {
  const int need = pages_for(tokens) - static_cast<int>(s->pages.size());
  if (need <= 0) return true;
  return cache_ ? cache_->allocate(need, s->pages) : pool_.allocate(need, s->pages);
}

bool Scheduler::reclaim_waiting(const Sequence* keep) {
  // Forked choices wait holding their share of the prompt's pages. When pages run out, they give
  // them back (and recompute later) before any running sequence is preempted: otherwise pages
  // pinned by the queue could starve the sequences that must finish to free the rest.
  for (auto it = waiting_.rbegin(); it != waiting_.rend(); ++it) {
    Sequence* w = *it;
    if (w == keep || w->pages.empty()) continue;
    free_pages(w);
    w->num_computed = 0;
    return true;
  }
  return false;
}

void Scheduler::preempt(Sequence* s) {
  running_.erase(std::find(running_.begin(), running_.end(), s));
  free_pages(s);
  s->num_computed = 0;
  ++num_preemptions_;
  waiting_.push_front(s);
}

std::vector<Sequence*> Scheduler::take_rejected() {
  std::vector<Sequence*> out;
  out.swap(rejected_);
  return out;
}

std::vector<ScheduledChunk> Scheduler::schedule() {
  if (!config_.chunked_prefill) return plan_step(false, false);
  // Chunked prefill: a decode step (one token each for the sequences that have one left) after a
  // prefill step (prompt chunks and admissions), and the other way round; a step of the kind
  // whose turn it is that finds nothing to do gives way to the other.
  const int64_t preemptions_before = num_preemptions_;
  std::vector<ScheduledChunk> plan = plan_step(last_step_prefilled_, !last_step_prefilled_);
  if (plan.empty()) {
    hold_admission_ = num_preemptions_ != preemptions_before;  // no re-admitting a victim at once
    plan = plan_step(!last_step_prefilled_, last_step_prefilled_);
    hold_admission_ = false;
  }
  bool prefilled = false;
  for (const ScheduledChunk& c : plan) prefilled = prefilled || c.seq->num_tokens - c.start > 1;
  if (!plan.empty()) last_step_prefilled_ = prefilled;
  return plan;
}

std::vector<ScheduledChunk> Scheduler::plan_step(bool decode_only, bool prefill_only) {
  std::vector<ScheduledChunk> plan;
  int budget = config_.max_batch_tokens;
  const int ps = config_.page_size;

  // 1. Running sequences, oldest first.
  const int64_t preemptions_before = num_preemptions_;
  for (size_t i = 0; i < running_.size() && budget > 0;) {
    Sequence* s = running_[i];
    const bool is_decode = s->num_tokens - s->num_computed == 1;
    if ((decode_only && !is_decode) || (prefill_only && is_decode)) {
      ++i;
      continue;
    }
    // A decode verifies its drafts with the budget left after one token for each sequence
    // still to plan.
    const int spare = budget - static_cast<int>(running_.size() - i);
    int n = is_decode ? 1 + std::max(0, std::min(static_cast<int>(s->drafts.size()), spare))
                      : std::min(s->num_tokens - s->num_computed, budget);
    // Tree leaves whose parents are verified, while the budget lasts (they go first when short).
    int leaves = 0;
    if (is_decode)
      while (leaves < static_cast<int>(s->leaves.size()) && s->leaves[leaves].depth < n - 1 &&
             n + leaves < spare + 1)
        ++leaves;
    bool preempted_self = false;
    while (!grow(s, s->num_computed + n + leaves)) {
      if (leaves > 0) {
        leaves = 0;
        continue;
      }
      const int can = (static_cast<int>(s->pages.size()) + available_pages()) * ps - s->num_computed;
      if (can > 0) {  // a prompt chunk (or a decode's drafts) shrinks to the pages there are
        n = std::min(n, can);
        continue;
      }
      if (reclaim_waiting(nullptr)) continue;
      Sequence* victim = running_.back();  // newest, and not yet planned (we go oldest first)
      preempt(victim);
      if (victim == s) {
        preempted_self = true;
        break;
      }
    }
    if (preempted_self) break;  // s was the newest: nothing after it is left to plan
    plan.push_back({s, s->num_computed, n, s->num_computed + n >= s->num_tokens, leaves});
    budget -= n + leaves;
    ++i;
  }

  // 2. Admit waiting sequences, unless this step just had to preempt (re-admitting the victim at
  // once would thrash). Keep one free page per running sequence so that admitting a long prompt
  // does not force a preemption at the next decode step.
  if (num_preemptions_ != preemptions_before || decode_only || hold_admission_) return plan;
  while (!waiting_.empty() && budget > 0 && static_cast<int>(running_.size()) < config_.max_num_seqs) {
    Sequence* s = waiting_.front();
    if (live_pages(s->num_tokens + 1) > pool_.num_pages()) {  // could never fit, even alone
      waiting_.pop_front();
      rejected_.push_back(s);
      continue;
    }
    const bool matched_now = reuse_prefix(s);
    const int reserve = static_cast<int>(running_.size());
    const int can = (static_cast<int>(s->pages.size()) + available_pages() - reserve) * ps - s->num_computed;
    const int n = std::min({s->num_tokens - s->num_computed, budget, can});
    if (n <= 0) {
      if (matched_now) {
        // Not admitted after all: let go of the prefix it matched, for the cache to keep or evict.
        drop_copies(s);
        s->num_computed = s->cached_pages * ps;  // its copy target page holds nothing yet
        free_pages(s);
        s->num_computed = 0;
        s->num_cached_tokens = -1;
      }
      if (reclaim_waiting(s)) continue;
      break;
    }
    if (!grow(s, s->num_computed + n)) throw std::logic_error("scheduler: page accounting is off");
    waiting_.pop_front();
    running_.push_back(s);
    plan.push_back({s, s->num_computed, n, s->num_computed + n == s->num_tokens});
    budget -= n;
  }
  return plan;
}

}  // namespace pyserve
