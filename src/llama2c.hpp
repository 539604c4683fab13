// llama2.c checkpoints (.bin): Karpathy's plain float32 LLaMA format (chapter 7;
// chapter 3's demo quantizes one). Layout: 7 int32 header values
// (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len; a
// negative vocab_size means the classifier is NOT shared with the embedding),
// then float32 arrays: token_embedding [vocab, dim], rms_att [L, dim],
// wq [L, dim, dim], wk [L, kv_dim, dim], wv [L, kv_dim, dim], wo [L, dim, dim],
// rms_ffn [L, dim], w1 [L, hidden, dim], w2 [L, dim, hidden], w3 [L, hidden, dim],
// rms_final [dim], two legacy RoPE tables [seq_len, head_size/2] each (skipped),
// and, when not shared, wcls [vocab, dim]. kv_dim = dim * n_kv_heads / n_heads.
// RoPE here rotates interleaved pairs (x[2i], x[2i+1]); Hugging Face rotates
// halves, and so does our model: weights_from_checkpoint permutes the q/k rows of a
// .bin once, with hf_llama.hpp's conversion.
//
// Whatever the file format, a checkpoint in memory is a LlamaCheckpoint: float32
// tensors with Hugging Face names in one canonical order (llama_tensor_specs).
#pragma once

#include "quant4.hpp"

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

namespace qlora {

/// How RoPE's frequencies are rescaled for a context longer than the one the model was
/// pretrained with (Hugging Face config "rope_scaling" / "rope_parameters", chapter 7).
struct RopeScaling {
  enum class Type {
    none,    ///< rope_type "default": θ^(−2i/head_size) as in the RoPE paper
    llama3,  ///< LLaMA 3.1: low frequencies divided by factor, a smooth ramp in between
  };
  Type type = Type::none;
  // llama3 only (LLaMA 3.1 uses 8, 1, 4, 8192): wavelengths beyond original/low are
  // stretched by factor, those below original/high kept, the band between interpolated.
  float factor = 1.0f;
  float low_freq_factor = 1.0f;
  float high_freq_factor = 1.0f;
  int original_max_position_embeddings = 0;
};

struct LlamaConfig {
  int dim = 0;
  int hidden_dim = 0;
  int n_layers = 0;
  int n_heads = 0;
  int n_kv_heads = 0;
  int vocab_size = 0;
  int seq_len = 0;
  bool shared_classifier = true;
  float norm_eps = 1e-5f;
  float rope_theta = 10000.0f;
  RopeScaling rope_scaling{};
  int sliding_window = 0;  ///< Mistral: a token sees at most this many positions (itself included); 0: all
  /// BOS and EOS ids as config.json gives them (none: null; several EOS ids: transformers'
  /// generation stops at any). LLaMA-2's 1 and 2, transformers' defaults, unless it says otherwise.
  std::vector<int> bos_token_ids{1};
  std::vector<int> eos_token_ids{2};

  int head_size() const { return dim / n_heads; }
  int kv_dim() const { return head_size() * n_kv_heads; }
};

/// Throws std::runtime_error, prefixed with `where`, unless every size is positive,
/// dim % n_heads == 0, n_heads % n_kv_heads == 0 and the head size is even (RoPE pairs).
void validate_config(const LlamaConfig& c, const std::string& where);

/// Throws std::invalid_argument, prefixed with `where`, unless `tokens` positions fit the
/// model: at most seq_len (the RoPE tables end there) and, with a sliding window, at most
/// sliding_window (farther tokens would not see each other, and attention here sees all).
void check_sequence_length(const LlamaConfig& c, int tokens, const std::string& where);

/// One named float32 tensor of a checkpoint, row-major.
struct NamedTensor {
  std::string name;  ///< Hugging Face name, e.g. "model.layers.0.self_attn.q_proj.weight"
  std::vector<std::int64_t> shape;
  std::vector<float> data;  ///< the values (of a 4-bit tensor: its dequantized values)
  std::optional<Quant4Tensor> q4{};  ///< the stored form of a tensor saved in 4 bits (bitsandbytes)
};

/// Throws std::runtime_error unless every value of t is finite, naming `where` (the file and
/// the tensor), the first bad value and its position: a NaN in a weight file stops the load
/// there, not later in a quantizer that knows neither.
void check_finite(const NamedTensor& t, const std::string& where);
/// "row 2, column 3" for a matrix, "index 7" otherwise: where element i of a tensor is.
std::string tensor_position(const std::vector<std::int64_t>& shape, std::size_t i);

/// Which RoPE convention the rows of q_proj / k_proj are ordered for.
enum class RopeLayout {
  interleaved,  ///< llama2.c and Meta's original checkpoints: pairs (x[2i], x[2i+1])
  rotate_half,  ///< Hugging Face transformers: pairs (x[i], x[i + head_size/2])
};

/// A whole checkpoint in float32 with Hugging Face tensor names, in the order of
/// llama_tensor_specs(config).
struct LlamaCheckpoint {
  LlamaConfig config;
  RopeLayout rope_layout = RopeLayout::interleaved;
  std::vector<NamedTensor> tensors;

  const NamedTensor& at(const std::string& name) const;  ///< throws naming the missing tensor
  NamedTensor& at(const std::string& name);
};

/// Name and shape of one checkpoint tensor.
struct TensorSpec {
  std::string name;
  std::vector<std::int64_t> shape;
};

/// The tensors of a LLaMA model in canonical order: model.embed_tokens.weight; per layer
/// input_layernorm, self_attn.{q,k,v,o}_proj, post_attention_layernorm, mlp.{gate,down,up}_proj
/// (llama2.c's w1, w2, w3); model.norm.weight; lm_head.weight only when not shared.
std::vector<TensorSpec> llama_tensor_specs(const LlamaConfig& c);

/// Reads and validates a .bin checkpoint (rope_layout = interleaved); throws
/// std::runtime_error naming the file on a bad header or a file size that does not
/// match the header.
LlamaCheckpoint read_llama2c(const std::filesystem::path& path);

}  // namespace qlora
