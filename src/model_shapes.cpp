// The shapes of real LLaMA-family models (chapter 7). See model_shapes.hpp.
#include "model_shapes.hpp"

#include "hf_llama.hpp"

#include <cctype>
#include <stdexcept>

namespace qlora {
namespace {

struct Shape {
  const char* name;
  int dim, hidden, layers, heads, kv_heads, vocab, context;
  float theta;
};

//! [model-shapes]
constexpr Shape kShapes[] = {
    {"7b", 4096, 11008, 32, 32, 32, 32000, 4096, 10000.0f},
    {"13b", 5120, 13824, 40, 40, 40, 32000, 4096, 10000.0f},
    {"33b", 6656, 17920, 60, 52, 52, 32000, 2048, 10000.0f},
    {"65b", 8192, 22016, 80, 64, 64, 32000, 2048, 10000.0f},
    {"70b", 8192, 28672, 80, 64, 8, 32000, 4096, 10000.0f},
    {"llama3-8b", 4096, 14336, 32, 32, 8, 128256, 8192, 500000.0f},
};
//! [model-shapes]

}  // namespace

LlamaConfig model_shape(const std::string& name) {
  std::string lower = name;
  for (char& ch : lower) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  // A shape of one's own (a layer count cut down for a profile, a model not in the table).
  if (lower.size() > 5 && lower.ends_with(".json")) return read_hf_config(name);
  for (const Shape& s : kShapes) {
    if (lower != s.name) continue;
    LlamaConfig c;
    c.dim = s.dim;
    c.hidden_dim = s.hidden;
    c.n_layers = s.layers;
    c.n_heads = s.heads;
    c.n_kv_heads = s.kv_heads;
    c.vocab_size = s.vocab;
    c.seq_len = s.context;
    c.shared_classifier = false;
    c.norm_eps = 1e-5f;
    c.rope_theta = s.theta;
    return c;
  }
  std::string known;
  for (const Shape& s : kShapes) known += std::string(known.empty() ? "" : ", ") + s.name;
  throw std::invalid_argument("unknown model shape '" + name + "' (known: " + known + ")");
}

std::vector<std::string> model_shape_names() {
  std::vector<std::string> v;
  for (const Shape& s : kShapes) v.emplace_back(s.name);
  return v;
}

std::int64_t llama_parameter_count(const LlamaConfig& c) {
  std::int64_t n = 0;
  for (const TensorSpec& t : llama_tensor_specs(c)) {
    std::int64_t k = 1;
    for (auto d : t.shape) k *= d;
    n += k;
  }
  return n;
}

}  // namespace qlora
