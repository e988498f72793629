#pragma once
#include <string>
#include <vector>

namespace pyserve {

// The Llama family's hyper-parameters (Llama 2/3/3.1/3.2, TinyLlama, SmolLM2, Mistral, Qwen2).
struct ModelConfig {
  std::string architecture = "llama";  // "llama" | "mistral" | "qwen2"
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

  int q_dim() const { return num_heads * head_dim; }
  int kv_dim() const { return num_kv_heads * head_dim; }
  void validate() const;  // throws std::invalid_argument with what is wrong
};

// Rotary inverse frequencies [head_dim / 2], float32 and computed as HF computes them.
std::vector<float> rope_inv_freq(const ModelConfig& c);

}  // namespace pyserve
