#include "cache/radix_tree.h"

#include <algorithm>
#include <queue>
#include <stdexcept>
#include <string>
#include <utility>

namespace pyserve {

RadixTree::RadixTree(int page_size) : page_size_(page_size) {
  if (page_size < 1) throw std::invalid_argument("radix tree: page_size must be >= 1");
  auto root = std::make_unique<Node>();
  root_ = root.get();
  nodes_.emplace(kRoot, std::move(root));
}

RadixTree::Node* RadixTree::at(NodeId id) const {
  auto it = nodes_.find(id);
  if (it == nodes_.end()) throw std::out_of_range("radix tree: no node " + std::to_string(id));
  return it->second.get();
}

int RadixTree::lock_count(NodeId node) const { return at(node)->locks; }

int64_t RadixTree::common_pages(const Node& node, const int32_t* tokens, int64_t max_pages) const {
  const int64_t limit = std::min<int64_t>(static_cast<int64_t>(node.pages.size()), max_pages);
  int64_t p = 0;
  while (p < limit && std::equal(tokens + p * page_size_, tokens + (p + 1) * page_size_,
                                 node.tokens.begin() + p * page_size_))
    ++p;
  return p;
}

RadixTree::Node* RadixTree::split(Node* node, int64_t pages) {
  // parent -> node  becomes  parent -> upper -> node, upper holding node's first `pages` pages.
  const auto cut = static_cast<std::ptrdiff_t>(pages * page_size_);
  auto upper = std::make_unique<Node>();
  upper->id = next_id_++;
  upper->parent = node->parent;
  upper->tokens.assign(node->tokens.begin(), node->tokens.begin() + cut);
  upper->pages.assign(node->pages.begin(), node->pages.begin() + static_cast<std::ptrdiff_t>(pages));
  upper->locks = node->locks;  // every lock through node runs through upper as well
  upper->last_use = node->last_use;
  Node* u = upper.get();
  node->parent->children.erase(first_page(node->tokens.data()));
  node->tokens.erase(node->tokens.begin(), node->tokens.begin() + cut);
  node->pages.erase(node->pages.begin(), node->pages.begin() + static_cast<std::ptrdiff_t>(pages));
  node->parent = u;
  u->children.emplace(first_page(node->tokens.data()), node);
  u->parent->children.emplace(first_page(u->tokens.data()), u);
  nodes_.emplace(u->id, std::move(upper));
  return u;
}

RadixTree::Match RadixTree::match(const int32_t* tokens, int64_t n, int64_t max_pages) {
  Match m;
  max_pages = std::min(max_pages, n / page_size_);
  const uint64_t now = ++clock_;
  Node* node = root_;
  node->last_use = now;
  int64_t done = 0;  // pages matched
  while (done < max_pages) {
    auto it = node->children.find(first_page(tokens + done * page_size_));
    if (it == node->children.end()) break;
    Node* child = it->second;
    const int64_t common = common_pages(*child, tokens + done * page_size_, max_pages - done);
    if (common < static_cast<int64_t>(child->pages.size())) child = split(child, common);
    child->last_use = now;
    m.pages.insert(m.pages.end(), child->pages.begin(), child->pages.end());
    done += common;
    node = child;
  }
  m.node = node->id;
  return m;
}

RadixTree::Insertion RadixTree::insert(const int32_t* tokens, const std::vector<int32_t>& pages) {
  Insertion ins;
  const int64_t total = static_cast<int64_t>(pages.size());
  const uint64_t now = ++clock_;
  Node* node = root_;
  node->last_use = now;
  int64_t done = 0;
  while (done < total) {
    auto it = node->children.find(first_page(tokens + done * page_size_));
    if (it == node->children.end()) {
      // The rest is new: one node that adopts the caller's pages.
      auto leaf = std::make_unique<Node>();
      leaf->id = next_id_++;
      leaf->parent = node;
      leaf->tokens.assign(tokens + done * page_size_, tokens + total * page_size_);
      leaf->pages.assign(pages.begin() + static_cast<std::ptrdiff_t>(done), pages.end());
      leaf->last_use = now;
      Node* l = leaf.get();
      node->children.emplace(first_page(l->tokens.data()), l);
      nodes_.emplace(l->id, std::move(leaf));
      num_pages_ += total - done;
      evictable_pages_ += total - done;
      ins.node = l->id;
      ins.adopted_from = static_cast<int>(done);
      return ins;
    }
    Node* child = it->second;
    const int64_t common = common_pages(*child, tokens + done * page_size_, total - done);
    if (common < static_cast<int64_t>(child->pages.size())) child = split(child, common);
    child->last_use = now;
    ins.cached.insert(ins.cached.end(), child->pages.begin(), child->pages.end());
    done += common;
    node = child;
  }
  ins.node = node->id;
  ins.adopted_from = static_cast<int>(total);
  return ins;
}

void RadixTree::lock(NodeId id) {
  for (Node* n = at(id); n != nullptr; n = n->parent)
    if (n->locks++ == 0) evictable_pages_ -= static_cast<int64_t>(n->pages.size());
}

void RadixTree::unlock(NodeId id) {
  Node* node = at(id);
  for (Node* n = node; n != nullptr; n = n->parent)
    if (n->locks <= 0) throw std::logic_error("radix tree: unlock of an unlocked node " + std::to_string(id));
  for (Node* n = node; n != nullptr; n = n->parent)
    if (--n->locks == 0) evictable_pages_ += static_cast<int64_t>(n->pages.size());
}

void RadixTree::remove_tail(Node* node, size_t index, std::vector<int32_t>& out) {
  if (node->tails[index].copying > 0) throw std::logic_error("radix tree: removal of a tail being copied");
  out.push_back(node->tails[index].page);
  node->tails.erase(node->tails.begin() + static_cast<std::ptrdiff_t>(index));
  num_pages_ -= 1;
  evictable_pages_ -= 1;
}

RadixTree::Node::Tail& RadixTree::find_tail(NodeId id, int32_t page) {
  for (Node::Tail& t : at(id)->tails)
    if (t.page == page) return t;
  throw std::out_of_range("radix tree: node " + std::to_string(id) + " has no tail in page " + std::to_string(page));
}

void RadixTree::pin_tail(NodeId node, int32_t page) {
  if (find_tail(node, page).copying++ == 0) evictable_pages_ -= 1;
}

void RadixTree::unpin_tail(NodeId node, int32_t page) {
  Node::Tail& t = find_tail(node, page);
  if (t.copying <= 0) throw std::logic_error("radix tree: unpin of a tail that is not pinned");
  if (--t.copying == 0) evictable_pages_ += 1;
}

void RadixTree::remove_leaf(Node* node, std::vector<int32_t>& out) {
  while (!node->tails.empty()) remove_tail(node, node->tails.size() - 1, out);
  out.insert(out.end(), node->pages.begin(), node->pages.end());
  num_pages_ -= static_cast<int64_t>(node->pages.size());
  evictable_pages_ -= static_cast<int64_t>(node->pages.size());
  node->parent->children.erase(first_page(node->tokens.data()));
  nodes_.erase(node->id);  // node is gone after this line
}

int64_t RadixTree::evict(int64_t pages, std::vector<int32_t>& out) {
  // A min-heap by last use of tails (not being copied) and of unlocked leaves without tails; a node
  // joins it when its last child and tail go.
  struct Entry {
    uint64_t last_use;
    NodeId id;
    bool tail;  // the node's least recently used tail, else the node itself
  };
  auto later = [](const Entry& a, const Entry& b) { return a.last_use > b.last_use || (a.last_use == b.last_use && a.id > b.id); };
  std::priority_queue<Entry, std::vector<Entry>, decltype(later)> heap(later);
  // The least recently used tail not being copied, or tails.size().
  auto oldest_tail = [](const Node* n) {
    size_t best = n->tails.size();
    for (size_t i = 0; i < n->tails.size(); ++i)
      if (n->tails[i].copying == 0 && (best == n->tails.size() || n->tails[i].last_use < n->tails[best].last_use))
        best = i;
    return best;
  };
  // Tails go whatever the node's locks (no page table holds one); a node goes once it is an
  // unlocked leaf without tails.
  auto offer = [&](Node* n) {
    const size_t t = oldest_tail(n);
    if (t < n->tails.size()) heap.push({n->tails[t].last_use, n->id, true});
    else if (n->tails.empty() && n->children.empty() && n->locks == 0 && n != root_) heap.push({n->last_use, n->id, false});
  };
  for (const auto& kv : nodes_) offer(kv.second.get());
  int64_t evicted = 0;
  while (evicted < pages && !heap.empty()) {
    const Entry e = heap.top();
    heap.pop();
    // An entry goes stale when its node changed after it was offered (a node can be offered
    // again): skip unless it is still the node's current candidate.
    auto it = nodes_.find(e.id);
    if (it == nodes_.end()) continue;
    Node* n = it->second.get();
    if (e.tail ? oldest_tail(n) == n->tails.size() || n->tails[oldest_tail(n)].last_use != e.last_use
               : !n->tails.empty() || !n->children.empty() || n->locks != 0)
      continue;
    if (e.tail) {
      remove_tail(n, oldest_tail(n), out);
      evicted += 1;
      offer(n);  // its next tail, or the node itself
      continue;
    }
    if (n == root_) continue;
    Node* parent = n->parent;
    evicted += static_cast<int64_t>(n->pages.size());
    remove_leaf(n, out);
    if (parent->children.empty()) offer(parent);
  }
  return evicted;
}

RadixTree::Partial RadixTree::match_partial(NodeId id, const int32_t* tokens, int64_t n) {
  Partial best;
  Node* node = at(id);
  const int limit = static_cast<int>(std::min<int64_t>(n, page_size_ - 1));
  auto common = [&](const std::vector<int32_t>& have) {
    const int m = std::min(limit, static_cast<int>(have.size()));
    int r = 0;
    while (r < m && have[r] == tokens[r]) ++r;
    return r;
  };
  Node::Tail* best_tail = nullptr;
  for (auto& kv : node->children) {
    const int r = common(kv.first);
    if (r > best.tokens) best = Partial{kv.second->pages.front(), r, kv.second->id};
  }
  for (Node::Tail& t : node->tails) {
    const int r = common(t.tokens);
    if (r > best.tokens) {
      best = Partial{t.page, r, node->id};
      best_tail = &t;
    }
  }
  if (best.tokens > 0) {
    const uint64_t now = ++clock_;
    if (best_tail) best_tail->last_use = now;
    else at(best.owner)->last_use = now;
    best.tail = best_tail != nullptr;
  }
  return best;
}

bool RadixTree::insert_tail(NodeId id, const int32_t* tokens, int n, int32_t page, std::vector<int32_t>& released) {
  if (n <= 0 || n >= page_size_) throw std::invalid_argument("radix tree: a tail is 1 to page_size - 1 tokens");
  Node* node = at(id);
  const uint64_t now = ++clock_;
  for (size_t i = 0; i < node->tails.size(); ++i) {
    Node::Tail& t = node->tails[i];
    const size_t m = std::min(t.tokens.size(), static_cast<size_t>(n));
    if (!std::equal(t.tokens.begin(), t.tokens.begin() + static_cast<std::ptrdiff_t>(m), tokens)) continue;
    if (t.tokens.size() >= static_cast<size_t>(n) || t.copying > 0) {  // it holds ours, or is busy
      t.last_use = now;
      return false;
    }
    remove_tail(node, i, released);  // ours extends it
    break;
  }
  node->tails.push_back(Node::Tail{std::vector<int32_t>(tokens, tokens + n), page, now, 0});
  num_pages_ += 1;
  evictable_pages_ += 1;
  return true;
}

int64_t RadixTree::evict_path(NodeId id, const std::function<bool(NodeId)>& keep, std::vector<int32_t>& out) {
  auto it = nodes_.find(id);
  if (it == nodes_.end()) return 0;
  int64_t evicted = 0;
  Node* n = it->second.get();
  while (n != root_ && n->children.empty() && n->locks == 0 && !n->copying_tail() && !(keep && keep(n->id))) {
    Node* parent = n->parent;
    evicted += static_cast<int64_t>(n->pages.size() + n->tails.size());
    remove_leaf(n, out);
    n = parent;
  }
  return evicted;
}

void RadixTree::clear(std::vector<int32_t>& out) {
  for (const auto& kv : nodes_) {
    out.insert(out.end(), kv.second->pages.begin(), kv.second->pages.end());
    for (const Node::Tail& t : kv.second->tails) out.push_back(t.page);
  }
  nodes_.clear();
  auto root = std::make_unique<Node>();
  root_ = root.get();
  nodes_.emplace(kRoot, std::move(root));
  num_pages_ = evictable_pages_ = 0;
}

}  // namespace pyserve
