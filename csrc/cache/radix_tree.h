#pragma once
// A radix tree over token ids whose nodes own whole KV pages: the prefix cache's index (SGLang's
// RadixCache, MLC's prefix cache). Pure logic: it stores page ids and never touches a pool or
// the cache's memory. The caller (PrefixCache) takes a pool reference for each page the tree
// adopts and gives back the pages it evicts.
//
// Every node but the root holds a run of whole pages: tokens.size() == pages.size() * page_size.
// Children are keyed by their first page of tokens, so two children never share it. A node may also
// hold *tails*: partly filled last pages of finished sequences that ended right after it (their
// first tokens, fewer than a page). Whole pages are shared; a tail, or the first page of a child
// that matches only in part, is a source to copy from (match_partial). A node's lock count is the
// number of lock() calls on it or on a descendant: a locked path is never evicted. Tails are never
// in a page table, so node locks do not hold them: a tail is kept only while it is being copied
// (pin_tail / unpin_tail), and is otherwise evictable, least recently used first.
// Node ids are never reused; a split keeps the lower part under the old id, so a handle to the
// end of a sequence stays valid for as long as the node exists.
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <unordered_map>
#include <vector>

namespace pyserve {

class RadixTree {
 public:
  using NodeId = int64_t;
  static constexpr NodeId kRoot = 0;

  explicit RadixTree(int page_size);

  struct Match {
    std::vector<int32_t> pages;  // the pages of the longest cached whole-page prefix
    NodeId node = kRoot;         // the node that ends exactly there (root when nothing matched)
  };
  // Longest cached prefix of tokens[0 : n], in whole pages and at most max_pages of them. The
  // path counts as used now (least-recently-used eviction).
  Match match(const int32_t* tokens, int64_t n, int64_t max_pages);

  struct Insertion {
    NodeId node = kRoot;  // the node that ends exactly after the inserted prefix
    int adopted_from = 0; // pages[adopted_from:] now belong to the tree; the ones before were cached
    std::vector<int32_t> cached;  // the tree's own pages for the first adopted_from pages
  };
  // Caches tokens[0 : pages.size() * page_size], whose K/V are in `pages`. Where a prefix is cached
  // already the tree keeps its own pages (`cached`: the caller's may be duplicates of them).
  Insertion insert(const int32_t* tokens, const std::vector<int32_t>& pages);

  struct Partial {
    int32_t page = -1;    // a page whose first `tokens` slots hold what the caller needs next
    int tokens = 0;       // 0: nothing useful
    NodeId owner = kRoot; // the node holding that page
    bool tail = false;    // a tail of owner (pin_tail while copying), else owner's first page (lock)
  };
  // After a whole-page match ending at `node`: the longest run of tokens[0 : n] (fewer than a page)
  // found at the start of one of its children's first page or of one of its tails.
  Partial match_partial(NodeId node, const int32_t* tokens, int64_t n);
  // Caches a partly filled page: tokens[0 : n] (0 < n < page_size) after `node`. Returns false
  // (nothing adopted) when a tail already holds them; a tail it extends is replaced, and its page
  // appended to `released`.
  bool insert_tail(NodeId node, const int32_t* tokens, int n, int32_t page, std::vector<int32_t>& released);

  void pin_tail(NodeId node, int32_t page);    // a tail being copied is not evicted or replaced
  void unpin_tail(NodeId node, int32_t page);
  void lock(NodeId node);    // pins the path root..node
  void unlock(NodeId node);

  // Evicts unlocked leaves, least recently used first, until at least `pages` pages are out or no
  // unlocked leaf is left; appends the evicted pages to `out`. Returns how many were evicted.
  int64_t evict(int64_t pages, std::vector<int32_t>& out);
  // Evicts `node` if it is an unlocked leaf, then each parent that has become one, stopping at
  // the first node `keep` says to keep. Returns the pages evicted (appended to `out`).
  int64_t evict_path(NodeId node, const std::function<bool(NodeId)>& keep, std::vector<int32_t>& out);
  // Forgets every node, locked or not; appends every page to `out`.
  void clear(std::vector<int32_t>& out);

  bool contains(NodeId node) const { return nodes_.count(node) != 0; }
  int lock_count(NodeId node) const;
  int page_size() const { return page_size_; }
  int64_t num_pages() const { return num_pages_; }              // pages the tree owns (tails too)
  int64_t evictable_pages() const { return evictable_pages_; }  // pages of unlocked nodes
  int64_t num_nodes() const { return static_cast<int64_t>(nodes_.size()) - 1; }  // root excluded

 private:
  struct Node {
    NodeId id = kRoot;
    Node* parent = nullptr;
    std::vector<int32_t> tokens;  // pages.size() * page_size of them
    std::vector<int32_t> pages;
    std::map<std::vector<int32_t>, Node*> children;  // by the child's first page of tokens
    struct Tail {
      std::vector<int32_t> tokens;  // fewer than page_size
      int32_t page;
      uint64_t last_use;
      int copying = 0;              // pins while a copy of it is pending
    };
    std::vector<Tail> tails;
    int locks = 0;
    uint64_t last_use = 0;
    bool copying_tail() const {
      for (const Tail& t : tails)
        if (t.copying > 0) return true;
      return false;
    }
  };
  Node::Tail& find_tail(NodeId node, int32_t page);

  std::vector<int32_t> first_page(const int32_t* tokens) const {
    return std::vector<int32_t>(tokens, tokens + page_size_);
  }
  // Whole pages of `node` that equal tokens[0 : ...], at most max_pages.
  int64_t common_pages(const Node& node, const int32_t* tokens, int64_t max_pages) const;
  // Cuts `node` after its first `pages` pages; returns the new upper node (the lower part keeps
  // the id).
  Node* split(Node* node, int64_t pages);
  void remove_leaf(Node* node, std::vector<int32_t>& out);  // with its tails
  void remove_tail(Node* node, size_t index, std::vector<int32_t>& out);
  Node* at(NodeId id) const;

  int page_size_;
  NodeId next_id_ = kRoot + 1;
  uint64_t clock_ = 0;
  int64_t num_pages_ = 0, evictable_pages_ = 0;
  std::unordered_map<NodeId, std::unique_ptr<Node>> nodes_;
  Node* root_;
};

}  // namespace pyserve
