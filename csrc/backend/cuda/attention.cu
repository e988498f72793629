// Paged attention's entry point: the workspace it needs and the choice between the decode kernel
// (attention_decode.cu) and the tiled prefill kernel (attention_prefill.cu).
#include "backend/cuda/attention.h"

#include <stdexcept>

#include "backend/cuda/attention_common.cuh"

namespace pyserve::gpu {

size_t attention_workspace_bytes(int n_tokens, int n_heads, int head_dim, int max_context) {
  if (n_tokens < 0 || n_heads < 0 || head_dim < 0 || max_context < 0)
    throw std::invalid_argument("attention_workspace_bytes: sizes must be >= 0");
  const int splits = attn::decode_split_limit(max_context);
  if (splits <= 1) return 0;  // one split writes the output directly
  return static_cast<size_t>(splits) * attn::split_partial_bytes(n_tokens, n_heads, head_dim);
}

void attention(const PagedAttention& a, void* workspace, size_t workspace_bytes, bool decode_only,
               gpuStream_t stream) {
  if (decode_only)
    attention_decode(a, workspace, workspace_bytes, stream);
  else
    attention_prefill(a, stream);
}

}  // namespace pyserve::gpu
