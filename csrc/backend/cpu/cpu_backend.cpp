#include "backend/cpu/cpu_backend.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <thread>

#include "backend/cpu/cpu_features.h"
#include "tensor/quant_blocks.h"

namespace pyserve::cpu {

AlignedFloats allocate_floats(size_t n) {
  const size_t bytes = std::max<size_t>(64, (n * sizeof(float) + 63) / 64 * 64);
  void* p = std::aligned_alloc(64, bytes);
  if (!p) throw std::bad_alloc();
  return AlignedFloats(static_cast<float*>(p));
}

PackedMatrix::PackedMatrix(int64_t n, int64_t k, FloatType type, std::shared_ptr<WeightArena> arena)
    : n_(n), k_(k), size_(0), type_(type), arena_(std::move(arena)) {
  // Every group but the last is full; the last is padded to whole panels.
  const int64_t full = n / kGroupRows;
  const int64_t rest = n - full * kGroupRows;
  const int64_t rest_width = (rest + kPanelRows - 1) / kPanelRows * kPanelRows;
  size_ = static_cast<size_t>((full * kGroupRows + rest_width) * k);
  data_ = arena_->allocate(size_ * element_bytes());
}

float PackedMatrix::at(int64_t row, int64_t col) const {
  const int64_t g = row / kGroupRows, j = row % kGroupRows;
  const int64_t valid = std::min<int64_t>(kGroupRows, n_ - g * kGroupRows);
  const int64_t width = (valid + kPanelRows - 1) / kPanelRows * kPanelRows;
  const int64_t i = g * kGroupRows * k_ + col * width + j;
  if (type_ == FloatType::F32) return reinterpret_cast<const float*>(data_)[i];
  uint16_t h;
  std::memcpy(&h, data_ + i * 2, 2);
  return type_ == FloatType::F16 ? f16_to_f32(h) : bf16_to_f32(h);
}

const KernelTable& select_kernels(const std::string& isa) {
  const CpuFeatures& f = cpu_features();
  // PYSERVE_ISA forces a path for "auto" (a lower one, to compare or to work around a fault).
  const char* forced = std::getenv("PYSERVE_ISA");
  const std::string want = isa != "auto" ? isa : forced && *forced ? std::string(forced) : f.best_isa();
  if (want == "scalar") return kernels_scalar();
#if defined(PYSERVE_X86)
  if (want == "avx2") {
    if (!f.avx2) throw std::invalid_argument("ISA avx2 is not supported by this CPU/OS");
    return kernels_avx2();
  }
  if (want == "avx512") {
    if (!f.avx512) throw std::invalid_argument("ISA avx512 is not supported by this CPU/OS");
    return kernels_avx512();
  }
  if (want == "avx512_vnni") {
    if (!f.avx512_vnni) throw std::invalid_argument("ISA avx512_vnni is not supported by this CPU/OS");
    return kernels_avx512_vnni();
  }
#endif
  throw std::invalid_argument("unknown ISA '" + want + "' (expected auto, avx512_vnni, avx512, avx2 or scalar)");
}

CpuBackend::CpuBackend(int num_threads, const KernelTable& kernels)
    : kernels_(kernels),
      pool_(num_threads > 0 ? num_threads : std::max(1u, std::thread::hardware_concurrency())),
      scratch_(pool_.size()),
      sink_parts_(pool_.size()) {}

namespace {
class HostBuffer final : public Buffer {
 public:
  explicit HostBuffer(size_t n) : n_(n), data_(allocate_floats(n)) {}
  float* data() override { return data_.get(); }
  size_t bytes() const override { return n_ * sizeof(float); }

