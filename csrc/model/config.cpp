#include <cmath>
#include <stdexcept>

#include "model/config.h"

namespace pyserve {

void ModelConfig::validate() const {
  auto need = [](bool ok, const std::string& what) {
    if (!ok) throw std::invalid_argument("invalid model config: " + what);
  };
  need(architecture == "llama" || architecture == "mistral" || architecture == "qwen2" || architecture == "gemma3",
       "architecture '" + architecture + "' (supported: llama, mistral, qwen2, gemma3)");
  need(vocab_size > 0 && hidden_size > 0 && intermediate_size > 0 && num_layers > 0,
       "vocab_size, hidden_size, intermediate_size and num_layers must be positive");
  need(num_heads > 0 && num_kv_heads > 0 && num_heads % num_kv_heads == 0,
       "num_heads must be a positive multiple of num_kv_heads");
  need(head_dim > 0 && head_dim % 2 == 0, "head_dim must be positive and even");
  need(num_heads / num_kv_heads <= 64, "at most 64 query heads per KV head are supported");
  need(rope_type == "default" || rope_type == "llama3" || rope_type == "linear",
       "rope type '" + rope_type + "' (supported: default, llama3, linear)");
  need(sliding_window >= 0, "sliding_window must be >= 0");
  need(attention_sink >= 0, "attention_sink must be >= 0");
  need(layer_sliding.empty() || static_cast<int>(layer_sliding.size()) == num_layers,
       "layer_types must name one type per layer (" + std::to_string(layer_sliding.size()) + " for " +
           std::to_string(num_layers) + " layers)");
  need(rope_local_theta >= 0 && query_pre_attn_scalar >= 0, "rope_local_theta and query_pre_attn_scalar must be >= 0");
  need(!is_gemma3() || !attention_bias, "gemma3 has no attention bias");
}

float ModelConfig::attention_scale() const {
  // HF: query_pre_attn_scalar ** -0.5 in Python (double), used as a float32 multiplier.
  const double s = query_pre_attn_scalar > 0 ? query_pre_attn_scalar : static_cast<double>(head_dim);
  return static_cast<float>(1.0 / std::sqrt(s));
}

std::vector<float> rope_inv_freq(const ModelConfig& c, bool local) {
  const int half = c.head_dim / 2;
  const double theta = local && c.rope_local_theta > 0 ? c.rope_local_theta : c.rope_theta;
  std::vector<float> inv(half);
  for (int i = 0; i < half; ++i) {
    // HF: 1.0 / (base ** (arange(0, dim, 2).float() / dim)), in float32.
    const float exponent = static_cast<float>(2 * i) / static_cast<float>(c.head_dim);
    inv[i] = 1.0f / static_cast<float>(std::pow(static_cast<float>(theta), exponent));
  }
  if (local && c.rope_local_theta > 0) return inv;  // Gemma 3's local rope is never scaled
  if (c.rope_type == "linear") {
    for (float& f : inv) f = static_cast<float>(f / c.rope_factor);
  } else if (c.rope_type == "llama3") {
    // HF _compute_llama3_parameters: long wavelengths are slowed by `factor`, short ones kept,
    // the band between interpolated smoothly.
    const double low_wavelen = c.rope_original_max_position / c.rope_low_freq_factor;
    const double high_wavelen = c.rope_original_max_position / c.rope_high_freq_factor;
    for (float& f : inv) {
      const double wavelen = 2 * M_PI / f;
      float scaled = wavelen > low_wavelen ? static_cast<float>(f / c.rope_factor) : f;
      if (!(wavelen < high_wavelen) && !(wavelen > low_wavelen)) {
        const double smooth = (c.rope_original_max_position / wavelen - c.rope_low_freq_factor) /
                              (c.rope_high_freq_factor - c.rope_low_freq_factor);
        scaled = static_cast<float>((1 - smooth) * scaled / c.rope_factor + smooth * scaled);
      }
      f = scaled;
    }
  }
  return inv;
}

}  // namespace pyserve
