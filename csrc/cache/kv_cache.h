#pragma once
#include <cstdint>
#include <memory>

#include "backend/backend.h"

namespace pyserve {

// The paged KV cache's storage: for each layer, a K block then a V block of
// num_pages * page_size * kv_dim floats each (kv_dim = n_kv_heads * head_dim); layers follow one
// another: [num_layers][K, V][num_pages * page_size * kv_dim].
// The order inside a page is the backend's (its write_kv is the only writer, its attention the
// only reader). The CPU backend (backend/cpu: write_kv in cpu_backend.cpp, attend_* in kernels_*)
// keeps, per layer:
//   K: [num_pages, n_kv_heads, head_dim, page_size]  -- transposed inside a page: q·K runs as
//      vector FMAs across a page's slots
//   V: [num_pages, n_kv_heads, page_size, head_dim]  -- a contiguous row per slot for out += p·V
// Position pos of a sequence lives on page = page_table[pos / page_size] at off = pos % page_size:
// its K is K(page, h, :, off) (stride page_size), its V is the row V(page, h, off, :). So a token's
// K is not a [kv_dim] row, and no [num_pages * page_size, kv_dim] view of either block is right.
// Which pages belong to which sequence is the BlockPool's and the scheduler's business.
class KVCache {
 public:
  KVCache(Backend& backend, int num_layers, int num_pages, int page_size, int kv_dim)
      : backend_(backend),
        num_layers_(num_layers), num_pages_(num_pages), page_size_(page_size), kv_dim_(kv_dim),
        layer_floats_(static_cast<int64_t>(num_pages) * page_size * kv_dim),
        buffer_(backend.allocate(static_cast<size_t>(layer_floats_) * 2 * num_layers)) {}

  int num_layers() const { return num_layers_; }
  int num_pages() const { return num_pages_; }
  int page_size() const { return page_size_; }
  int kv_dim() const { return kv_dim_; }
  int64_t capacity_tokens() const { return static_cast<int64_t>(num_pages_) * page_size_; }
  size_t bytes() const { return buffer_->bytes(); }
  float* k(int layer) { return buffer_->data() + 2 * layer * layer_floats_; }
  float* v(int layer) { return k(layer) + layer_floats_; }

  // Page dst of every layer becomes a copy of page src (a prefix-cache hit on part of a page). A
  // page is one contiguous block of page_size * kv_dim values in K and in V, whatever the order
  // inside it.
  void copy_page(int src, int dst) {
    const size_t page = static_cast<size_t>(page_size_) * kv_dim_;
    for (int l = 0; l < num_layers_; ++l) {
      backend_.copy(k(l) + dst * page, k(l) + src * page, page);
      backend_.copy(v(l) + dst * page, v(l) + src * page, page);
    }
  }

  // Bytes per cached token, for sizing the cache from a memory budget.
  static size_t bytes_per_token(int num_layers, int kv_dim) {
    return static_cast<size_t>(num_layers) * 2 * kv_dim * sizeof(float);
  }

 private:
  Backend& backend_;
  int num_layers_, num_pages_, page_size_, kv_dim_;
  int64_t layer_floats_;
  std::unique_ptr<Buffer> buffer_;
};

}  // namespace pyserve