 private:
  size_t n_;
  AlignedFloats data_;
};
}  // namespace

std::unique_ptr<Buffer> CpuBackend::allocate(size_t n_floats) {
  return std::make_unique<HostBuffer>(n_floats);
}

std::string CpuBackend::name() const { return std::string("cpu-") + kernels_.name; }

StackedMatrix::StackedMatrix(std::vector<std::unique_ptr<Matrix>> parts) : parts_(std::move(parts)) {
  for (const auto& p : parts_) rows_ += p->rows();
}

size_t StackedMatrix::bytes() const {
  size_t b = 0;
  for (const auto& p : parts_) b += p->bytes();
  return b;
}

std::unique_ptr<Matrix> CpuBackend::pack(const std::vector<const TensorView*>& parts) {
  if (parts.empty()) throw std::invalid_argument("pack: no tensors");
  const int64_t k = parts[0]->shape.at(1);
  // Parts of mixed types: each run of one type becomes its own matrix.
  for (size_t i = 1; i < parts.size(); ++i)
    if (parts[i]->dtype != parts[0]->dtype) {
      std::vector<std::unique_ptr<Matrix>> runs;
      for (size_t b = 0; b < parts.size();) {
        size_t e = b + 1;
        while (e < parts.size() && parts[e]->dtype == parts[b]->dtype) ++e;
        runs.push_back(pack(std::vector<const TensorView*>(parts.begin() + b, parts.begin() + e)));
        b = e;
      }
      return std::make_unique<StackedMatrix>(std::move(runs));
    }
  // Quantized types become quant panels: the file's codes, regrouped, never widened to float.
  PanelFormat pf;
  if (panel_format(parts[0]->dtype, &pf)) return std::make_unique<QuantPanels>(parts, pool_, arena_);
  int64_t n = 0;
  std::vector<std::pair<const TensorView*, int64_t>> row_owner;  // (part, first row) per part
  for (const TensorView* p : parts) {
    if (p->shape.size() != 2 || p->shape[1] != k)
      throw std::invalid_argument("pack: tensor '" + p->name + "' is not [rows, " + std::to_string(k) + "]");
    row_owner.emplace_back(p, n);
    n += p->shape[0];
  }
  // Float weights keep their type: f16 / bf16 rows are copied bit for bit, anything else (only
  // F32 reaches here) as float32.
  const DType dt = parts[0]->dtype;
  const FloatType ft = dt == DType::F16 ? FloatType::F16 : dt == DType::BF16 ? FloatType::BF16 : FloatType::F32;
  auto m = std::make_unique<PackedMatrix>(n, k, ft, arena_);
  uint8_t* dst = m->data();
  const int64_t eb = m->element_bytes();
  const int64_t groups = m->groups();
  pool_.parallel_for(groups, [&](int64_t gb, int64_t ge, int) {
    std::vector<float> row(static_cast<size_t>(k));
    for (int64_t g = gb; g < ge; ++g) {
      const int64_t valid = std::min<int64_t>(kGroupRows, n - g * kGroupRows);
      const int64_t width = (valid + kPanelRows - 1) / kPanelRows * kPanelRows;
      uint8_t* base = dst + g * kGroupRows * k * eb;
      std::memset(base, 0, static_cast<size_t>(width * k * eb));
      for (int64_t j = 0; j < valid; ++j) {
        const int64_t r = g * kGroupRows + j;
        size_t pi = row_owner.size() - 1;
        while (row_owner[pi].second > r) --pi;
        const TensorView* part = row_owner[pi].first;
        const int64_t first = (r - row_owner[pi].second) * k;
        if (ft == FloatType::F32) {
          part->to_f32(first, k, row.data());
          float* out = reinterpret_cast<float*>(base);
          for (int64_t c = 0; c < k; ++c) out[c * width + j] = row[c];
        } else {
          const uint16_t* src = static_cast<const uint16_t*>(part->data) + first;
          uint16_t* out = reinterpret_cast<uint16_t*>(base);
          for (int64_t c = 0; c < k; ++c) out[c * width + j] = src[c];
        }
      }
    }
  });
  return m;
}

void CpuBackend::matmul_quant(const QuantPanels& w, const float* x, int64_t ldx, int m, float* y, int64_t ldy,
                              const float* bias, bool accumulate) {
  const int64_t k = w.cols(), nb = k / kPanelBlock;
  const size_t need = static_cast<size_t>(m) * k;
  if (act_q_.size() < need) {  // grows to the largest batch once, then never on the hot path
    act_q_.resize(need);
    act_scale_.resize(static_cast<size_t>(m) * nb);
    act_qsum_.resize(static_cast<size_t>(m) * nb * 2);
  }
  QuantizeActsArgs qa;
  qa.x = x;
  qa.ldx = ldx;
  qa.k = k;
  qa.q = act_q_.data();
  qa.scale = act_scale_.data();
  qa.qsum = act_qsum_.data();
  auto quantize_rows = [&](int64_t b, int64_t e, int) {
    QuantizeActsArgs s = qa;
    s.x = x + b * ldx;
    s.m = static_cast<int>(e - b);
    s.q = qa.q + b * k;
    s.scale = qa.scale + b * nb;
    s.qsum = qa.qsum + b * nb * 2;
    kernels_.quantize_acts(s);
  };
  if (m < 8) quantize_rows(0, m, 0); else pool_.parallel_for(m, quantize_rows);

  QPanelArgs a;
  a.format = w.format();
  a.panels = w.data();
  a.panel_bytes = w.panel_bytes();
  a.n = w.rows();
  a.x.q = act_q_.data();
  a.x.scale = act_scale_.data();
  a.x.qsum = act_qsum_.data();
  a.x.k = k;
  a.m = m;
  a.y = y;
  a.ldy = ldy;
  a.bias = bias;
  a.accumulate = accumulate;
  a.row_begin = 0;
  a.row_end = m;
  // Threads split the panels: each streams its own weights once (per block of rows), in two
  // contiguous runs a thread (longer runs than the pool's default 4 keep the prefetchers going:
  // ~5% more decode speed measured on the 135M and 1.1B models).
  pool_.parallel_for(w.panels(), [&](int64_t b, int64_t e, int) {
    QPanelArgs s = a;
    s.panel_begin = b;
    s.panel_end = e;
    kernels_.qpanel_matmul(s);
  }, /*chunks_per_thread=*/2);
}

void CpuBackend::matmul(const Matrix& w, const float* x, int64_t ldx, int m, float* y, int64_t ldy,
                        const float* bias, bool accumulate) {
  if (const auto* qw = dynamic_cast<const QuantPanels*>(&w)) {
    matmul_quant(*qw, x, ldx, m, y, ldy, bias, accumulate);
    return;
  }
  if (const auto* sw = dynamic_cast<const StackedMatrix*>(&w)) {
    int64_t col = 0;
    for (const auto& p : sw->parts()) {
      matmul(*p, x, ldx, m, y + col, ldy, bias ? bias + col : nullptr, accumulate);
      col += p->rows();
    }
    return;
  }
  const auto& pw = static_cast<const PackedMatrix&>(w);
  GemmArgs a;
  a.x = x;
  a.ldx = ldx;
  a.w = pw.data();
  a.wtype = pw.type();
  a.bias = bias;
  a.y = y;
  a.ldy = ldy;
  a.m = m;
  a.n = static_cast<int>(pw.rows());
  a.k = static_cast<int>(pw.cols());
  a.accumulate = accumulate;
  pool_.parallel_for(pw.groups(), [&](int64_t gb, int64_t ge, int) {
    GemmArgs s = a;
    s.group_begin = static_cast<int>(gb);
    s.group_end = static_cast<int>(ge);
    kernels_.gemm(s);
  });
}

void CpuBackend::gather_rows(const Matrix& w, const int32_t* ids, int m, float* out) {
  for (int i = 0; i < m; ++i)
    if (ids[i] < 0 || ids[i] >= w.rows())
      throw std::out_of_range("token id " + std::to_string(ids[i]) + " outside the vocabulary of " +
                              std::to_string(w.rows()));
  if (const auto* qw = dynamic_cast<const QuantPanels*>(&w)) {
    // The embedding lookup reads the LM head's panels (tied weights: one copy).
    for (int i = 0; i < m; ++i) qw->dequantize_row(ids[i], out + static_cast<int64_t>(i) * qw->cols());
    return;
  }
  if (dynamic_cast<const StackedMatrix*>(&w)) throw std::invalid_argument("gather_rows: not on a stacked matrix");
  const auto& pw = static_cast<const PackedMatrix&>(w);
  const int64_t k = pw.cols();
  for (int i = 0; i < m; ++i)
    for (int64_t c = 0; c < k; ++c) out[i * k + c] = pw.at(ids[i], c);
}

void CpuBackend::rmsnorm(const float* x, int64_t ldx, const float* weight, int m, int dim, float eps,
                         float* y, int64_t ldy) {
  auto body = [&](int64_t b, int64_t e, int) {
    for (int64_t i = b; i < e; ++i) {
      const float* xi = x + i * ldx;
      float* yi = y + i * ldy;
      double ss = 0;
      for (int d = 0; d < dim; ++d) ss += static_cast<double>(xi[d]) * xi[d];
      const float inv = static_cast<float>(1.0 / std::sqrt(ss / dim + eps));
      for (int d = 0; d < dim; ++d) yi[d] = weight[d] * (xi[d] * inv);
    }
  };
  if (m < 16) body(0, m, 0); else pool_.parallel_for(m, body);
}

void CpuBackend::rope(float* x, int64_t ld, int m, int n_heads, int head_dim, const float* cos,
                      const float* sin) {
  const int half = head_dim / 2;
  auto body = [&](int64_t b, int64_t e, int) {
    for (int64_t i = b; i < e; ++i) {
      const float* c = cos + i * half;
      const float* s = sin + i * half;
      for (int h = 0; h < n_heads; ++h) {
        float* v = x + i * ld + static_cast<int64_t>(h) * head_dim;
        for (int d = 0; d < half; ++d) {
          const float a = v[d], b2 = v[d + half];
          v[d] = a * c[d] - b2 * s[d];
          v[d + half] = b2 * c[d] + a * s[d];
        }
      }
    }
  };
  if (m < 16) body(0, m, 0); else pool_.parallel_for(m, body);
}

void CpuBackend::write_kv(const float* k, const float* v, int64_t ld, int m, int n_kv_heads, int head_dim,
                          int page_size, const int64_t* slots, float* k_cache, float* v_cache) {
  const int64_t ps = page_size, hd = head_dim;
  for (int i = 0; i < m; ++i) {
    const int64_t page = slots[i] / ps, off = slots[i] % ps;
    for (int h = 0; h < n_kv_heads; ++h) {
      const float* ks = k + i * ld + h * hd;
      const float* vs = v + i * ld + h * hd;
      float* kt = k_cache + (page * n_kv_heads + h) * hd * ps + off;  // K page: [kvh][hd][ps]
      for (int64_t d = 0; d < hd; ++d) kt[d * ps] = ks[d];
      std::memcpy(v_cache + ((page * n_kv_heads + h) * ps + off) * hd, vs, hd * sizeof(float));  // V: [kvh][ps][hd]
    }
  }
}

namespace {

// Blocks of consecutive tokens of one sequence, at most max_block long: a prefill chunk's share
// each K/V load, a decode batch is one token per block. No block has tokens on both sides of
// position `boundary` (0: no boundary).
struct AttendBlock { int first, count; };
// Draft-tree leaves (AttentionBatch::own_slots) are left out: attention_of_leaves computes them.
std::vector<AttendBlock> attend_blocks(const AttentionBatch& b, int max_block, int boundary) {
  std::vector<AttendBlock> blocks;
  auto leaf = [&](int i) { return b.own_slots != nullptr && b.own_slots[i] >= 0; };
  for (int i = 0; i < b.n_tokens;) {
    if (leaf(i)) {
      ++i;
      continue;
    }
    const bool above = b.positions[i] >= boundary;
    int n = 1;
    while (i + n < b.n_tokens && n < max_block && b.token_seq[i + n] == b.token_seq[i] &&
           b.positions[i + n] == b.positions[i] + n && (b.positions[i + n] >= boundary) == above && !leaf(i + n))
      ++n;
    blocks.push_back({i, n});
    i += n;
  }
  return blocks;
}

// The kernel's arguments for one block against KV head kvh, writing into b.out.
AttendArgs attend_args(const AttentionBatch& b, const AttendBlock& bl, int kvh, float* scratch) {
  const int group = b.n_heads / b.n_kv_heads;
  AttendArgs a;
  a.q = b.q + bl.first * b.q_stride + static_cast<int64_t>(kvh) * group * b.head_dim;
  a.q_stride = b.q_stride;
  a.out = b.out + bl.first * b.out_stride + static_cast<int64_t>(kvh) * group * b.head_dim;
  a.out_stride = b.out_stride;
  a.n_tokens = bl.count;
  a.group = group;
  a.head_dim = b.head_dim;
  a.scale = b.scale;
  a.k_cache = b.k_cache;
  a.v_cache = b.v_cache;
  a.n_kv_heads = b.n_kv_heads;
  a.kv_head = kvh;
  a.page_size = b.page_size;
  a.page_table = b.table_of(bl.first);
  a.positions = b.positions + bl.first;
  a.window = b.window;
  a.scratch = scratch;
  return a;
}

// One query's attention over disjoint position ranges, each attended on its own: out = sum_s w_s
// part_s / sum_s w_s, w_s = sum_s * exp(max_s - max), each part's normalised output weighted by
// its share of the whole softmax. Part s: its output at part + s * part_stride, its (max, sum of
// exp) at stats + s * stats_stride; an empty part has sum 0.
void merge_parts(int parts, const float* part, size_t part_stride, const float* stats, size_t stats_stride, int hd,
                 float* out) {
  float m = -INFINITY;
  for (int s = 0; s < parts; ++s) m = std::max(m, stats[s * stats_stride]);
  float total = 0.f;
  for (int d = 0; d < hd; ++d) out[d] = 0.f;
  for (int s = 0; s < parts; ++s) {
    const float* st = stats + s * stats_stride;
    if (st[1] == 0.f) continue;
    const float w = st[1] * std::exp(st[0] - m);
    total += w;
    const float* p = part + s * part_stride;
    for (int d = 0; d < hd; ++d) out[d] += w * p[d];
  }
  const float inv = 1.f / total;
  for (int d = 0; d < hd; ++d) out[d] *= inv;
}

}  // namespace

void CpuBackend::copy_kv_slot(int n_kv_heads, int head_dim, int page_size, int64_t src, int64_t dst, float* k_cache,
                              float* v_cache) {
  const int64_t ps = page_size, hd = head_dim;
  const int64_t sp = src / ps, so = src % ps, dp = dst / ps, d_off = dst % ps;
  for (int64_t h = 0; h < n_kv_heads; ++h) {
    const float* ks = k_cache + (sp * n_kv_heads + h) * hd * ps + so;  // K page: [kvh][hd][ps]
    float* kd = k_cache + (dp * n_kv_heads + h) * hd * ps + d_off;
    for (int64_t d = 0; d < hd; ++d) kd[d * ps] = ks[d * ps];
    std::memmove(v_cache + ((dp * n_kv_heads + h) * ps + d_off) * hd, v_cache + ((sp * n_kv_heads + h) * ps + so) * hd,
                 hd * sizeof(float));  // V: [kvh][ps][hd]
  }
}

// Each draft-tree leaf: its path (positions before its own, a segment the kernel attends to with
// its softmax statistics) merged with its own K/V, one more score.
void CpuBackend::attention_of_leaves(const AttentionBatch& b) {
  std::vector<int> leaves;
  for (int i = 0; i < b.n_tokens; ++i)
    if (b.own_slots[i] >= 0) leaves.push_back(i);
  if (leaves.empty()) return;
  const int group = b.n_heads / b.n_kv_heads, hd = b.head_dim;
  const int64_t ps = b.page_size, nkv = b.n_kv_heads;
  int max_span = 1;
  for (int i : leaves) max_span = std::max(max_span, b.positions[i]);
  for (auto& s : scratch_)
    if (s.size() < static_cast<size_t>(group) * (max_span + 1) + static_cast<size_t>(group) * (hd + 2))
      s.resize(static_cast<size_t>(group) * (max_span + 1) + static_cast<size_t>(group) * (hd + 2));
  const int64_t items = static_cast<int64_t>(leaves.size()) * b.n_kv_heads;
  pool_.parallel_for(items, [&](int64_t ib, int64_t ie, int t) {
    for (int64_t it = ib; it < ie; ++it) {
      const int i = leaves[static_cast<size_t>(it / b.n_kv_heads)];
      const int kvh = static_cast<int>(it % b.n_kv_heads);
      const int pos = b.positions[i];
      float* part = scratch_[t].data();                        // [group][hd]
      float* stats = part + static_cast<size_t>(group) * hd;   // [group][2]
      AttendArgs a = attend_args(b, {i, 1}, kvh, stats + 2 * group);
      a.seg_lo = b.window > 0 ? std::max(0, pos - b.window + 1) : 0;
      a.seg_hi = pos - 1;  // its parent's path (a leaf is never at position 0)
      a.out = part;
      a.out_stride = static_cast<int64_t>(group) * hd;
      a.stats = stats;
      kernels_.attend(a);
      const int64_t slot = b.own_slots[i], page = slot / ps, off = slot % ps;
      const float* kt = b.k_cache + (page * nkv + kvh) * hd * ps + off;  // [hd] at stride ps
      const float* v = b.v_cache + ((page * nkv + kvh) * ps + off) * hd;
      for (int g = 0; g < group; ++g) {
        const float* q = b.q + i * b.q_stride + (static_cast<int64_t>(kvh) * group + g) * hd;
        float dot = 0.f;
        for (int d = 0; d < hd; ++d) dot += q[d] * kt[static_cast<int64_t>(d) * ps];
        const float own = dot * b.scale, m0 = stats[2 * g], s0 = stats[2 * g + 1];
        const float m = std::max(m0, own);
        const float w0 = s0 * std::exp(m0 - m), w1 = std::exp(own - m);
        const float* p0 = part + static_cast<size_t>(g) * hd;
        float* out = b.out + i * b.out_stride + (static_cast<int64_t>(kvh) * group + g) * hd;
        for (int d = 0; d < hd; ++d) out[d] = (w0 * p0[d] + w1 * v[d]) / (w0 + w1);
      }
    }
  });
}

void CpuBackend::attention(const AttentionBatch& b) {
  if (b.own_slots) {
    if (b.sink > 0 && b.window > 0) throw std::invalid_argument("attention: draft trees with an attention sink are not supported");
    attention_of_leaves(b);
  }
  if (b.sink > 0 && b.window > 0) {
    attention_with_sink(b);
    return;
  }
  const int group = b.n_heads / b.n_kv_heads, hd = b.head_dim;
  // The first position a token at `pos` attends to (its sliding window's start, or 0).
  auto window_start = [&](int pos) { return b.window > 0 ? std::max(0, pos - b.window + 1) : 0; };
  const std::vector<AttendBlock> blocks = attend_blocks(b, std::max(1, std::min(8, kMaxAttendQueries / group)), 0);
  size_t need = 0;
  for (const AttendBlock& bl : blocks) {
    const int hi = b.positions[bl.first + bl.count - 1];
    const int lo = window_start(b.positions[bl.first]);
    need = std::max(need, static_cast<size_t>(bl.count) * group * (hi - lo + 1));
  }
  const int64_t items = static_cast<int64_t>(blocks.size()) * b.n_kv_heads;
  // Decode batches with fewer (sequence, KV head) items than the pool can keep busy split each
  // item's positions into segments (flash-decoding), merged below by their softmax statistics.
  int splits = 1;
  bool singles = true;
  int max_span = 0;
  for (const AttendBlock& bl : blocks) {
    singles = singles && bl.count == 1;
    const int hi = b.positions[bl.first];
    const int lo = window_start(hi);
    max_span = std::max(max_span, hi - lo + 1);
  }
  const int64_t want = 4 * static_cast<int64_t>(pool_.size());
  if (singles && pool_.size() > 1 && items < want)
    splits = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((want + items - 1) / items, max_span / 64)));
  if (splits > 1) need = static_cast<size_t>(group) * ((max_span + splits - 1) / splits);
  for (auto& s : scratch_)
    if (s.size() < need) s.resize(need);
  const size_t part_floats = static_cast<size_t>(items) * splits * group * hd;
  if (splits > 1 && split_out_.size() < part_floats) {
    split_out_.resize(part_floats);
    split_stats_.resize(static_cast<size_t>(items) * splits * group * 2);
  }
  pool_.parallel_for(items * splits, [&](int64_t ib, int64_t ie, int t) {
    for (int64_t job = ib; job < ie; ++job) {
      const int64_t it = job / splits;
      const int seg = static_cast<int>(job % splits);
      const AttendBlock& bl = blocks[it / b.n_kv_heads];
      AttendArgs a = attend_args(b, bl, static_cast<int>(it % b.n_kv_heads), scratch_[t].data());
      if (splits > 1) {
        const int hi = b.positions[bl.first];
        const int lo = window_start(hi);
        const int len = (hi - lo + 1 + splits - 1) / splits;
        a.seg_lo = lo + seg * len;
        a.seg_hi = std::min(hi, a.seg_lo + len - 1);
        a.out = split_out_.data() + static_cast<size_t>(job) * group * hd;
        a.out_stride = static_cast<int64_t>(group) * hd;
        a.stats = split_stats_.data() + static_cast<size_t>(job) * group * 2;
        if (a.seg_lo > a.seg_hi) {  // past the end of a short sequence: an empty segment
          for (int g = 0; g < group; ++g) {
            a.stats[2 * g] = -INFINITY;
            a.stats[2 * g + 1] = 0.f;
          }
          continue;
        }
      }
      kernels_.attend(a);
    }
  });
  if (splits == 1) return;
  // split_out_: [items][splits][group][hd]; split_stats_: [items][splits][group][2]
  for (int64_t it = 0; it < items; ++it) {
    const AttendBlock& bl = blocks[it / b.n_kv_heads];
    const int kvh = static_cast<int>(it % b.n_kv_heads);
    for (int g = 0; g < group; ++g)
      merge_parts(splits, split_out_.data() + (it * splits * group + g) * static_cast<size_t>(hd),
                  static_cast<size_t>(group) * hd, split_stats_.data() + (it * splits * group + g) * 2,
                  static_cast<size_t>(group) * 2, hd,
                  b.out + bl.first * b.out_stride + (static_cast<int64_t>(kvh) * group + g) * hd);
  }
}

