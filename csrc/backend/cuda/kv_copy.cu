// Copies inside the paged KV cache: whole pages across every layer (prefix-cache forks) and one
// token's K/V in one layer (a kept draft-tree leaf moving to its place).
//
// The whole cache, as copy_pages sees it (elementwise.h):
//   cache: [num_layers, 2 (K, V), layer_elems] of kv_type, layer_elems = num_pages * page_elems,
// i.e. layer l's K block starts at element (2 l) * layer_elems and its V block at (2 l + 1) *
// layer_elems; page p of a block is page_elems contiguous elements at p * page_elems.
#include <stdexcept>
#include <string>

#include "backend/cuda/elementwise.h"

namespace pyserve::gpu {
namespace {

constexpr int kThreads = 256;

// One block per (pair j, layer, K or V): blockIdx.x = j * blocks_per_pair + part, part = 2 layer +
// (0: K, 1: V). Word is the widest unit (16, 4 or 2 bytes) that divides the block and page sizes;
// block_words / page_words are the sizes in Words. A negative page id is skipped.
template <typename Word>
__global__ void copy_pages_kernel(Word* cache, int64_t block_words, int64_t page_words, const int32_t* src,
                                  const int32_t* dst, int blocks_per_pair) {
  const int j = blockIdx.x / blocks_per_pair;
  const int part = blockIdx.x - j * blocks_per_pair;
  const int32_t src_page = src[j], dst_page = dst[j];
  if (src_page < 0 || dst_page < 0 || src_page == dst_page) return;
  Word* block = cache + part * block_words;
  const Word* from = block + src_page * page_words;
  Word* to = block + dst_page * page_words;
  for (int64_t w = threadIdx.x; w < page_words; w += blockDim.x) to[w] = from[w];
}

// One layer's K and V: [num_pages, n_kv_heads, page_size, head_dim]. Items [0, kv_elems) are K's,
// the rest V's; consecutive threads move consecutive d of one head vector.
template <typename T>
__global__ void copy_slot_kernel(T* k_cache, T* v_cache, int n_kv_heads, int head_dim, int64_t page_size,
                                 int64_t src, int64_t dst) {
  const int kv_elems = n_kv_heads * head_dim;
  const int64_t src_page = src / page_size, src_off = src % page_size;
  const int64_t dst_page = dst / page_size, dst_off = dst % page_size;
  for (int t = threadIdx.x; t < 2 * kv_elems; t += blockDim.x) {
    const bool is_v = t >= kv_elems;
    const int e = is_v ? t - kv_elems : t;
    const int h = e / head_dim, d = e - h * head_dim;
    T* cache = is_v ? v_cache : k_cache;
    cache[((dst_page * n_kv_heads + h) * page_size + dst_off) * head_dim + d] =
        cache[((src_page * n_kv_heads + h) * page_size + src_off) * head_dim + d];
  }
}

int64_t element_bytes(KVType t) { return t == KVType::F16 ? 2 : 4; }

template <typename Word>
void launch_copy_pages(void* cache, int64_t block_bytes, int64_t page_bytes, const int32_t* src, const int32_t* dst,
                       int n, int blocks_per_pair, gpuStream_t stream) {
  const int64_t w = sizeof(Word);
  copy_pages_kernel<Word><<<n * blocks_per_pair, kThreads, 0, stream>>>(static_cast<Word*>(cache), block_bytes / w,
                                                                         page_bytes / w, src, dst, blocks_per_pair);
  PYSERVE_GPU_CHECK_LAUNCH();
}

}  // namespace

void copy_pages(void* cache, KVType kv_type, int num_layers, int64_t layer_elems, int64_t page_elems,
                const int32_t* src, const int32_t* dst, int n, gpuStream_t stream) {
  if (n < 0 || num_layers < 0 || layer_elems < 0 || page_elems < 0)
    throw std::invalid_argument("copy_pages: negative n, num_layers, layer_elems or page_elems");
  if (n == 0 || num_layers == 0 || page_elems == 0) return;
  if (layer_elems < page_elems || layer_elems % page_elems != 0)
    throw std::invalid_argument("copy_pages: layer_elems = " + std::to_string(layer_elems) +
                                " is not a whole number of pages of " + std::to_string(page_elems));
  if (cache == nullptr || src == nullptr || dst == nullptr)
    throw std::invalid_argument("copy_pages: null cache, src or dst");
  const int blocks_per_pair = 2 * num_layers;
  if (static_cast<int64_t>(n) * blocks_per_pair > 0x7fffffff)
    throw std::invalid_argument("copy_pages: n * 2 * num_layers too large for one launch");
  const int64_t block_bytes = layer_elems * element_bytes(kv_type), page_bytes = page_elems * element_bytes(kv_type);
  const uintptr_t base = reinterpret_cast<uintptr_t>(cache);
  auto divides_all = [&](int64_t w) {
    return block_bytes % w == 0 && page_bytes % w == 0 && base % static_cast<uintptr_t>(w) == 0;
  };
  if (divides_all(16)) {
    launch_copy_pages<uint4>(cache, block_bytes, page_bytes, src, dst, n, blocks_per_pair, stream);
  } else if (divides_all(4)) {
    launch_copy_pages<uint32_t>(cache, block_bytes, page_bytes, src, dst, n, blocks_per_pair, stream);
  } else if (divides_all(2)) {
    launch_copy_pages<uint16_t>(cache, block_bytes, page_bytes, src, dst, n, blocks_per_pair, stream);
  } else {
    throw std::invalid_argument("copy_pages: cache pointer not aligned to its element type");
  }
}

void copy_kv_slot(void* k_cache, void* v_cache, KVType kv_type, int n_kv_heads, int head_dim, int page_size,
                  int64_t src, int64_t dst, gpuStream_t stream) {
  if (n_kv_heads < 0 || head_dim < 0) throw std::invalid_argument("copy_kv_slot: negative n_kv_heads or head_dim");
  if (page_size <= 0) throw std::invalid_argument("copy_kv_slot: page_size must be positive");
  if (src < 0 || dst < 0)
    throw std::invalid_argument("copy_kv_slot: negative slot (src = " + std::to_string(src) +
                                ", dst = " + std::to_string(dst) + ")");
  if (src == dst || n_kv_heads == 0 || head_dim == 0) return;
  if (k_cache == nullptr || v_cache == nullptr) throw std::invalid_argument("copy_kv_slot: null k_cache or v_cache");
  if (kv_type == KVType::F16) {
    copy_slot_kernel<uint16_t><<<1, kThreads, 0, stream>>>(static_cast<uint16_t*>(k_cache),
                                                           static_cast<uint16_t*>(v_cache), n_kv_heads, head_dim,
                                                           page_size, src, dst);
  } else {
    copy_slot_kernel<float><<<1, kThreads, 0, stream>>>(static_cast<float*>(k_cache), static_cast<float*>(v_cache),
                                                        n_kv_heads, head_dim, page_size, src, dst);
  }
  PYSERVE_GPU_CHECK_LAUNCH();
}

}  // namespace pyserve::gpu
