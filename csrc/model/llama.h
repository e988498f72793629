#pragma once
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "cache/kv_cache.h"
#include "model/config.h"
#include "tensor/tensor.h"

namespace pyserve {

// One forward step: tokens from any number of sequences, each at its own position, each reading
// and writing the KV cache through its sequence's page table.
struct ForwardBatch {
  std::vector<int32_t> tokens;               // [n]
  std::vector<int32_t> positions;            // [n]
  std::vector<const int32_t*> page_tables;   // [n] (tokens of one sequence share one table)
  std::vector<int32_t> logit_rows;           // indices into [0, n) whose logits are wanted
  // [n, hidden] when not empty: the layers' input rows in place of the tokens' embeddings (an
  // EAGLE draft feeds its own); the tokens then only size the batch.
  std::vector<float> inputs;
  // [n] when not empty: the position whose cache slot each token's K/V goes to. A token whose
  // kv_position differs from its position is a draft-tree leaf: it sits at its depth in the
  // sequence but attends only to the positions before its own and to itself (AttentionBatch).
  std::vector<int32_t> kv_positions;
  void clear() {
    tokens.clear();
    positions.clear();
    page_tables.clear();
    logit_rows.clear();
    inputs.clear();
    kv_positions.clear();
  }
};

// The Llama-family decoder (Llama 2/3.x, TinyLlama, SmolLM2, Mistral, Qwen2, Gemma 3) over a
// Backend. Gemma 3 is the same loop with its extra norms, GeGLU, scaled embeddings, and per-layer
// window and rope base (ModelConfig::is_gemma3 lists the differences).
class LlamaModel {
 public:
  LlamaModel(const ModelConfig& config, const TensorMap& tensors, std::shared_ptr<Backend> backend);

  const ModelConfig& config() const { return config_; }
  Backend& backend() { return *backend_; }
  // Bytes of weights one decode step reads (every matrix once, the LM head included).
  size_t weight_bytes() const { return weight_bytes_; }

  // Sizes the workspace for batches of up to n_tokens tokens up front (the engine's step budget),
  // so serving allocates nothing per step and memory never grows with the largest request.
  void reserve(int n_tokens);

  // forward_hidden and lm_head share the workspace: a caller using them holds lock() across both.
  std::unique_lock<std::mutex> lock() { return std::unique_lock<std::mutex>(forward_mu_); }
  // The transformer body: writes the batch's K/V into the cache and returns the final-normed
  // hidden states of batch.logit_rows: [logit_rows.size(), hidden_size], valid until the next call.
  const float* forward_hidden(const ForwardBatch& batch, KVCache& cache);
  // out: [m, hidden] = the embeddings of ids (Gemma's scale not applied).
  void embed(const int32_t* ids, int m, float* out);
  // The LM head over `rows` hidden rows: logits [rows, vocab_size].
  void lm_head(const float* hidden, int rows, float* logits);
  // Both: logits [batch.logit_rows.size(), vocab_size]. For tests and tools.
  void forward(const ForwardBatch& batch, KVCache& cache, float* logits);

 private:
  using Param = std::unique_ptr<Buffer>;  // a vector parameter in the backend's memory
  struct Layer {
    Param attn_norm, ffn_norm, qkv_bias;            // qkv_bias null without attention_bias
    std::unique_ptr<Matrix> qkv, o, gate_up, down;  // q|k|v and gate|up fused row-wise
    // Gemma 3 only (null otherwise), stored as (1 + w): the per-head q/k norms and the norms of
    // the attention and MLP outputs.
    Param q_norm, k_norm, post_attn_norm, post_ffn_norm;
  };
  // Activations, in the backend's memory.
  struct Workspace {
    int capacity = 0;       // tokens
    int logit_rows = 0;     // rows of logits (lm_head on a device backend)
    Param h, xn, qkv, attn, gate_up, act, final_x;
    Param block_out;        // Gemma 3: a block's output before its norm
    Param logits;           // device backends: [logit_rows, vocab]
  };
  // The step's inputs as the host builds them (StepInputs points into these).
  struct HostStep {
    std::vector<float> cos, sin, cos_local, sin_local;
    std::vector<int64_t> slots, own_slots;
    std::vector<int32_t> page_table, token_seq;
    std::vector<float> final_x;  // device backends: the logit rows' hidden states, copied back
  };
  // A norm weight as the model multiplies by it: Gemma's (1 + w), everyone else's w.
  Param norm_weight(const TensorMap& t, const std::string& name, int64_t dim) const;
  StepInputs build_step(const ForwardBatch& batch, int num_pages, int page_size);
  static const float* ptr(const Param& p) { return p ? p->data() : nullptr; }

  ModelConfig config_;
  std::shared_ptr<Backend> backend_;
  std::unique_ptr<Matrix> embed_;    // [vocab, hidden]: also the LM head when tied
  std::unique_ptr<Matrix> lm_head_;  // null when tied
  Param final_norm_;
  std::vector<float> inv_freq_;
  std::vector<float> inv_freq_local_;  // empty unless some layers rotate with rope_local_theta
  bool any_local_rope_ = false;
  std::vector<Layer> layers_;
  size_t weight_bytes_ = 0;
  Workspace ws_;
  HostStep step_;
  std::vector<const int32_t*> seq_tables_;  // build_step's scratch: the batch's sequences
  std::vector<int> seq_pages_;
  std::mutex forward_mu_;  // the workspace and thread pool serve one forward at a time
};

}  // namespace pyserve