// Attention sinks (StreamingLLM): a token at pos >= sink attends to [0, sink) and to its window
// [max(sink, pos - window + 1), pos]. The two ranges are disjoint: each is attended on its own, as
// a segment of a split decode is, and the halves are merged by their softmax statistics. Tokens
// at pos < sink attend to [0, pos], as without a window.
void CpuBackend::attention_with_sink(const AttentionBatch& b) {
  const int group = b.n_heads / b.n_kv_heads, hd = b.head_dim, sink = b.sink;
  // Blocks lie on one side of the sink's end: two halves after it, one range before.
  const std::vector<AttendBlock> blocks = attend_blocks(b, std::max(1, std::min(8, kMaxAttendQueries / group)), sink);
  auto halves = [&](const AttendBlock& bl) { return b.positions[bl.first] >= sink; };
  size_t scores = 0, parts = 0;
  for (const AttendBlock& bl : blocks) {
    const int hi = b.positions[bl.first + bl.count - 1];
    const int lo = halves(bl) ? std::max(sink, b.positions[bl.first] - b.window + 1) : 0;
    const int span = halves(bl) ? std::max(sink, hi - lo + 1) : hi + 1;
    scores = std::max(scores, static_cast<size_t>(bl.count) * group * span);
    if (halves(bl)) parts = std::max(parts, static_cast<size_t>(bl.count) * group * (2 * hd + 4));
  }
  for (auto& s : scratch_)
    if (s.size() < scores) s.resize(scores);
  for (auto& s : sink_parts_)
    if (s.size() < parts) s.resize(parts);
  const int64_t items = static_cast<int64_t>(blocks.size()) * b.n_kv_heads;
  pool_.parallel_for(items, [&](int64_t ib, int64_t ie, int t) {
    for (int64_t it = ib; it < ie; ++it) {
      const AttendBlock& bl = blocks[it / b.n_kv_heads];
      AttendArgs a = attend_args(b, bl, static_cast<int>(it % b.n_kv_heads), scratch_[t].data());
      if (!halves(bl)) {  // [0, pos]
        a.window = 0;
        kernels_.attend(a);
        continue;
      }
      // sink_parts_[t]: [2][count][group][hd] outputs, then [2][count * group][2] statistics
      const int nq = bl.count * group;
      float* out = sink_parts_[t].data();
      float* stats = out + static_cast<size_t>(2 * nq) * hd;
      AttendArgs half = a;
      half.out_stride = static_cast<int64_t>(group) * hd;
      for (int h = 0; h < 2; ++h) {
        half.window = h == 0 ? 0 : b.window;
        half.seg_lo = h == 0 ? 0 : sink;
        half.seg_hi = h == 0 ? sink - 1 : std::numeric_limits<int>::max();
        half.out = out + static_cast<size_t>(h * nq) * hd;
        half.stats = stats + 2 * h * nq;
        kernels_.attend(half);
      }
      for (int q = 0; q < nq; ++q)
        merge_parts(2, out + static_cast<size_t>(q) * hd, static_cast<size_t>(nq) * hd, stats + 2 * q,
                    static_cast<size_t>(2 * nq), hd, a.out + (q / group) * b.out_stride + (q % group) * hd);
    }
  });
}

