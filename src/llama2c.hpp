// llama2.c checkpoints (.bin): Karpathy's plain float32 LLaMA format (chapter 7;
// chapter 3's demo quantizes one). Layout: 7 int32 header values
// (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len; a
// negative vocab_size means the classifier is NOT shared with the embedding),
// then float32 arrays: token_embedding [vocab, dim], rms_att [L, dim],
// wq [L, dim, dim], wk [L, kv_dim, dim], wv [L, kv_dim, dim], wo [L, dim, dim],
// rms_ffn [L, dim], w1 [L, hidden, dim], w2 [L, dim, hidden], w3 [L, hidden, dim],
// rms_final [dim], two legacy RoPE tables [seq_len, head_size/2] each (skipped),
// and, when not shared, wcls [vocab, dim]. kv_dim = dim * n_kv_heads / n_heads.
// RoPE here rotates interleaved pairs (x[2i], x[2i+1]).
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

namespace qlora {

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

  int head_size() const { return dim / n_heads; }
  int kv_dim() const { return head_size() * n_kv_heads; }
};

/// One named float32 tensor of a checkpoint, row-major.
struct NamedTensor {
  std::string name;  ///< Hugging Face name, e.g. "model.layers.0.self_attn.q_proj.weight"
  std::vector<std::int64_t> shape;
  std::vector<float> data;
};

/// A whole checkpoint in float32 with Hugging Face tensor names, in file order.
/// q_proj/k_proj stay in llama2.c's interleaved-RoPE layout here.
struct Llama2cCheckpoint {
  LlamaConfig config;
  std::vector<NamedTensor> tensors;
};

/// Reads and validates a .bin checkpoint; throws std::runtime_error naming the file
/// on a bad header (non-positive sizes, dim % n_heads, n_heads % n_kv_heads) or a
/// file size that does not match the header.
Llama2cCheckpoint read_llama2c(const std::filesystem::path& path);

}  // namespace qlora
