#pragma once
// The target's final hidden states of one sequence, by position (the row at position p drew token
// p + 1), kept for the drafts that read them: Medusa's heads the latest, an EAGLE draft every one
// it has not consumed yet. Pure bookkeeping.
#include <algorithm>
#include <cstddef>
#include <vector>

namespace pyserve {

class FeatureStore {
 public:
  int from() const { return from_; }                   // position of the first row held
  int count() const { return static_cast<int>(rows_.size() / dim_); }
  int end() const { return from_ + count(); }          // one past the last position held
  bool empty() const { return rows_.empty(); }
  const float* data() const { return rows_.data(); }   // [count, dim]
  const float* latest() const { return rows_.data() + rows_.size() - dim_; }

  // The row at position pos. A position held already is overwritten (a recompute after
  // preemption gives the same values); one past the end extends; any other starts afresh (the
  // positions between were never computed: prefix-cache hits). At most `cap` rows are held: past
  // it the oldest half go at once (one move per cap / 2 rows, not a move of the whole store per row).
  void put(int pos, const float* row, size_t dim, int cap) {
    if (dim_ != dim) {
      rows_.clear();
      dim_ = dim;
    }
    if (!rows_.empty() && pos >= from_ && pos < end()) {
      std::copy(row, row + dim, rows_.begin() + static_cast<std::ptrdiff_t>((pos - from_) * dim));
      return;
    }
    if (rows_.empty() || pos != end()) {
      rows_.clear();
      from_ = pos;
    }
    rows_.insert(rows_.end(), row, row + dim);
    if (count() > cap) drop_before(end() - cap / 2);
  }
  // Forgets the rows before position pos.
  void drop_before(int pos) {
    const int n = std::min(std::max(pos - from_, 0), count());
    rows_.erase(rows_.begin(), rows_.begin() + static_cast<std::ptrdiff_t>(static_cast<size_t>(n) * dim_));
    from_ += n;
  }
  void clear() { rows_.clear(); }

 private:
  int from_ = 0;
  size_t dim_ = 1;
  std::vector<float> rows_;
};

}  // namespace pyserve