void CpuBackend::silu_mul(const float* gate_up, int m, int inter, float* out) {
  auto body = [&](int64_t b, int64_t e, int) {
    for (int64_t i = b; i < e; ++i) {
      const float* g = gate_up + i * 2 * inter;
      const float* u = g + inter;
      float* o = out + i * inter;
      kernels_.silu_mul(g, u, o, inter);
    }
  };
  if (m < 4) body(0, m, 0); else pool_.parallel_for(m, body);
}

// --- Gemma 3's ops --------------------------------------------------------------------------

void CpuBackend::gelu_tanh_mul(const float* gate_up, int m, int inter, float* out) {
  // PyTorch's gelu(approximate="tanh"): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
  constexpr float kBeta = 0.7978845608028654f;  // sqrt(2 / pi)
  constexpr float kKappa = 0.044715f;
  auto body = [&](int64_t b, int64_t e, int) {
    for (int64_t i = b; i < e; ++i) {
      const float* g = gate_up + i * 2 * inter;
      const float* u = g + inter;
      float* o = out + i * inter;
      for (int d = 0; d < inter; ++d) {
        const float x = g[d];
        const float inner = kBeta * (x + kKappa * x * x * x);
        o[d] = 0.5f * x * (1.f + std::tanh(inner)) * u[d];
      }
    }
  };
  if (m < 4) body(0, m, 0); else pool_.parallel_for(m, body);
}

