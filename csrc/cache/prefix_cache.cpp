#include "cache/prefix_cache.h"

#include <algorithm>
#include <stdexcept>

namespace pyserve {

PrefixCache::PrefixCache(BlockPool& pool, int page_size, int max_recycling)
    : pool_(pool), tree_(page_size), max_recycling_(max_recycling) {
  if (max_recycling < -1) throw std::invalid_argument("prefix cache: max_recycling must be >= -1");
}

void PrefixCache::release_pages(const std::vector<int32_t>& pages) {
  for (int32_t p : pages) pool_.release_from_cache(p);
}

RadixTree::Insertion PrefixCache::adopt(const int32_t* tokens, const std::vector<int32_t>& pages) {
  const RadixTree::Insertion ins = tree_.insert(tokens, pages);
  for (size_t i = static_cast<size_t>(ins.adopted_from); i < pages.size(); ++i) pool_.retain_for_cache(pages[i]);
  return ins;
}

bool PrefixCache::allocate(int n, std::vector<int32_t>& out) {
  if (n < 0 || n > available_pages()) return false;
  if (n > pool_.num_free()) {
    scratch_.clear();
    tree_.evict(n - pool_.num_free(), scratch_);
    // Drop recycled entries that went with them (ids are never reused, so stale ones are harmless
    // but would hold the deque's room).
    recycled_.erase(std::remove_if(recycled_.begin(), recycled_.end(), [&](NodeId id) { return !tree_.contains(id); }),
                    recycled_.end());
    release_pages(scratch_);
  }
  if (!pool_.allocate(n, out)) throw std::logic_error("prefix cache: evictable pages were not free-able");
  return true;
}

PrefixCache::Hit PrefixCache::match(const int32_t* tokens, int64_t n, int64_t max_pages) {
  RadixTree::Match m = tree_.match(tokens, n, max_pages);
  tree_.lock(m.node);
  for (int32_t p : m.pages) pool_.retain(p);
  return Hit{std::move(m.pages), m.node};
}

PrefixCache::NodeId PrefixCache::insert(const int32_t* tokens, std::vector<int32_t>& pages, NodeId held) {
  const RadixTree::Insertion ins = adopt(tokens, pages);
  for (size_t i = 0; i < ins.cached.size(); ++i) {
    if (pages[i] == ins.cached[i]) continue;
    pool_.retain(ins.cached[i]);
    pool_.release(pages[i]);
    pages[i] = ins.cached[i];
  }
  tree_.lock(ins.node);
  tree_.unlock(held);
  return ins.node;
}

RadixTree::Partial PrefixCache::match_partial(NodeId node, const int32_t* tokens, int64_t n) {
  RadixTree::Partial p = tree_.match_partial(node, tokens, n);
  if (p.tokens > 0) {
    if (p.tail) tree_.pin_tail(p.owner, p.page);
    else tree_.lock(p.owner);
  }
  return p;
}

void PrefixCache::release_partial(const RadixTree::Partial& p) {
  if (p.tail) tree_.unpin_tail(p.owner, p.page);
  else tree_.unlock(p.owner);
}

void PrefixCache::insert_tail(NodeId node, const int32_t* tokens, int n, int32_t page) {
  scratch_.clear();
  if (tree_.insert_tail(node, tokens, n, page, scratch_)) pool_.retain_for_cache(page);
  release_pages(scratch_);
}

bool PrefixCache::is_recycled(NodeId node) const {
  return std::find(recycled_.begin(), recycled_.end(), node) != recycled_.end();
}

void PrefixCache::release(NodeId node, bool finished) {
  tree_.unlock(node);
  if (!finished) return;
  scratch_.clear();
  const auto keep = [this](NodeId id) { return is_recycled(id); };
  if (max_recycling_ < 0) {
    // Every finished sequence's pages stay, until evicted for room.
  } else if (max_recycling_ > 0 && node != RadixTree::kRoot) {
    // The latest finish counts (two identical requests end on one node: it is kept once).
    recycled_.erase(std::remove(recycled_.begin(), recycled_.end(), node), recycled_.end());
    recycled_.push_back(node);
    while (static_cast<int>(recycled_.size()) > max_recycling_) {
      const NodeId oldest = recycled_.front();
      recycled_.pop_front();
      tree_.evict_path(oldest, keep, scratch_);
    }
  } else {
    tree_.evict_path(node, keep, scratch_);
  }
  release_pages(scratch_);
}

void PrefixCache::pin(const int32_t* tokens, const std::vector<int32_t>& pages) {
  const RadixTree::Insertion ins = adopt(tokens, pages);
  tree_.lock(ins.node);  // never unlocked: reset() clears the tree
}

void PrefixCache::reset(bool release) {
  scratch_.clear();
  tree_.clear(scratch_);
  if (release) release_pages(scratch_);
  recycled_.clear();
}

}  // namespace pyserve
