#pragma once
// Pages of the paged KV cache: which are free, and how many sequences hold each one. Pure
// bookkeeping (no memory of its own), so it is unit-tested without a model.
#include <cstdint>
#include <vector>

namespace pyserve {

class BlockPool {
 public:
  explicit BlockPool(int num_pages);

  int num_pages() const { return static_cast<int>(refs_.size()); }
  int num_free() const { return static_cast<int>(free_.size()); }
  int num_used() const { return num_pages() - num_free(); }

  // Appends n fresh pages (refcount 1) to out; all or nothing. Returns false if too few are free.
  bool allocate(int n, std::vector<int32_t>& out);
  void retain(int32_t page);   // one more holder (prefix sharing)
  void release(int32_t page);  // one holder fewer; the page is free again at zero
  // The prefix cache's own reference (at most one a page): as retain / release, and the pool
  // keeps count of the pages nobody else holds.
  void retain_for_cache(int32_t page);
  void release_from_cache(int32_t page);
  int num_cache_only() const { return cache_only_; }  // held by the prefix cache alone
  int refcount(int32_t page) const;
  void reset();  // every page free again

 private:
  void check(int32_t page) const;
  std::vector<int32_t> free_;  // a stack: recently freed pages are reused first (warm in cache)
  std::vector<int32_t> refs_;
  std::vector<uint8_t> cached_;  // the prefix cache holds one of refs_
  int cache_only_ = 0;           // pages with cached_ and refs_ == 1
};

}  // namespace pyserve
