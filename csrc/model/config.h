#pragma once
#include <string>
#include <vector>

namespace pyserve {

// The Llama family's hyper-parameters (Llama 2/3/3.1/3.2, TinyLlama, SmolLM2, Mistral, Qwen2,
// Gemma 3).
struct ModelConfig {
  std::string architecture = "llama";  // "llama" | "mistral" | "qwen2" | "gemma3"
  int vocab_size = 0;
  int hidden_size = 0;
  int intermediate_size = 0;
  int num_layers = 0;
  int num_heads = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  float rms_norm_eps = 1e-5f;
  double rope_theta = 10000.0;
  std::string rope_type = "default";  // "default" | "llama3" | "linear"
  double rope_factor = 1.0;
  double rope_low_freq_factor = 1.0;
  double rope_high_freq_factor = 4.0;
  double rope_original_max_position = 8192;
  int max_position_embeddings = 2048;
  bool tie_word_embeddings = false;
  bool attention_bias = false;
  int sliding_window = 0;  // 0: none
  // Per layer, whether it is a sliding-window layer (empty: every layer is, when sliding_window > 0).
  // Sliding layers of a model with rope_local_theta > 0 rotate with that base and no rope scaling.
  std::vector<bool> layer_sliding;
  // Attention sink (StreamingLLM): sliding layers also attend to the first attention_sink tokens.
  int attention_sink = 0;
  double rope_local_theta = 0;  // 0: sliding layers use rope_theta (and rope scaling) too
  // Attention scores are scaled by 1/sqrt(query_pre_attn_scalar) (0: by 1/sqrt(head_dim)).
  double query_pre_attn_scalar = 0;

  // Gemma 3's shape, implied by its architecture name: embeddings scaled by sqrt(hidden_size),
  // every RMSNorm multiplies by (1 + w), q and k are RMS-normed per head before rope, the attention
  // and MLP outputs are RMS-normed before the residual add, and the MLP is GeGLU (tanh GELU).
  bool is_gemma3() const { return architecture == "gemma3"; }

  int q_dim() const { return num_heads * head_dim; }
  int kv_dim() const { return num_kv_heads * head_dim; }
  bool sliding(int layer) const {
    return sliding_window > 0 && (layer_sliding.empty() || layer_sliding.at(layer));
  }
  int window(int layer) const { return sliding(layer) ? sliding_window : 0; }
  int sink(int layer) const { return sliding(layer) ? attention_sink : 0; }
  // When every layer slides: the window past which a sequence's KV pages are never read again
  // (outside the sink), so they can be released during decode. 0: some layer reads everything.
  int release_window() const {
    for (int l = 0; l < num_layers; ++l)
      if (!sliding(l)) return 0;
    return sliding_window;
  }
  // Whether the layer rotates with rope_local_theta rather than rope_theta.
  bool local_rope(int layer) const { return rope_local_theta > 0 && !layer_sliding.empty() && layer_sliding.at(layer); }
  float attention_scale() const;
  void validate() const;  // throws std::invalid_argument with what is wrong
};

// Rotary inverse frequencies [head_dim / 2], float32 and computed as HF computes them: the global
// ones (rope_theta with rope scaling), or local ones (rope_local_theta, default rope).
std::vector<float> rope_inv_freq(const ModelConfig& c, bool local = false);

}  // namespace pyserve
