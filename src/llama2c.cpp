// llama2.c checkpoint reader (chapter 7). See llama2c.hpp for the file layout.
#include "llama2c.hpp"

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <initializer_list>
#include <fstream>
#include <stdexcept>

namespace qlora {

void validate_config(const LlamaConfig& c, const std::string& where) {
  auto positive = [&](int v, const char* name) {
    if (v <= 0) throw std::runtime_error(where + ": " + name + " = " + std::to_string(v) + " must be positive");
  };
  positive(c.dim, "dim");
  positive(c.hidden_dim, "hidden_dim");
  positive(c.n_layers, "n_layers");
  positive(c.n_heads, "n_heads");
  positive(c.n_kv_heads, "n_kv_heads");
  positive(c.vocab_size, "vocab_size");
  positive(c.seq_len, "seq_len");
  if (c.dim % c.n_heads != 0)
    throw std::runtime_error(where + ": dim " + std::to_string(c.dim) + " is not a multiple of n_heads " +
                             std::to_string(c.n_heads));
  if (c.n_heads % c.n_kv_heads != 0)
    throw std::runtime_error(where + ": n_heads " + std::to_string(c.n_heads) + " is not a multiple of n_kv_heads " +
                             std::to_string(c.n_kv_heads));
  if (c.head_size() % 2 != 0)
    throw std::runtime_error(where + ": head size " + std::to_string(c.head_size()) + " is odd; RoPE needs pairs");
}

void check_sequence_length(const LlamaConfig& c, int tokens, const std::string& where) {
  if (tokens > c.seq_len)
    throw std::invalid_argument(where + ": " + std::to_string(tokens) + " tokens are more than the model's context (seq_len " +
                                std::to_string(c.seq_len) + ")");
  // Beyond the window Mistral masks out the oldest tokens; this attention always sees all of them.
  if (c.sliding_window > 0 && tokens > c.sliding_window)
    throw std::invalid_argument(where + ": " + std::to_string(tokens) + " tokens are more than the model's sliding_window " +
                                std::to_string(c.sliding_window) + " (sliding-window attention is not implemented)");
}

const NamedTensor& LlamaCheckpoint::at(const std::string& name) const {
  for (const auto& t : tensors)
    if (t.name == name) return t;
  throw std::runtime_error("checkpoint has no tensor '" + name + "'");
}

NamedTensor& LlamaCheckpoint::at(const std::string& name) {
  return const_cast<NamedTensor&>(static_cast<const LlamaCheckpoint&>(*this).at(name));
}

std::vector<TensorSpec> llama_tensor_specs(const LlamaConfig& c) {
  const std::int64_t dim = c.dim, hidden = c.hidden_dim, kv = c.kv_dim(), vocab = c.vocab_size;
  std::vector<TensorSpec> specs{{"model.embed_tokens.weight", {vocab, dim}}};
  for (int l = 0; l < c.n_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    specs.push_back({p + "input_layernorm.weight", {dim}});
    specs.push_back({p + "self_attn.q_proj.weight", {dim, dim}});
    specs.push_back({p + "self_attn.k_proj.weight", {kv, dim}});
    specs.push_back({p + "self_attn.v_proj.weight", {kv, dim}});
    specs.push_back({p + "self_attn.o_proj.weight", {dim, dim}});
    specs.push_back({p + "post_attention_layernorm.weight", {dim}});
    specs.push_back({p + "mlp.gate_proj.weight", {hidden, dim}});
    specs.push_back({p + "mlp.down_proj.weight", {dim, hidden}});
    specs.push_back({p + "mlp.up_proj.weight", {hidden, dim}});
  }
  specs.push_back({"model.norm.weight", {dim}});
  if (!c.shared_classifier) specs.push_back({"lm_head.weight", {vocab, dim}});
  return specs;
}

LlamaCheckpoint read_llama2c(const std::filesystem::path& path) {
  const std::string file = "llama2.c checkpoint '" + path.string() + "'";
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + file);
  std::error_code ec;
  const auto file_bytes = std::filesystem::file_size(path, ec);
  if (ec) throw std::runtime_error("cannot stat " + file + ": " + ec.message());

  std::int32_t h[7];
  if (file_bytes < sizeof h || !in.read(reinterpret_cast<char*>(h), sizeof h))
    throw std::runtime_error(file + ": shorter than the 28-byte header");
  // llama2.c's newer export formats (export.py --version 1, 2) start with the uint32 magic 0x616b3432 ("ak42").
  if (h[0] == 0x616b3432)
    throw std::runtime_error(file + ": llama2.c export version " + std::to_string(h[1]) +
                             " (magic \"ak42\") is not supported; export with --version 0 (the legacy format)");
  LlamaCheckpoint ck;
  LlamaConfig& c = ck.config;
  c.dim = h[0];
  c.hidden_dim = h[1];
  c.n_layers = h[2];
  c.n_heads = h[3];
  c.n_kv_heads = h[4];
  c.vocab_size = std::abs(h[5]);
  c.shared_classifier = h[5] > 0;
  c.seq_len = h[6];
  validate_config(c, file);
  ck.rope_layout = RopeLayout::interleaved;

