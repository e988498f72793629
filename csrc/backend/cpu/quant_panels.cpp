#include "backend/cpu/quant_panels.h"

#include <algorithm>
#include <cstring>
#include <new>
#include <stdexcept>
#include <string>

#include "tensor/dequantize.h"
#include "tensor/quant_blocks.h"

namespace pyserve::cpu {

static_assert(kPanelBlock == kQK, "a panel record is one legacy block");
static_assert(kQK_K % kPanelBlock == 0, "a K-quant super-block is whole records");
static_assert(kPanelLanes * 4 == kPanelChunk, "a chunk is one 32-bit word per lane");

namespace {

PanelFormat make_format(PanelCodes codes, bool kquant, bool per16, bool stored_min, int offset) {
  PanelFormat f;
  f.codes = codes;
  f.kquant = kquant;
  f.per16 = per16;
  f.stored_min = stored_min;
  f.offset = offset;
  f.group_records = kquant ? kKGroup : 1;
  f.header_bytes = kquant ? kPanelLanes * 2 * (stored_min ? 2 : 1) : 0;
  f.code_bytes = (codes == PanelCodes::S8 ? 8 : 4 + panel_high_bits(codes)) * kPanelChunk;
  f.scale_bytes = kPanelLanes * (per16 ? 2 : 1) * (kquant ? 1 : 2);
  f.record_bytes = f.code_bytes + f.scale_bytes * (stored_min ? 2 : 1);
  f.group_bytes = f.header_bytes + f.group_records * f.record_bytes;
  return f;
}

// One 32-weight block of a row, decoded. Legacy formats: w[j] = d * code[j] + m (stored min) or
// d * (code[j] + offset), d and m the file's f16 bits. K-quants: scale = d * sc[h] and
// min = -(dmin * mc[h]) (h = j / 16 for per16 formats, else 0), d and dmin the super-block's f16.
struct Block32 {
  int code[kPanelBlock];
  uint16_t d = 0, m = 0;  // f16 bits: legacy d, m; K-quant d, dmin
  int sc[2] = {0, 0}, mc[2] = {0, 0};
};

// out: the k / 32 blocks of one row (the same arithmetic as csrc/tensor/dequantize.cpp, which
// the tests hold both to).
void decode_row(DType t, const uint8_t* row, int64_t k, Block32* out) {
  const int64_t nb = k / kPanelBlock;
  switch (t) {
    case DType::Q4_0:
    case DType::Q4_1:
    case DType::Q5_0:
    case DType::Q5_1:
    case DType::Q8_0:
      for (int64_t b = 0; b < nb; ++b) {
        Block32& o = out[b];
        if (t == DType::Q8_0) {
          const auto* blk = reinterpret_cast<const BlockQ8_0*>(row) + b;
          o.d = blk->d;
          for (int j = 0; j < kQK; ++j) o.code[j] = blk->qs[j];
        } else if (t == DType::Q4_0 || t == DType::Q4_1) {
          const uint8_t* qs;
          if (t == DType::Q4_0) {
            const auto* blk = reinterpret_cast<const BlockQ4_0*>(row) + b;
            o.d = blk->d;
            qs = blk->qs;
          } else {
            const auto* blk = reinterpret_cast<const BlockQ4_1*>(row) + b;
            o.d = blk->d;
            o.m = blk->m;
            qs = blk->qs;
          }
          for (int j = 0; j < kQK / 2; ++j) {
            o.code[j] = qs[j] & 0x0F;
            o.code[j + kQK / 2] = qs[j] >> 4;
          }
        } else {
          const uint8_t *qs, *qhp;
          if (t == DType::Q5_0) {
            const auto* blk = reinterpret_cast<const BlockQ5_0*>(row) + b;
            o.d = blk->d;
            qs = blk->qs;
            qhp = blk->qh;
          } else {
            const auto* blk = reinterpret_cast<const BlockQ5_1*>(row) + b;
            o.d = blk->d;
            o.m = blk->m;
            qs = blk->qs;
            qhp = blk->qh;
          }
          uint32_t qh;
          std::memcpy(&qh, qhp, 4);
          for (int j = 0; j < kQK / 2; ++j) {
            o.code[j] = (qs[j] & 0x0F) | (((qh >> j) << 4) & 0x10);
            o.code[j + kQK / 2] = (qs[j] >> 4) | ((qh >> (j + 12)) & 0x10);
          }
        }
      }
      return;
    case DType::Q2_K:
      for (int64_t sb = 0; sb < k / kQK_K; ++sb) {
        const auto& blk = reinterpret_cast<const BlockQ2_K*>(row)[sb];
        for (int n = 0; n < 2; ++n)
          for (int j = 0; j < 4; ++j) {
            Block32& o = out[sb * 8 + n * 4 + j];
            o.d = blk.d;
            o.m = blk.dmin;
            for (int half = 0; half < 2; ++half) {
              const uint8_t sc = blk.scales[n * 8 + j * 2 + half];
              o.sc[half] = sc & 0xF;
              o.mc[half] = sc >> 4;
              for (int l = 0; l < 16; ++l) o.code[half * 16 + l] = (blk.qs[n * 32 + l + 16 * half] >> (2 * j)) & 3;
            }
          }
      }
      return;
    case DType::Q3_K:
      for (int64_t sb = 0; sb < k / kQK_K; ++sb) {
        const auto& blk = reinterpret_cast<const BlockQ3_K*>(row)[sb];
        int8_t scales[16];
        q3_k_scales(blk.scales, scales);
        for (int n = 0; n < 2; ++n)
          for (int j = 0; j < 4; ++j) {
            Block32& o = out[sb * 8 + n * 4 + j];
            o.d = blk.d;
            const uint8_t m = static_cast<uint8_t>(1u << (n * 4 + j));
            for (int half = 0; half < 2; ++half) {
              o.sc[half] = scales[n * 8 + j * 2 + half] - 32;
              for (int l = 0; l < 16; ++l) {
                const int kk = l + 16 * half;
                o.code[kk] = ((blk.qs[n * 32 + kk] >> (2 * j)) & 3) + ((blk.hmask[kk] & m) ? 4 : 0);
              }
            }
          }
      }
      return;
    case DType::Q4_K:
    case DType::Q5_K:
      for (int64_t sb = 0; sb < k / kQK_K; ++sb) {
        const bool five = t == DType::Q5_K;
        const uint8_t* scales;
        const uint8_t *qs, *qh = nullptr;
        f16_bits dd, dm;
        if (five) {
          const auto& blk = reinterpret_cast<const BlockQ5_K*>(row)[sb];
          scales = blk.scales, qs = blk.qs, qh = blk.qh, dd = blk.d, dm = blk.dmin;
        } else {
          const auto& blk = reinterpret_cast<const BlockQ4_K*>(row)[sb];
          scales = blk.scales, qs = blk.qs, dd = blk.d, dm = blk.dmin;
        }
        for (int is = 0; is < 8; ++is) {
          Block32& o = out[sb * 8 + is];
          uint8_t sc, m;
          scale_min_k4(is, scales, &sc, &m);
          o.d = dd;
          o.m = dm;
          o.sc[0] = o.sc[1] = sc;
          o.mc[0] = o.mc[1] = m;
          const uint8_t* q = qs + (is / 2) * 32;
          for (int l = 0; l < 32; ++l) {
            int c = is % 2 ? q[l] >> 4 : q[l] & 0xF;
            if (five && (qh[l] & (1u << is))) c += 16;
            o.code[l] = c;
          }
        }
      }
      return;
    case DType::Q6_K:
      for (int64_t sb = 0; sb < k / kQK_K; ++sb) {
        const auto& blk = reinterpret_cast<const BlockQ6_K*>(row)[sb];
        for (int n = 0; n < 2; ++n) {
          const uint8_t* ql = blk.ql + n * 64;
          const uint8_t* qh = blk.qh + n * 32;
          const int8_t* sc = blk.scales + n * 8;
          for (int part = 0; part < 4; ++part) {  // y[n*128 + part*32 + l]
            Block32& o = out[sb * 8 + n * 4 + part];
            o.d = blk.d;
            for (int half = 0; half < 2; ++half) o.sc[half] = sc[half + 2 * part];
            for (int l = 0; l < 32; ++l) {
              const uint8_t lbyte = ql[l + (part & 1) * 32];
              const int lo4 = part < 2 ? (lbyte & 0xF) : (lbyte >> 4);
              const int hi2 = (qh[l] >> (2 * part)) & 3;
              o.code[l] = lo4 | (hi2 << 4);
            }
          }
        }
      }
      return;
    default:
      throw std::invalid_argument(std::string("quant panels: no panel format for ") + dtype_info(t).name);
  }
}

}  // namespace

bool panel_format(DType type, PanelFormat* out) {
  using C = PanelCodes;
  switch (type) {
    case DType::Q4_0: *out = make_format(C::U4, false, false, false, -8); return true;
    case DType::Q4_1: *out = make_format(C::U4, false, false, true, 0); return true;
    case DType::Q5_0: *out = make_format(C::U5, false, false, false, -16); return true;
    case DType::Q5_1: *out = make_format(C::U5, false, false, true, 0); return true;
    case DType::Q8_0: *out = make_format(C::S8, false, false, false, 0); return true;
    case DType::Q2_K: *out = make_format(C::U4, true, true, true, 0); return true;
    case DType::Q3_K: *out = make_format(C::U4, true, true, false, -4); return true;
    case DType::Q4_K: *out = make_format(C::U4, true, false, true, 0); return true;
    case DType::Q5_K: *out = make_format(C::U5, true, false, true, 0); return true;
    case DType::Q6_K: *out = make_format(C::U6, true, true, false, -32); return true;
    default: return false;
  }
}

QuantPanels::QuantPanels(const std::vector<const TensorView*>& parts, ThreadPool& pool,
                         std::shared_ptr<WeightArena> arena) {
  if (parts.empty()) throw std::invalid_argument("quant panels: no tensors");
  type_ = parts[0]->dtype;
  if (!panel_format(type_, &format_))
    throw std::invalid_argument(std::string("quant panels: no panel format for ") + dtype_info(type_).name);
  k_ = parts[0]->shape.at(1);
  const int block = dtype_info(type_).block_elems;
  n_ = 0;
  std::vector<int64_t> first_row;
  for (const TensorView* p : parts) {
    if (p->dtype != type_ || p->shape.size() != 2 || p->shape[1] != k_ || k_ % block != 0)
      throw std::invalid_argument("quant panels: '" + p->name + "' is not [rows, " + std::to_string(k_) + "] of " +
                                  dtype_info(type_).name + " in whole blocks");
    first_row.push_back(n_);
    n_ += p->shape[0];
  }
  const int64_t nb = k_ / kPanelBlock;
  panels_ = (n_ + kPanelLanes - 1) / kPanelLanes;
  if (nb % format_.group_records != 0)
    throw std::invalid_argument("quant panels: k is not whole groups of " + std::to_string(format_.group_records) + " blocks");
  panel_bytes_ = nb / format_.group_records * format_.group_bytes;
  arena_ = std::move(arena);
  data_ = arena_->allocate(static_cast<size_t>(panel_bytes_ * panels_));
  const int64_t row_bytes = dtype_bytes(type_, k_);
  const PanelFormat f = format_;
  pool.parallel_for(panels_, [&](int64_t pb, int64_t pe, int) {
    std::vector<Block32> rows(static_cast<size_t>(kPanelLanes * nb));
    for (int64_t p = pb; p < pe; ++p) {
      for (int r = 0; r < kPanelLanes; ++r) {
        Block32* dst = rows.data() + r * nb;
        const int64_t row = p * kPanelLanes + r;
        if (row >= n_) {  // padding lanes: zero codes and scales
          for (int64_t b = 0; b < nb; ++b) {
            dst[b] = Block32{};
            std::fill(dst[b].code, dst[b].code + kPanelBlock, 0);
          }
          continue;
        }
        size_t pi = first_row.size() - 1;
        while (first_row[pi] > row) --pi;
        const auto* src = static_cast<const uint8_t*>(parts[pi]->data) + (row - first_row[pi]) * row_bytes;
        decode_row(type_, src, k_, dst);
      }
      uint8_t* panel = data_ + p * panel_bytes_;
      for (int64_t b = 0; b < nb; ++b) {
        uint8_t* group = panel + (b / f.group_records) * f.group_bytes;
        uint8_t* out = group + f.header_bytes + (b % f.group_records) * f.record_bytes;
        if (f.kquant && b % f.group_records == 0)  // the group's header: d (and dmin) per lane
          for (int r = 0; r < kPanelLanes; ++r) {
            std::memcpy(group + r * 2, &rows[r * nb + b].d, 2);
            if (f.stored_min) std::memcpy(group + (kPanelLanes + r) * 2, &rows[r * nb + b].m, 2);
          }
        if (f.codes != PanelCodes::S8) {
          const int hb = panel_high_bits(f.codes);
          std::memset(out + 4 * kPanelChunk, 0, static_cast<size_t>(hb) * kPanelChunk);
          for (int c = 0; c < 4; ++c)
            for (int r = 0; r < kPanelLanes; ++r)
              for (int e = 0; e < 2; ++e) {
                const int* code = rows[r * nb + b].code;
                uint16_t w = 0;
                for (int n = 0; n < 4; ++n) {
                  const int v = code[8 * c + 2 * n + e];
                  w |= static_cast<uint16_t>((v & 0xF) << (4 * n));
                  if (hb) {  // the high bits into the plane (layout in kernels.h)
                    const PlaneSpot spot = panel_plane_spot(hb, c, r, e, n);
                    out[spot.byte] |= static_cast<uint8_t>((v >> 4) << spot.shift);
                  }
                }
                std::memcpy(out + c * kPanelChunk + r * 4 + e * 2, &w, 2);
              }
        } else {
          for (int c = 0; c < 8; ++c)
            for (int r = 0; r < kPanelLanes; ++r)
              for (int e = 0; e < 2; ++e) {
                const int* code = rows[r * nb + b].code;
                out[c * kPanelChunk + r * 4 + e * 2] = static_cast<uint8_t>(static_cast<int8_t>(code[4 * c + e]));
                out[c * kPanelChunk + r * 4 + e * 2 + 1] = static_cast<uint8_t>(static_cast<int8_t>(code[4 * c + 2 + e]));
              }
        }
        uint8_t* scales = out + f.code_bytes;
        uint8_t* mins = scales + f.scale_bytes;
        const int halves = f.per16 ? 2 : 1;
        for (int h = 0; h < halves; ++h)
          for (int r = 0; r < kPanelLanes; ++r) {
            const Block32& blk = rows[r * nb + b];
            if (f.kquant) {
              scales[h * kPanelLanes + r] = static_cast<uint8_t>(blk.sc[h]);  // int8 for Q3_K / Q6_K
              if (f.stored_min) mins[h * kPanelLanes + r] = static_cast<uint8_t>(blk.mc[h]);
            } else {
              std::memcpy(scales + (h * kPanelLanes + r) * 2, &blk.d, 2);
              if (f.stored_min) std::memcpy(mins + (h * kPanelLanes + r) * 2, &blk.m, 2);
            }
          }
      }
    }
  });
}

void QuantPanels::dequantize_row(int64_t row, float* out) const {
  const PanelFormat& f = format_;
  const int64_t p = row / kPanelLanes;
  const int r = static_cast<int>(row % kPanelLanes);
  const uint8_t* panel = data_ + p * panel_bytes_;
  for (int64_t b = 0; b < k_ / kPanelBlock; ++b) {
    const uint8_t* group = panel + (b / f.group_records) * f.group_bytes;
    const uint8_t* rec = group + f.header_bytes + (b % f.group_records) * f.record_bytes;
    for (int j = 0; j < kPanelBlock; ++j) {
      const int code = panel_code(f, rec, r, j);
      const int h = f.per16 ? j / 16 : 0;
      float s, mn = 0.f;
      if (f.kquant) {
        uint16_t d16, dmin16 = 0;
        std::memcpy(&d16, group + r * 2, 2);
        const uint8_t sc = rec[f.code_bytes + h * kPanelLanes + r];
        // Q3_K / Q6_K (no min) have signed scale codes.
        s = f16_to_f32(d16) * static_cast<float>(f.stored_min ? static_cast<int>(sc) : static_cast<int8_t>(sc));
        if (f.stored_min) {
          std::memcpy(&dmin16, group + (kPanelLanes + r) * 2, 2);
          mn = -(f16_to_f32(dmin16) * static_cast<float>(rec[f.code_bytes + f.scale_bytes + h * kPanelLanes + r]));
        }
      } else {
        uint16_t s16, m16 = 0;
        std::memcpy(&s16, rec + f.code_bytes + (h * kPanelLanes + r) * 2, 2);
        s = f16_to_f32(s16);
        if (f.stored_min) {
          std::memcpy(&m16, rec + f.code_bytes + f.scale_bytes + (h * kPanelLanes + r) * 2, 2);
          mn = f16_to_f32(m16);
        }
      }
      // One rounding, as the reference: s * code is exact (few significant bits each).
      out[b * kPanelBlock + j] = f.stored_min ? s * static_cast<float>(code) + mn
                                              : s * static_cast<float>(code + f.offset);
    }
  }
}

}  // namespace pyserve::cpu