namespace {
// y = x / rms(x) * weight over one vector of `dim` (y may be x); the sum of squares in double.
inline void rms_row(const float* x, const float* weight, int dim, float eps, float* y, bool add) {
  double ss = 0;
  for (int d = 0; d < dim; ++d) ss += static_cast<double>(x[d]) * x[d];
  const float inv = static_cast<float>(1.0 / std::sqrt(ss / dim + eps));
  if (add) {
    for (int d = 0; d < dim; ++d) y[d] += weight[d] * (x[d] * inv);
  } else {
    for (int d = 0; d < dim; ++d) y[d] = weight[d] * (x[d] * inv);
  }
}
}  // namespace

void CpuBackend::rmsnorm_heads(float* x, int64_t ld, int m, int n_heads, int head_dim, const float* weight,
                               float eps) {
  auto body = [&](int64_t b, int64_t e, int) {
    for (int64_t i = b; i < e; ++i)
      for (int h = 0; h < n_heads; ++h) {
        float* v = x + i * ld + static_cast<int64_t>(h) * head_dim;
        rms_row(v, weight, head_dim, eps, v, false);
      }
  };
  if (m < 16) body(0, m, 0); else pool_.parallel_for(m, body);
}

void CpuBackend::rmsnorm_add(const float* x, int64_t ldx, const float* weight, int m, int dim, float eps,
                             float* y, int64_t ldy) {
  auto body = [&](int64_t b, int64_t e, int) {
    for (int64_t i = b; i < e; ++i) rms_row(x + i * ldx, weight, dim, eps, y + i * ldy, true);
  };
  if (m < 16) body(0, m, 0); else pool_.parallel_for(m, body);
}

void CpuBackend::scale(float* x, int64_t n, float s) {
  for (int64_t i = 0; i < n; ++i) x[i] *= s;
}

}  // namespace pyserve::cpu

namespace pyserve {
std::shared_ptr<Backend> make_cpu_backend(int num_threads, const std::string& isa) {
  return std::make_shared<cpu::CpuBackend>(num_threads, cpu::select_kernels(isa));
}
}  // namespace pyserve
