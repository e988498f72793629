#include "cache/block_pool.h"

#include <algorithm>
#include <stdexcept>
#include <string>

namespace pyserve {

BlockPool::BlockPool(int num_pages)
    : refs_(num_pages > 0 ? num_pages : 0, 0), cached_(num_pages > 0 ? num_pages : 0, 0) {
  if (num_pages <= 0) throw std::invalid_argument("BlockPool needs at least one page");
  free_.reserve(num_pages);
  reset();
}

void BlockPool::reset() {
  free_.clear();
  for (int i = num_pages() - 1; i >= 0; --i) free_.push_back(i);
  std::fill(refs_.begin(), refs_.end(), 0);
  std::fill(cached_.begin(), cached_.end(), 0);
  cache_only_ = 0;
}

void BlockPool::check(int32_t page) const {
  if (page < 0 || page >= num_pages()) throw std::out_of_range("page " + std::to_string(page) + " out of range");
}

bool BlockPool::allocate(int n, std::vector<int32_t>& out) {
  if (n < 0 || n > num_free()) return false;
  for (int i = 0; i < n; ++i) {
    const int32_t p = free_.back();
    free_.pop_back();
    refs_[p] = 1;
    out.push_back(p);
  }
  return true;
}

void BlockPool::retain(int32_t page) {
  check(page);
  if (refs_[page] == 0) throw std::logic_error("retain of a free page");
  if (cached_[page] && refs_[page] == 1) --cache_only_;
  ++refs_[page];
}

void BlockPool::release(int32_t page) {
  check(page);
  if (refs_[page] == 0) throw std::logic_error("release of a free page " + std::to_string(page));
  if (--refs_[page] == 0) free_.push_back(page);
  else if (cached_[page] && refs_[page] == 1) ++cache_only_;
}

void BlockPool::retain_for_cache(int32_t page) {
  check(page);
  if (cached_[page]) throw std::logic_error("page " + std::to_string(page) + " is in the prefix cache already");
  retain(page);
  cached_[page] = 1;
}

void BlockPool::release_from_cache(int32_t page) {
  check(page);
  if (!cached_[page]) throw std::logic_error("page " + std::to_string(page) + " is not in the prefix cache");
  if (refs_[page] == 1) --cache_only_;
  cached_[page] = 0;
  release(page);
}

int BlockPool::refcount(int32_t page) const {
  check(page);
  return refs_[page];
}

}  // namespace pyserve
