// The memory planner's arithmetic (chapter 4). See memory_plan.hpp for the conventions.
#include "memory_plan.hpp"

#include "model_shapes.hpp"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>
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

namespace qlora {

double TrainingMemoryPlan::total() const {
  double t = 0;
  for (const MemoryItem& i : items) t += i.bytes;
  return t;
}

double TrainingMemoryPlan::group(const std::string& g) const {
  double t = 0;
  for (const MemoryItem& i : items)
    if (i.group == g) t += i.bytes;
  return t;
}

double cuda_malloc_footprint(double bytes) {
  constexpr double kSmall = 8192.0, kLarge = 2.0 * 1048576.0;
  if (bytes <= 0) return 0;
  if (bytes <= 1048576.0) return std::ceil(bytes / kSmall) * kSmall;
  return std::ceil(bytes / kLarge) * kLarge;
}

//! [plan-training]
TrainingMemoryPlan plan_training_memory(const LlamaConfig& c, const TrainingSetup& s) {
  validate_config(c, "plan_training_memory");
  if (s.batch <= 0 || s.seq_len <= 0 || s.rank <= 0)
    throw std::invalid_argument("plan_training_memory: batch, seq_len and rank must be positive");
  const double B = s.batch, T = s.seq_len, N = B * T, D = c.dim, KV = c.kv_dim(), HD = c.hidden_dim;
  const double H = c.n_heads, L = c.n_layers, V = c.vocab_size, r = s.rank;
  const double f32 = 4, b16 = 2;
  TrainingMemoryPlan p;
  auto add = [&](const char* group, const char* name, double bytes) { p.items.push_back({group, name, bytes}); };

  add("context", "CUDA context", kCudaContextBytes);
  add("context", "CUDA runtime during a step", kCudaRuntimeBytes);

  // Every tensor is its own cudaMalloc, and what one takes is rounded up
  // (cuda_malloc_footprint): a model of many tensors pays it thousands of times.
  const auto alloc = cuda_malloc_footprint;
  const double proj_shapes[7][2] = {{D, D}, {KV, D}, {KV, D}, {D, D}, {HD, D}, {HD, D}, {D, HD}};  // out, in
  // Frozen weights as stored on the device: 4-bit codes, one absmax per 64 (a byte with
  // double quantization, a float32 without), one float32 per 256 absmax and the two code
  // tables; embedding and classifier BF16 (the classifier a copy when shared); float32 norms.
  const bool four_bit = s.storage == BaseStorage::nf4 || s.storage == BaseStorage::nf4_dq ||
                        s.storage == BaseStorage::fp4 || s.storage == BaseStorage::fp4_dq;
  const bool dq = s.storage == BaseStorage::nf4_dq || s.storage == BaseStorage::fp4_dq;
  double projections = 0, lora = 0, lora_bytes = 0;
  for (const auto& [out, in] : proj_shapes) {
    const double n = out * in, blocks = std::ceil(n / 64);
    if (!four_bit)
      projections += alloc(b16 * n);
    else if (dq)
      projections += alloc(n / 2) + alloc(blocks) + alloc(f32 * std::ceil(blocks / 256)) + alloc(f32 * 16) + alloc(f32 * 256);
    else
      projections += alloc(n / 2) + alloc(f32 * blocks) + alloc(f32 * 16);
    lora += r * (in + out);
    lora_bytes += 2 * (alloc(f32 * r * in) + alloc(f32 * out * r));  // A, B and their gradients
  }
  add("frozen weights", "projections", L * projections);
  add("frozen weights", "embedding and classifier", 2 * alloc(b16 * V * D));
  add("frozen weights", "norms", (2 * L + 1) * alloc(f32 * D));

  // LoRA on all seven projections: A (r×in), B (out×r) and their gradients, float32.
  lora *= L;
  add("LoRA + gradients", "A, B, dA, dB", L * lora_bytes);
  const bool eight_bit = s.optim == OptimKind::adamw8bit || s.optim == OptimKind::paged_adamw8bit;
  // AdamW's m and v: float32, or 8-bit codes with a float32 absmax per 256 (chapter 6); one allocation.
  const double states = alloc(eight_bit ? lora * (2 + 2 * f32 / 256) : 2 * f32 * lora);
  add("optimizer states", "AdamW m and v", s.states_on_device ? states : 0);

  // Activations kept for backward (float32).
  const double layer = 6 * N * D + 2 * N * KV + B * H * T * T + 2 * N + 3 * N * HD + 7 * N * r;
  double inputs = 0;
  if (s.checkpointing) inputs = s.offload_checkpoints ? N * D : L * N * D;
  add("activations kept", "layer inputs", f32 * inputs);
  add("activations kept", "layer activations", f32 * layer * (s.checkpointing ? 1 : L));
  add("activations kept", "final norm", f32 * (2 * N * D + N + (s.checkpointing ? N * D : 0)));

  // Workspaces, at the capacity LlamaModelGpu gives each.
  add("workspaces", "backward scratch", f32 * (5 * N * D + 2 * N * KV + N * HD + B * H * T * T));
  const double masked = s.dropout > 0 ? 2 * N * HD : 0;  // x⊙mask and dxa·A, the widest input (down's)
  add("workspaces", "LoRA scratch", f32 * (masked + N * r));
  // The chunked head's logits: as many rows as 64 MiB of float32 hold (LlamaModelGpu::chunked_head).
  const double rows = std::clamp(std::floor(64.0 * 1048576.0 / (4 * V)), 1.0, N);
  add("workspaces", "BF16 operands", b16 * (N * std::max(D, HD) + std::max(N * std::max({D, KV, HD}), rows * V)));
  add("workspaces", "logits and loss", f32 * (rows * V + N));
  add("workspaces", "dequantize scratch", four_bit ? b16 * D * HD : 0);
  add("workspaces", "tokens", 2 * 4 * N);
  return p;
}
//! [plan-training]

//! [fit-advice]
std::string fit_advice(const LlamaConfig& c, const TrainingSetup& s, double available) {
  constexpr double GiB = 1073741824.0;
  auto gib = [](double b) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.2f GiB", b / GiB);
    return std::string(buf);
  };
  std::string out = "qlora plan: this run needs about " + gib(plan_training_memory(c, s).total()) +
                    " at its peak; the device has " + gib(available) + ".";
  struct Change {
    std::string flag;
    TrainingSetup setup;
  };
  std::vector<Change> changes;
  for (int b = s.batch / 2; b >= 1; b /= 2) {  // the largest smaller batch that fits
    TrainingSetup t = s;
    t.batch = b;
    if (plan_training_memory(c, t).total() > available && b > 1) continue;
    changes.push_back({"--batch " + std::to_string(b) + " (with --grad-accum to keep the tokens per step)", t});
    break;
  }
  if (!s.checkpointing) {
    TrainingSetup t = s;
    t.checkpointing = true;
    changes.push_back({"gradient checkpointing", t});
  } else if (!s.offload_checkpoints) {
    TrainingSetup t = s;
    t.offload_checkpoints = true;
    changes.push_back({"--offload-checkpoints", t});
  }
  if (s.states_on_device) {
    TrainingSetup t = s;
    t.states_on_device = false;
    changes.push_back({"optimizer states in host memory (a paged optimizer puts them there when they do not fit)", t});
  }
  std::string fits;
  for (const Change& ch : changes) {
    const double need = plan_training_memory(c, ch.setup).total();
    if (need <= available) fits += "\n  " + ch.flag + ": about " + gib(need);
  }
  if (!fits.empty()) return out + " Changes that fit:" + fits;
  // No one change is enough: all of them together, from the largest batch down.
  for (int b = s.batch; b >= 1; b /= 2) {
    TrainingSetup t = s;
    t.batch = b;
    t.checkpointing = true;
    t.offload_checkpoints = true;
    t.states_on_device = false;
    const double need = plan_training_memory(c, t).total();
    if (need <= available)
      return out + " No single change fits; together, --batch " + std::to_string(b) +
             " with gradient checkpointing, --offload-checkpoints and the optimizer states in host memory: about " +
             gib(need) + ".";
  }
  return out + " Nothing fits, not even batch 1 with checkpoints offloaded and the optimizer states in host memory: "
               "a smaller model, a lower --rank, or a bigger device.";
}
//! [fit-advice]

}  // namespace qlora
