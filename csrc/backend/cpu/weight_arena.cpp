#include "backend/cpu/weight_arena.h"

#include <sys/mman.h>

#include <algorithm>
#include <cstdlib>
#include <new>

namespace pyserve::cpu {

namespace {
constexpr size_t kHugePage = size_t{2} << 20;
constexpr size_t kChunk = size_t{64} << 20;
}  // namespace

void WeightArena::Free::operator()(uint8_t* p) const { std::free(p); }

uint8_t* WeightArena::allocate(size_t bytes) {
  bytes = std::max<size_t>(64, (bytes + 63) / 64 * 64);
  std::lock_guard<std::mutex> lock(mutex_);
  if (chunks_.empty() || chunks_.back().size - chunks_.back().used < bytes) {
    const size_t size = (std::max(kChunk, bytes) + kHugePage - 1) / kHugePage * kHugePage;
    auto* p = static_cast<uint8_t*>(std::aligned_alloc(kHugePage, size));
    if (!p) throw std::bad_alloc();
    madvise(p, size, MADV_HUGEPAGE);  // advice only: without THP the memory is simply 4 KiB pages
    Chunk c;
    c.data.reset(p);
    c.size = size;
    chunks_.push_back(std::move(c));
  }
  Chunk& c = chunks_.back();
  uint8_t* out = c.data.get() + c.used;
  c.used += bytes;
  return out;
}

size_t WeightArena::reserved_bytes() const {
  std::lock_guard<std::mutex> lock(mutex_);
  size_t total = 0;
  for (const Chunk& c : chunks_) total += c.size;
  return total;
}

}  // namespace pyserve::cpu
