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

void RadixTree::remove_leaf(Node* node, std::vector<int32_t>& out) {
  out.insert(out.end(), node->pages.begin(), node->pages.end());
  num_pages_ -= static_cast<int64_t>(node->pages.size());
  evictable_pages_ -= static_cast<int64_t>(node->pages.size());
  node->parent->children.erase(first_page(node->tokens.data()));
  nodes_.erase(node->id);  // node is gone after this line
}

int64_t RadixTree::evict(int64_t pages, std::vector<int32_t>& out) {
  // A min-heap of unlocked leaves by last use; a parent joins it when its last child goes.
  using Entry = std::pair<uint64_t, Node*>;
  auto later = [](const Entry& a, const Entry& b) { return a.first > b.first || (a.first == b.first && a.second->id > b.second->id); };
  std::priority_queue<Entry, std::vector<Entry>, decltype(later)> leaves(later);
  for (const auto& kv : nodes_) {
    Node* n = kv.second.get();
    if (n != root_ && n->children.empty() && n->locks == 0) leaves.emplace(n->last_use, n);
  }
  int64_t evicted = 0;
  while (evicted < pages && !leaves.empty()) {
    Node* n = leaves.top().second;
    leaves.pop();
    Node* parent = n->parent;
    evicted += static_cast<int64_t>(n->pages.size());
    remove_leaf(n, out);
    if (parent != root_ && parent->children.empty() && parent->locks == 0) leaves.emplace(parent->last_use, parent);
  }
  return evicted;
}

int64_t RadixTree::evict_path(NodeId id, const std::function<bool(NodeId)>& keep, std::vector<int32_t>& out) {
  auto it = nodes_.find(id);
  if (it == nodes_.end()) return 0;
  int64_t evicted = 0;
  Node* n = it->second.get();
  while (n != root_ && n->children.empty() && n->locks == 0 && !(keep && keep(n->id))) {
    Node* parent = n->parent;
    evicted += static_cast<int64_t>(n->pages.size());
    remove_leaf(n, out);
    n = parent;
  }
  return evicted;
}

void RadixTree::clear(std::vector<int32_t>& out) {
  for (const auto& kv : nodes_) out.insert(out.end(), kv.second->pages.begin(), kv.second->pages.end());
  nodes_.clear();
  auto root = std::make_unique<Node>();
  root_ = root.get();
  nodes_.emplace(kRoot, std::move(root));
  num_pages_ = evictable_pages_ = 0;
}

}  // namespace pyserve