  //! [llama2c-size]
  // The file size follows from the header; compare before reading anything. The
  // header is untrusted, so every product is overflow-checked.
  std::uint64_t floats = 0;
  auto add = [&](std::initializer_list<std::uint64_t> factors) {
    std::uint64_t t = 1;
    for (auto f : factors)
      if (__builtin_mul_overflow(t, f, &t)) t = UINT64_MAX;
    if (__builtin_add_overflow(floats, t, &floats)) floats = UINT64_MAX;
  };
  auto u = [](int v) { return static_cast<std::uint64_t>(v); };
  add({u(c.vocab_size), u(c.dim)});                        // token embedding
  add({u(c.n_layers), u(c.dim)});                          // rms_att
  add({u(c.n_layers), u(c.dim), u(c.dim)});                // wq
  add({2, u(c.n_layers), u(c.kv_dim()), u(c.dim)});        // wk, wv
  add({u(c.n_layers), u(c.dim), u(c.dim)});                // wo
  add({u(c.n_layers), u(c.dim)});                          // rms_ffn
  add({3, u(c.n_layers), u(c.dim), u(c.hidden_dim)});      // w1, w2, w3
  add({u(c.dim)});                                         // rms_final
  add({u(c.seq_len), u(c.head_size())});                   // two legacy RoPE tables
  if (!c.shared_classifier) add({u(c.vocab_size), u(c.dim)});  // wcls
  if (floats > (file_bytes - 28) / 4 || 28 + 4 * floats != file_bytes)
    throw std::runtime_error(file + ": header (dim " + std::to_string(c.dim) + ", hidden " +
                             std::to_string(c.hidden_dim) + ", layers " + std::to_string(c.n_layers) + ", vocab " +
                             std::to_string(c.vocab_size) + (c.shared_classifier ? ", shared" : ", unshared") +
                             " classifier) describes " +
                             (floats > file_bytes ? std::string("more bytes") : std::to_string(28 + 4 * floats) + " bytes") +
                             " but the file has " + std::to_string(file_bytes));
  //! [llama2c-size]

  auto specs = llama_tensor_specs(c);
  ck.tensors.resize(specs.size());
  for (std::size_t i = 0; i < specs.size(); ++i) {
    ck.tensors[i].name = specs[i].name;
    ck.tensors[i].shape = specs[i].shape;
    std::int64_t n = 1;
    for (auto d : specs[i].shape) n *= d;
    ck.tensors[i].data.resize(static_cast<std::size_t>(n));
  }
  auto read_into = [&](NamedTensor& t) {
    if (!in.read(reinterpret_cast<char*>(t.data.data()), static_cast<std::streamsize>(t.data.size() * 4)))
      throw std::runtime_error(file + ": read error in " + t.name);
    check_finite(t, file + ": tensor '" + t.name + "'");
  };
  // The file stores each kind of weight for all layers together; the checkpoint keeps
  // one tensor per layer, so read kind by kind into the per-layer slots.
  auto layer_tensor = [&](int l, const char* suffix) -> NamedTensor& {
    return ck.at("model.layers." + std::to_string(l) + "." + suffix);
  };
  read_into(ck.at("model.embed_tokens.weight"));
  for (const char* kind : {"input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
                           "self_attn.v_proj.weight", "self_attn.o_proj.weight", "post_attention_layernorm.weight",
                           "mlp.gate_proj.weight", "mlp.down_proj.weight", "mlp.up_proj.weight"})
    for (int l = 0; l < c.n_layers; ++l) read_into(layer_tensor(l, kind));
  read_into(ck.at("model.norm.weight"));
  in.seekg(static_cast<std::streamoff>(u(c.seq_len) * u(c.head_size()) * 4), std::ios::cur);  // legacy freq_cis_real / freq_cis_imag
  if (!c.shared_classifier) read_into(ck.at("lm_head.weight"));
  return ck;
}

std::string tensor_position(const std::vector<std::int64_t>& shape, std::size_t i) {
  if (shape.size() != 2 || shape[1] <= 0) return "index " + std::to_string(i);
  const auto cols = static_cast<std::size_t>(shape[1]);
  return "row " + std::to_string(i / cols) + ", column " + std::to_string(i % cols);
}

void check_finite(const NamedTensor& t, const std::string& where) {
  for (std::size_t i = 0; i < t.data.size(); ++i) {
    if (std::isfinite(t.data[i])) continue;
    throw std::runtime_error(where + ": " + (std::isnan(t.data[i]) ? "NaN" : "an infinite value") + " at " +
                             tensor_position(t.shape, i) + "; the file is damaged or was saved from a diverged run");
  }
}

}  // namespace qlora
