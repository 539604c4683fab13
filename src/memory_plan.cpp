// The memory planner's arithmetic (chapter 4). See memory_plan.hpp for the conventions.
#include "memory_plan.hpp"

#include "model_shapes.hpp"

#include <algorithm>
#include <cctype>
#include <stdexcept>

namespace qlora {

const std::vector<LlamaShape>& llama_shapes() {
  // The LLaMA-1 sizes of model_shapes.cpp, the one table of real shapes.
  static const std::vector<LlamaShape> shapes = [] {
    std::vector<LlamaShape> v;
    for (const char* name : {"7B", "13B", "33B", "65B"}) {
      const LlamaConfig c = model_shape(name);
      v.push_back({name, c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.vocab_size});
    }
    return v;
  }();
  return shapes;
}

const LlamaShape& llama_shape(const std::string& name) {
  std::string upper = name;
  std::transform(upper.begin(), upper.end(), upper.begin(), [](unsigned char c) { return (char)std::toupper(c); });
  for (const LlamaShape& s : llama_shapes())
    if (s.name == upper) return s;
  throw std::invalid_argument("unknown model size '" + name + "' (known: 7B, 13B, 33B, 65B)");
}

//! [plan-params]
ParamCounts count_params(const LlamaShape& s) {
  const std::int64_t d = s.dim, h = s.hidden, L = s.layers, V = s.vocab;
  ParamCounts p;
  p.linear = L * (4 * d * d + 3 * d * h);  // q, k, v, o: d×d; gate, up: h×d; down: d×h
  p.embedding = 2 * V * d;                 // token embedding and output head (untied)
  p.norm = L * 2 * d + d;                  // two RMSNorms per block and a final one
  return p;
}

std::int64_t lora_param_count(const LlamaShape& s, int r) {
  if (r <= 0) throw std::invalid_argument("LoRA rank must be positive, got " + std::to_string(r));
  const std::int64_t d = s.dim, h = s.hidden;
  // A is r×in and B is out×r: r·(in + out) per adapted projection.
  const std::int64_t per_layer = r * (4 * (d + d) + 2 * (d + h) + (h + d));
  return s.layers * per_layer;
}
//! [plan-params]

//! [plan-bits]
double quant4_bits_per_param(bool double_quant, int blocksize, int blocksize2) {
  if (blocksize <= 0 || blocksize2 <= 0) throw std::invalid_argument("block sizes must be positive");
  if (!double_quant) return 4.0 + 32.0 / blocksize;  // a float32 absmax per block
  return 4.0 + 8.0 / blocksize + 32.0 / (static_cast<double>(blocksize) * blocksize2);
}
//! [plan-bits]

//! [plan-memory]
MemoryPlan plan_memory(const LlamaShape& s, int r) {
  MemoryPlan m;
  m.shape = s;
  m.r = r;
  m.params = count_params(s);
  m.lora_params = lora_param_count(s, r);
  const double total = static_cast<double>(m.params.total());
  const double kept_bf16 = static_cast<double>(m.params.embedding + m.params.norm);  // never quantized
  const double linear = static_cast<double>(m.params.linear);
  m.lora_percent = 100.0 * static_cast<double>(m.lora_params) / total;
  m.base_bf16 = 2.0 * total;
  m.base_nf4 = linear * quant4_bits_per_param(false) / 8.0 + 2.0 * kept_bf16;
  m.base_nf4_dq = linear * quant4_bits_per_param(true) / 8.0 + 2.0 * kept_bf16;
  m.lora_training = 16.0 * static_cast<double>(m.lora_params);  // fp32 A,B + grads + AdamW m, v
  m.full_finetune = 12.0 * total;                               // bf16 W + bf16 grad + fp32 Adam m, v
  m.qlora_total = m.base_nf4_dq + m.lora_training;
  return m;
}
//! [plan-memory]

}  // namespace qlora
