#pragma once
// The prefix cache: a RadixTree of KV pages over a BlockPool. A page is in one of three states:
//   in use     a sequence holds it (refcount >= 1; the tree may own it too, on a locked path)
//   cached     only the tree holds it (refcount 1): evictable on an unlocked path (a pinned
//              prompt's path stays locked, and so may a sliding window's released pages for a while)
//   free       nobody holds it
// Allocation takes free pages first and evicts cached ones, least recently used first, only when
// it must, and only evictable pages count as available, so the cache never makes a request wait
// or fail that would have run without it (pinned prompts aside: they hold their pages on purpose).
// No page of K/V is kept twice: a sequence's pages duplicating the tree's are swapped for them. Pure bookkeeping over page ids: unit-tested without a model.
//
// Invariant (what makes `cached` pages truly free-able): a sequence holding a page the tree owns
// holds a lock on a node whose path contains that page.
#include <cstdint>
#include <deque>
#include <vector>

#include "cache/block_pool.h"
#include "cache/radix_tree.h"

namespace pyserve {

class PrefixCache {
 public:
  using NodeId = RadixTree::NodeId;

  // max_recycling: finished sequences whose pages stay cached (MLC's
  // prefix_cache_max_num_recycling_seqs: 0 none, -1 unlimited); older ones are evicted first.
  PrefixCache(BlockPool& pool, int page_size, int max_recycling);

  int64_t available_pages() const { return pool_.num_free() + tree_.evictable_pages(); }
  // Pages only the cache holds (no request does): evictable ones, pinned ones, and pages a sliding
  // window released on a path its sequence still locks.
  int64_t cached_pages() const { return pool_.num_cache_only(); }
  // Appends n pages (evicting cached ones if needed); all or nothing.
  bool allocate(int n, std::vector<int32_t>& out);

  struct Hit {
    std::vector<int32_t> pages;  // retained for the caller, which now holds a reference on each
    NodeId node = RadixTree::kRoot;  // locked for the caller
  };
  // The longest cached prefix of tokens[0 : n] in at most max_pages whole pages.
  Hit match(const int32_t* tokens, int64_t n, int64_t max_pages);
  // After a Hit ending at `node`: a page whose first slots hold the next tokens[0 : n] in part (a
  // tail, or a child's first page). With tokens > 0 the source is held for the caller, who copies
  // the page and then calls release_partial.
  RadixTree::Partial match_partial(NodeId node, const int32_t* tokens, int64_t n);
  void release_partial(const RadixTree::Partial& p);
  // Caches the partly filled last page of a sequence that will not write it again: tokens[0 : n]
  // (0 < n < page_size) after `node`, in `page`.
  void insert_tail(NodeId node, const int32_t* tokens, int n, int32_t page);
  // Caches tokens[0 : pages.size() * page_size] (computed, in the caller's `pages`) and moves the
  // caller's lock from `held` to the node that ends there, which is returned. Where the tree has
  // its own pages for a prefix already (two requests computed it at once), the caller's duplicates
  // are swapped for them in `pages`: the caller holds the tree's, and its own go back to the pool,
  // so the cache never holds a second copy of anyone's K/V.
  NodeId insert(const int32_t* tokens, std::vector<int32_t>& pages, NodeId held);
  // The caller lets go of `node`; its pages stay cached. A finished sequence's stay as one of the
  // max_recycling recycled ones (past that, the oldest one's unshared pages are evicted now); a
  // preempted one's stay until evicted, so its recompute is mostly a hit.
  void release(NodeId node, bool finished);
  // Pins tokens[0 : pages.size() * page_size] (cached already, or adopted now): locked until reset()
  // (MLC's debug_config.pinned_system_prompt).
  void pin(const int32_t* tokens, const std::vector<int32_t>& pages);
  // Empties the tree (pinned prefixes too); with release_pages, hands its pages back to the pool
  // (false when the pool is being reset as well).
  void reset(bool release_pages);

  const RadixTree& tree() const { return tree_; }
  int max_recycling() const { return max_recycling_; }

 private:
  void release_pages(const std::vector<int32_t>& pages);  // the tree's references
  // tree_.insert, and the tree's reference on each page it adopts.
  RadixTree::Insertion adopt(const int32_t* tokens, const std::vector<int32_t>& pages);
  bool is_recycled(NodeId node) const;

  BlockPool& pool_;
  RadixTree tree_;
  int max_recycling_;
  std::deque<NodeId> recycled_;  // ends of finished sequences kept, oldest first
  std::vector<int32_t> scratch_;
};

}  // namespace pyserve
