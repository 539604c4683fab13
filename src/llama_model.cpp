// The LLaMA model on the CPU (chapter 7, "The model"). See llama_model.hpp.
// Layout of every activation: N = B·T rows (sequence b, position t at row b·T + t),
// each row one token's vector; the matmuls see N rows at once, attention works per
// sequence and head.
#include "llama_model.hpp"

#include "bf16.hpp"
#include "hf_llama.hpp"
#include "llama_ops.hpp"
#include "matmul.hpp"
#include "model_shapes.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <stdexcept>
#include <string>

namespace qlora {

namespace {
std::size_t usz(std::int64_t a) { return static_cast<std::size_t>(a); }
}  // namespace

// ===========================================================================
// Names and weights

const char* proj_name(Proj p) {
  static const char* names[kNumProj] = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
  return names[static_cast<int>(p)];
}

Proj parse_proj(const std::string& s) {
  for (Proj p : kAllProj) {
    const std::string full = proj_name(p);
    if (s == full || s == full.substr(0, full.size() - 5)) return p;
  }
  throw std::invalid_argument("unknown projection '" + s +
                              "' (expected q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj or down_proj)");
}

std::string hf_module_name(int layer, Proj p) {
  const bool attn = p == Proj::q || p == Proj::k || p == Proj::v || p == Proj::o;
  return "model.layers." + std::to_string(layer) + (attn ? ".self_attn." : ".mlp.") + proj_name(p);
}

std::pair<int, int> LlamaWeights::proj_shape(Proj p) const {
  const LlamaConfig& c = config;
  switch (p) {
    case Proj::q:
    case Proj::o: return {c.dim, c.dim};
    case Proj::k:
    case Proj::v: return {c.kv_dim(), c.dim};
    case Proj::gate:
    case Proj::up: return {c.hidden_dim, c.dim};
    case Proj::down: return {c.dim, c.hidden_dim};
  }
  throw std::logic_error("proj_shape: bad projection");
}

namespace {

std::vector<float> take(const LlamaCheckpoint& ck, const std::string& name, std::size_t numel) {
  const NamedTensor& t = ck.at(name);
  if (t.data.size() != numel)
    throw std::runtime_error("checkpoint tensor '" + name + "' has " + std::to_string(t.data.size()) +
                             " values, expected " + std::to_string(numel));
  return t.data;
}

}  // namespace

LlamaWeights weights_from_checkpoint(const LlamaCheckpoint& ck) {
  validate_config(ck.config, "LLaMA checkpoint");
  LlamaWeights w;
  w.config = ck.config;
  const LlamaConfig& c = w.config;
  const auto sz = [](int a, int b) { return static_cast<std::size_t>(a) * static_cast<std::size_t>(b); };
  w.tok_emb = take(ck, "model.embed_tokens.weight", sz(c.vocab_size, c.dim));
  w.layers.resize(c.n_layers);
  for (int l = 0; l < c.n_layers; ++l) {
    const std::string pre = "model.layers." + std::to_string(l) + ".";
    auto& L = w.layers[l];
    L.rms_att = take(ck, pre + "input_layernorm.weight", sz(c.dim, 1));
    L.rms_ffn = take(ck, pre + "post_attention_layernorm.weight", sz(c.dim, 1));
    for (Proj p : kAllProj) {
      const auto [out, in] = w.proj_shape(p);
      const std::string name = hf_module_name(l, p) + ".weight";
      L.w[static_cast<int>(p)] = take(ck, name, sz(out, in));
      L.q4[static_cast<int>(p)] = ck.at(name).q4;
    }
    //! [rope-permute-load]
    // One attention code path: Hugging Face's rotate-half pairs, the order of every HF
    // folder and PEFT adapter. A llama2.c checkpoint orders the q/k rows of each head
    // for interleaved pairs; reorder them once, here.
    if (ck.rope_layout == RopeLayout::interleaved) {
      if (L.q4[static_cast<int>(Proj::q)] || L.q4[static_cast<int>(Proj::k)])
        throw std::runtime_error("LLaMA checkpoint: 4-bit q/k rows in the interleaved RoPE order cannot be reordered "
                                 "without quantizing again");
      auto& wq = L.w[static_cast<int>(Proj::q)];
      auto& wk = L.w[static_cast<int>(Proj::k)];
      wq = rope_interleaved_to_half(wq, c.n_heads, c.dim);
      wk = rope_interleaved_to_half(wk, c.n_kv_heads, c.dim);
    }
    //! [rope-permute-load]
  }
  w.rms_final = take(ck, "model.norm.weight", sz(c.dim, 1));
  if (!c.shared_classifier) w.wcls = take(ck, "lm_head.weight", sz(c.vocab_size, c.dim));
  prequantized_storage(w);  // one format for all projections, or none
  return w;
}

LlamaCheckpoint checkpoint_from_weights(const LlamaWeights& w) {
  LlamaCheckpoint ck;
  ck.config = w.config;
  ck.rope_layout = RopeLayout::rotate_half;
  for (const TensorSpec& spec : llama_tensor_specs(w.config)) {
    const std::vector<float>* src = nullptr;
    if (spec.name == "model.embed_tokens.weight") src = &w.tok_emb;
    if (spec.name == "model.norm.weight") src = &w.rms_final;
    if (spec.name == "lm_head.weight") src = &w.wcls;
    for (int l = 0; l < w.config.n_layers && !src; ++l) {
      const std::string pre = "model.layers." + std::to_string(l) + ".";
      const auto& L = w.layers.at(static_cast<std::size_t>(l));
      if (spec.name == pre + "input_layernorm.weight") src = &L.rms_att;
      if (spec.name == pre + "post_attention_layernorm.weight") src = &L.rms_ffn;
      for (Proj p : kAllProj)
        if (spec.name == hf_module_name(l, p) + ".weight") src = &L.w[static_cast<int>(p)];
    }
    if (!src) throw std::logic_error("checkpoint_from_weights: no source for tensor '" + spec.name + "'");
    ck.tensors.push_back({spec.name, spec.shape, *src});
  }
  return ck;
}

namespace {
//! [cpu-memory-check]
// The CPU model is the float32 reference: at its peak while loading it holds the
// checkpoint in float32, the weights again, and each projection's float32 cache; a
// 6.74 B-parameter model took 56 GB (8.3 bytes per parameter). Refuse what cannot fit
// rather than let the machine swap or the kernel kill us.
void check_host_memory(std::int64_t params, const std::filesystem::path& path) {
  std::ifstream meminfo("/proc/meminfo");
  std::string key;
  std::int64_t kib = 0;
  std::string unit;
  while (meminfo >> key >> kib >> unit)
    if (key == "MemAvailable:") break;
  if (key != "MemAvailable:") return;  // not Linux: no estimate to compare with
  const double need_gb = 8.3 * static_cast<double>(params) / 1e9, have_gb = static_cast<double>(kib) * 1024.0 / 1e9;
  if (need_gb <= have_gb) return;
  char msg[640];
  std::snprintf(msg, sizeof msg,
                "%s: a %.2f B-parameter model needs about %.0f GB of host memory in the CPU model (float32 weights "
                "and their dequantized cache), and %.1f GB are available: on a GPU, `qlora finetune --stream`, "
                "`qlora eval --device cuda` and `qlora bench train --model` stream it onto the device in 4-bit",
                path.c_str(), static_cast<double>(params) / 1e9, need_gb, have_gb);
  throw std::runtime_error(msg);
}
//! [cpu-memory-check]
}  // namespace

LlamaWeights load_llama_weights(const std::filesystem::path& path) {
  const bool folder = std::filesystem::is_directory(path);
  if (folder)
    check_host_memory(llama_parameter_count(read_hf_config(path / "config.json")), path);  // the config only
  else if (std::filesystem::is_regular_file(path))
    check_host_memory(static_cast<std::int64_t>(std::filesystem::file_size(path) / sizeof(float)), path);
  const LlamaCheckpoint ck = folder ? read_hf_llama(path) : read_llama2c(path);
  try {
    return weights_from_checkpoint(ck);
  } catch (const std::runtime_error& e) {
    throw std::runtime_error(path.string() + ": " + e.what());  // name the file, as the readers do
  }
}

LlamaWeights random_llama_weights(const LlamaConfig& config, std::uint64_t seed) {
  validate_config(config, "random LLaMA config");
  std::mt19937_64 rng(seed);
  auto fill = [&](std::size_t n, double center, double half_width) {
    std::vector<float> v(n);
    for (float& x : v) x = static_cast<float>(center + (2.0 * uniform01(rng) - 1.0) * half_width);
    return v;
  };
  LlamaWeights w;
  w.config = config;
  const LlamaConfig& c = w.config;
  // Uniform weights of variance 1/in (half-width √(3/in)) keep the activations O(1)
  // through the layers, so a tiny random model has non-trivial logits and gradients.
  w.tok_emb = fill(static_cast<std::size_t>(c.vocab_size) * c.dim, 0.0, 1.0);
  w.layers.resize(c.n_layers);
  for (auto& L : w.layers) {
    L.rms_att = fill(c.dim, 1.0, 0.2);
    L.rms_ffn = fill(c.dim, 1.0, 0.2);
    for (Proj p : kAllProj) {
      const auto [out, in] = w.proj_shape(p);
      L.w[static_cast<int>(p)] = fill(static_cast<std::size_t>(out) * in, 0.0, std::sqrt(3.0 / in));
    }
  }
  w.rms_final = fill(c.dim, 1.0, 0.2);
  if (!c.shared_classifier) w.wcls = fill(static_cast<std::size_t>(c.vocab_size) * c.dim, 0.0, std::sqrt(3.0 / c.dim));
  return w;
}

// ===========================================================================
// Frozen storage

std::string to_string(BaseStorage s) {
  switch (s) {
    case BaseStorage::float32: return "f32";
    case BaseStorage::bfloat16: return "bf16";
    case BaseStorage::nf4: return "nf4";
    case BaseStorage::nf4_dq: return "nf4-dq";
    case BaseStorage::fp4: return "fp4";
    case BaseStorage::fp4_dq: return "fp4-dq";
    case BaseStorage::int4: return "int4";
  }
  return "?";
}

BaseStorage parse_base_storage(const std::string& s) {
  std::string t = s;
  std::transform(t.begin(), t.end(), t.begin(), [](unsigned char ch) {
    return ch == '_' || ch == '+' ? '-' : static_cast<char>(std::tolower(ch));
  });
  for (BaseStorage b : {BaseStorage::float32, BaseStorage::bfloat16, BaseStorage::nf4, BaseStorage::nf4_dq, BaseStorage::fp4,
                        BaseStorage::fp4_dq, BaseStorage::int4})
    if (t == to_string(b)) return b;
  if (t == "float32") return BaseStorage::float32;
  if (t == "bfloat16") return BaseStorage::bfloat16;
  throw std::invalid_argument("unknown base storage '" + s + "' (expected f32, bf16, nf4, nf4-dq, fp4, fp4-dq or int4)");
}

BaseStorage storage_of(const Quant4Tensor& q) {
  if (q.type == QuantType::nf4) return q.double_quant ? BaseStorage::nf4_dq : BaseStorage::nf4;
  return q.double_quant ? BaseStorage::fp4_dq : BaseStorage::fp4;
}

std::optional<BaseStorage> prequantized_storage(const LlamaWeights& w) {
  // The model has one storage for all projections, so a checkpoint saved in 4 bits must
  // hold every projection in the same format (any blocksize).
  const auto& first = w.layers.at(0).q4[0];
  const std::optional<BaseStorage> s = first ? std::optional(storage_of(*first)) : std::nullopt;
  const std::string first_desc = first ? to_string(*s) : "float";
  for (int l = 0; l < w.config.n_layers; ++l)
    for (Proj p : kAllProj) {
      const auto& q = w.layers[static_cast<std::size_t>(l)].q4[static_cast<int>(p)];
      const std::optional<BaseStorage> here = q ? std::optional(storage_of(*q)) : std::nullopt;
      if (here != s)
        throw std::runtime_error("LLaMA checkpoint: tensor '" + hf_module_name(l, p) + ".weight' is stored as " +
                                 (here ? to_string(*here) : std::string("float")) + ", but '" +
                                 hf_module_name(0, Proj::q) + ".weight' as " + first_desc +
                                 " (the model keeps every projection in one storage)");
    }
  return s;
}

//! [int4-absmax]
Int4Tensor quantize_int4(std::span<const float> x, int blocksize) {
  if (blocksize <= 0) throw std::invalid_argument("int4 blocksize must be positive");
  Int4Tensor q;
  q.blocksize = blocksize;
  q.numel = static_cast<std::int64_t>(x.size());
  for (std::size_t b0 = 0; b0 < x.size(); b0 += usz(blocksize))
    q.blocks.push_back(quantize_absmax(x.subspan(b0, std::min(usz(blocksize), x.size() - b0)), 4));
  return q;
}

std::vector<float> dequantize_int4(const Int4Tensor& q) {
  std::vector<float> y;
  y.reserve(usz(q.numel));
  for (const AbsmaxQuant& b : q.blocks) {
    const std::vector<float> d = dequantize(b);
    y.insert(y.end(), d.begin(), d.end());
  }
  return y;
}
//! [int4-absmax]

std::int64_t Int4Tensor::storage_bytes() const {
  return (numel + 1) / 2 + static_cast<std::int64_t>(blocks.size()) * 4;
}

std::int64_t FrozenLinear::storage_bytes() const {
  const std::int64_t n = static_cast<std::int64_t>(in) * out;
  if (q4) return q4->storage_bytes();
  if (i4) return i4->storage_bytes();
  return storage == BaseStorage::float32 ? 4 * n : 2 * n;
}

//! [frozen-linear]
FrozenLinear make_frozen_linear(const std::vector<float>& w, int out, int in, BaseStorage storage) {
  if (w.size() != static_cast<std::size_t>(out) * in)
    throw std::invalid_argument("make_frozen_linear: weight has " + std::to_string(w.size()) + " values, expected " +
                                std::to_string(out) + "×" + std::to_string(in));
  FrozenLinear f;
  f.in = in;
  f.out = out;
  f.storage = storage;
  const std::vector<std::int64_t> shape = {out, in};
  switch (storage) {
    case BaseStorage::float32: f.w = w; break;
    case BaseStorage::bfloat16: f.w = from_bf16(to_bf16(w)); break;
    case BaseStorage::nf4:
    case BaseStorage::nf4_dq:
    case BaseStorage::fp4:
    case BaseStorage::fp4_dq: {
      const QuantType type = storage == BaseStorage::fp4 || storage == BaseStorage::fp4_dq ? QuantType::fp4 : QuantType::nf4;
      const bool dq = storage == BaseStorage::nf4_dq || storage == BaseStorage::fp4_dq;
      return make_frozen_linear(quantize_4bit(w, shape, type, 64, dq));
    }
    case BaseStorage::int4:
      f.i4 = quantize_int4(w, 64);
      f.w = dequantize_int4(*f.i4);
      break;
  }
  return f;
}

FrozenLinear make_frozen_linear(Quant4Tensor q) {
  if (q.shape.size() != 2) throw std::invalid_argument("make_frozen_linear: a 4-bit weight must be a matrix");
  FrozenLinear f;
  f.out = static_cast<int>(q.shape[0]);
  f.in = static_cast<int>(q.shape[1]);
  f.storage = storage_of(q);
  // The CPU execution path: dequantize once, multiply with BLAS many times.
  f.w = dequantize_4bit_f32(q);
  f.q4 = std::move(q);
  return f;
}
//! [frozen-linear]

// ===========================================================================
// The building blocks (RMSNorm, RoPE, attention, SwiGLU, cross-entropy) live in
// llama_ops.cpp, where the GPU kernels' tests find them too.

namespace {
using Vec = std::vector<float>;
}  // namespace

// ===========================================================================
// The model

int check_batch_ids(const int* tokens, const int* targets, int N, int vocab) {
  int count = 0;
  for (int n = 0; n < N; ++n) {
    if (tokens[n] < 0 || tokens[n] >= vocab)
      throw std::out_of_range("token id " + std::to_string(tokens[n]) + " at index " + std::to_string(n) +
                              " is outside the vocabulary [0, " + std::to_string(vocab) + ")");
    if (targets && targets[n] >= vocab)
      throw std::out_of_range("target id " + std::to_string(targets[n]) + " at index " + std::to_string(n) +
                              " is outside the vocabulary");
    count += targets && targets[n] >= 0;
  }
  return count;
}

/// Everything one layer's forward keeps for its backward (N = B·T rows).
struct LlamaModel::LayerCache {
  Vec x;           ///< N×D layer input (the residual stream)
  Vec inv1, xn1;   ///< attention RMSNorm: 1/rms per row, normalized input
  Vec q, k, v;     ///< N×D, N×KV, N×KV (q, k after RoPE)
  Vec att;         ///< B×H×T×T softmax weights (causal: s ≤ t)
  Vec o;           ///< N×D attention output (input of o_proj)
  Vec x2;          ///< N×D residual after attention
  Vec inv2, xn2;   ///< FFN RMSNorm
  Vec h1, h3, g;   ///< N×H gate_proj, up_proj outputs, silu(h1)·h3
  std::array<LoraCache, kNumProj> lc;

  std::int64_t bytes() const {
    std::int64_t n = 0;
    for (const Vec* buf : {&x, &inv1, &xn1, &q, &k, &v, &att, &o, &x2, &inv2, &xn2, &h1, &h3, &g})
      n += static_cast<std::int64_t>(buf->size());
    for (const auto& c : lc) n += static_cast<std::int64_t>(c.mask.size() + c.xa.size());
    return 4 * n;
  }
};

LlamaModel::~LlamaModel() = default;
LlamaModel::LlamaModel(LlamaModel&&) noexcept = default;
LlamaModel& LlamaModel::operator=(LlamaModel&&) noexcept = default;

LlamaModel::LlamaModel(const LlamaWeights& w, BaseStorage storage) : cfg_(w.config), storage_(storage) {
  validate_config(cfg_, "LlamaModel");
  // QLoRA keeps everything that is not a linear projection in BF16; the F32 storage
  // keeps float32 so that the model can be checked exactly against other float32 code.
  auto frozen16 = [&](const Vec& v) { return storage == BaseStorage::float32 ? v : from_bf16(to_bf16(v)); };
  tok_emb_ = frozen16(w.tok_emb);
  if (!cfg_.shared_classifier) {
    if (w.wcls.size() != tok_emb_.size()) throw std::invalid_argument("LlamaModel: classifier has the wrong size");
    wcls_ = frozen16(w.wcls);
  }
  rms_final_ = frozen16(w.rms_final);
  if (static_cast<int>(w.layers.size()) != cfg_.n_layers) throw std::invalid_argument("LlamaModel: wrong layer count");
  if (const auto stored = prequantized_storage(w); stored && *stored != storage)
    throw std::invalid_argument("LlamaModel: the checkpoint's projections are stored in " + to_string(*stored) +
                                "; storage " + to_string(storage) + " would mean quantizing them again");
  layers_.resize(cfg_.n_layers);
  for (int l = 0; l < cfg_.n_layers; ++l) {
    layers_[l].rms_att = frozen16(w.layers[l].rms_att);
    layers_[l].rms_ffn = frozen16(w.layers[l].rms_ffn);
    for (Proj p : kAllProj) {
      const auto [out, in] = w.proj_shape(p);
      const auto& stored = w.layers[l].q4[static_cast<int>(p)];
      layers_[l].w[static_cast<int>(p)] =
          stored ? make_frozen_linear(*stored) : make_frozen_linear(w.layers[l].w[static_cast<int>(p)], out, in, storage);
    }
  }
  rope_tables(cfg_, rope_cos_, rope_sin_);
  adapters_.resize(cfg_.n_layers);
}

const FrozenLinear& LlamaModel::frozen(int layer, Proj p) const { return layers_.at(layer).w[static_cast<int>(p)]; }
const std::vector<float>& LlamaModel::classifier() const { return cfg_.shared_classifier ? tok_emb_ : wcls_; }
const std::vector<float>& LlamaModel::rms_att(int layer) const { return layers_.at(layer).rms_att; }
const std::vector<float>& LlamaModel::rms_ffn(int layer) const { return layers_.at(layer).rms_ffn; }

std::int64_t LlamaModel::frozen_storage_bytes() const {
  const std::int64_t per = storage_ == BaseStorage::float32 ? 4 : 2;
  std::int64_t n = per * static_cast<std::int64_t>(tok_emb_.size() + wcls_.size() + rms_final_.size());
  for (const auto& L : layers_) {
    n += per * static_cast<std::int64_t>(L.rms_att.size() + L.rms_ffn.size());
    for (const auto& f : L.w) n += f.storage_bytes();
  }
  return n;
}

// --- LoRA -------------------------------------------------------------------

void LlamaModel::add_lora(const LoraSetup& setup, std::mt19937_64& rng) {
  setup.config.scale();  // validates r
  lora_ = setup;
  for (int l = 0; l < cfg_.n_layers; ++l)
    for (Proj p : kAllProj) {
      auto& slot = adapters_[l][static_cast<int>(p)];
      slot.reset();
      if (!setup.targets[static_cast<int>(p)]) continue;
      const FrozenLinear& f = frozen(l, p);
      slot = std::make_unique<LoraAdapter>(f.in, f.out, setup.config.r);
      slot->init_peft(rng);
    }
}

const LoraSetup& LlamaModel::lora_setup() const {
  if (!lora_) throw std::logic_error("LlamaModel: no LoRA adapters (call add_lora first)");
  return *lora_;
}

LoraAdapter* LlamaModel::adapter(int layer, Proj p) { return adapters_.at(layer)[static_cast<int>(p)].get(); }
const LoraAdapter* LlamaModel::adapter(int layer, Proj p) const { return adapters_.at(layer)[static_cast<int>(p)].get(); }

std::vector<std::pair<std::string, LoraAdapter*>> LlamaModel::named_adapters() {
  std::vector<std::pair<std::string, LoraAdapter*>> out;
  for (int l = 0; l < cfg_.n_layers; ++l)
    for (Proj p : kAllProj)
      if (LoraAdapter* a = adapter(l, p)) out.emplace_back(hf_module_name(l, p), a);
  return out;
}

std::int64_t LlamaModel::lora_parameter_count() const {
  std::int64_t n = 0;
  for (const auto& layer : adapters_)
    for (const auto& a : layer)
      if (a) n += static_cast<std::int64_t>(a->A.size() + a->B.size());
  return n;
}

void LlamaModel::zero_grad() {
  for (auto& layer : adapters_)
    for (auto& a : layer)
      if (a) a->zero_grad();
}

// --- linear layers -------------------------------------------------------------

namespace {
std::vector<float> rounded_bf16(const float* x, std::size_t n) {
  std::vector<float> r(n);
  for (std::size_t i = 0; i < n; ++i) r[i] = round_to_bf16(x[i]);
  return r;
}
}  // namespace

void LlamaModel::frozen_xwt(const float* x, const float* w, float* y, int N, int in, int out) const {
  const auto mm = reference_ ? matmul_xwt_ref : matmul_xwt;
  if (!bf16_compute_) return mm(x, w, y, N, in, out, false);
  mm(rounded_bf16(x, usz(N) * in).data(), rounded_bf16(w, usz(out) * in).data(), y, N, in, out, false);
}

void LlamaModel::frozen_dyw(const float* dy, const float* w, float* dx, int N, int in, int out, bool accumulate) const {
  const auto mm = reference_ ? matmul_dyw_ref : matmul_dyw;
  if (!bf16_compute_) return mm(dy, w, dx, N, in, out, accumulate);
  mm(rounded_bf16(dy, usz(N) * out).data(), rounded_bf16(w, usz(out) * in).data(), dx, N, in, out, accumulate);
}

//! [linear]
// y = x·Wᵀ (+ the LoRA term). W is the float32 cache of the frozen weight.
void LlamaModel::linear(int l, Proj p, const float* x, float* y, int N, bool training, std::mt19937_64& rng,
                        LoraCache& lc) const {
  const FrozenLinear& f = frozen(l, p);
  frozen_xwt(x, f.w.data(), y, N, f.in, f.out);
  if (const LoraAdapter* a = adapter(l, p))
    (reference_ ? lora_forward_ref : lora_forward)(*a, lora_->config, x, y, N, training, rng, lc, first_position_);
}

// dx (=|+=) dy·W through the frozen weight, plus the LoRA part of dx; accumulates dA, dB.
void LlamaModel::linear_backward(int l, Proj p, const float* x, const float* dy, float* dx, int N, bool accumulate,
                                 const LoraCache& lc) {
  const FrozenLinear& f = frozen(l, p);
  frozen_dyw(dy, f.w.data(), dx, N, f.in, f.out, accumulate);
  if (LoraAdapter* a = adapter(l, p))
    (reference_ ? lora_backward_ref : lora_backward)(*a, lora_->config, x, dy, dx, N, lc);
}
//! [linear]

// --- one transformer layer -------------------------------------------------------

//! [layer-forward]
void LlamaModel::layer_forward(int l, float* x_out, bool training, std::mt19937_64& rng, LayerCache& c) const {
  const int N = B_ * T_, D = cfg_.dim, KV = cfg_.kv_dim(), HD = cfg_.hidden_dim;
  const int H = cfg_.n_heads, hs = cfg_.head_size();
  const Layer& L = layers_[l];
  auto& lc = c.lc;
  auto I = [](Proj p) { return static_cast<int>(p); };
  c.inv1.resize(usz(N));
  c.xn1.resize(usz(N) * D);
  rmsnorm_forward(c.x.data(), L.rms_att.data(), c.xn1.data(), c.inv1.data(), N, D, cfg_.norm_eps);

  // Attention: project, rotate, attend causally, project back, add to the residual.
  c.q.resize(usz(N) * D);
  c.k.resize(usz(N) * KV);
  c.v.resize(usz(N) * KV);
  linear(l, Proj::q, c.xn1.data(), c.q.data(), N, training, rng, lc[I(Proj::q)]);
  linear(l, Proj::k, c.xn1.data(), c.k.data(), N, training, rng, lc[I(Proj::k)]);
  linear(l, Proj::v, c.xn1.data(), c.v.data(), N, training, rng, lc[I(Proj::v)]);
  rope(c.q.data(), N, T_, 0, H, hs, rope_cos_, rope_sin_, false);
  rope(c.k.data(), N, T_, 0, cfg_.n_kv_heads, hs, rope_cos_, rope_sin_, false);
  c.att.resize(usz(B_) * H * T_ * T_);
  c.o.resize(usz(N) * D);
  attention_forward(c.q.data(), c.k.data(), c.v.data(), c.att.data(), c.o.data(), B_, T_, H, cfg_.n_kv_heads, hs);
  Vec tmp(usz(N) * D);
  linear(l, Proj::o, c.o.data(), tmp.data(), N, training, rng, lc[I(Proj::o)]);
  c.x2.resize(usz(N) * D);
  for (std::size_t i = 0; i < c.x2.size(); ++i) c.x2[i] = c.x[i] + tmp[i];

  // SwiGLU MLP: down(silu(gate(x)) · up(x)), added to the residual.
  c.inv2.resize(usz(N));
  c.xn2.resize(usz(N) * D);
  rmsnorm_forward(c.x2.data(), L.rms_ffn.data(), c.xn2.data(), c.inv2.data(), N, D, cfg_.norm_eps);
  c.h1.resize(usz(N) * HD);
  c.h3.resize(usz(N) * HD);
  c.g.resize(usz(N) * HD);
  linear(l, Proj::gate, c.xn2.data(), c.h1.data(), N, training, rng, lc[I(Proj::gate)]);
  linear(l, Proj::up, c.xn2.data(), c.h3.data(), N, training, rng, lc[I(Proj::up)]);
  swiglu_forward(c.h1.data(), c.h3.data(), c.g.data(), static_cast<std::int64_t>(c.g.size()));
  linear(l, Proj::down, c.g.data(), tmp.data(), N, training, rng, lc[I(Proj::down)]);
  for (std::size_t i = 0; i < tmp.size(); ++i) x_out[i] = c.x2[i] + tmp[i];
}
//! [layer-forward]

//! [layer-backward]
// On entry dx holds dLoss/d(layer output); on return dLoss/d(layer input). Every
// activation gradient flows through the frozen weights (dX = dY·W); only the
// adapters collect parameter gradients.
void LlamaModel::layer_backward(int l, const LayerCache& c, float* dx) {
  const int N = B_ * T_, D = cfg_.dim, KV = cfg_.kv_dim(), HD = cfg_.hidden_dim;
  const int H = cfg_.n_heads, hs = cfg_.head_size();
  const Layer& L = layers_[l];
  const auto& lc = c.lc;
  auto I = [](Proj p) { return static_cast<int>(p); };

  // MLP. dx is both d(x2) via the skip path and d(down output).
  Vec dg(usz(N) * HD), dh1(usz(N) * HD), dh3(usz(N) * HD);
  linear_backward(l, Proj::down, c.g.data(), dx, dg.data(), N, false, lc[I(Proj::down)]);
  swiglu_backward(c.h1.data(), c.h3.data(), dg.data(), dh1.data(), dh3.data(), static_cast<std::int64_t>(dg.size()));
  Vec dxn(usz(N) * D);
  linear_backward(l, Proj::gate, c.xn2.data(), dh1.data(), dxn.data(), N, false, lc[I(Proj::gate)]);
  linear_backward(l, Proj::up, c.xn2.data(), dh3.data(), dxn.data(), N, true, lc[I(Proj::up)]);
  rmsnorm_backward(c.x2.data(), L.rms_ffn.data(), c.inv2.data(), dxn.data(), dx, N, D);

  // Attention. dx is now d(x2): the skip path and d(o_proj output).
  Vec dout(usz(N) * D), dq(usz(N) * D), dk(usz(N) * KV), dv(usz(N) * KV);
  linear_backward(l, Proj::o, c.o.data(), dx, dout.data(), N, false, lc[I(Proj::o)]);
  attention_backward(c.q.data(), c.k.data(), c.v.data(), c.att.data(), dout.data(), dq.data(), dk.data(), dv.data(), B_,
                     T_, H, cfg_.n_kv_heads, hs);
  rope(dq.data(), N, T_, 0, H, hs, rope_cos_, rope_sin_, true);
  rope(dk.data(), N, T_, 0, cfg_.n_kv_heads, hs, rope_cos_, rope_sin_, true);
  linear_backward(l, Proj::q, c.xn1.data(), dq.data(), dxn.data(), N, false, lc[I(Proj::q)]);
  linear_backward(l, Proj::k, c.xn1.data(), dk.data(), dxn.data(), N, true, lc[I(Proj::k)]);
  linear_backward(l, Proj::v, c.xn1.data(), dv.data(), dxn.data(), N, true, lc[I(Proj::v)]);
  rmsnorm_backward(c.x.data(), L.rms_att.data(), c.inv1.data(), dxn.data(), dx, N, D);
}
//! [layer-backward]

// --- whole model ------------------------------------------------------------------

//! [model-forward]
float LlamaModel::forward(const int* tokens, const int* targets, int B, int T, bool training, std::mt19937_64& rng,
                          int first_sequence) {
  if (B <= 0 || T <= 0)
    throw std::invalid_argument("LlamaModel::forward: need B > 0 and T > 0 (got B=" + std::to_string(B) +
                                ", T=" + std::to_string(T) + ")");
  check_sequence_length(cfg_, T, "LlamaModel::forward");
  const int N = B * T, D = cfg_.dim, V = cfg_.vocab_size;
  check_batch_ids(tokens, targets, N, V);
  B_ = B;
  T_ = T;
  training_ = training;
  first_position_ = std::int64_t{first_sequence} * T;
  fwd_checkpointed_ = checkpointing_;
  backward_pending_ = targets != nullptr;
  if (targets)
    targets_.assign(targets, targets + N);
  else
    targets_.clear();

  Vec x(usz(N) * D);
  for (int n = 0; n < N; ++n) std::copy_n(&tok_emb_[usz(tokens[n]) * D], D, &x[usz(n) * D]);

  // Without checkpointing every layer keeps its full cache. With it, a layer keeps
  // only its input (and the rng state, so recomputation draws the same dropout masks);
  // one scratch cache is reused by every layer.
  caches_.resize(usz(cfg_.n_layers));
  layer_rng_.assign(checkpointing_ ? usz(cfg_.n_layers) : 0, rng);
  for (int l = 0; l < cfg_.n_layers; ++l) {
    if (!caches_[l]) caches_[l] = std::make_unique<LayerCache>();
    LayerCache& c = checkpointing_ ? scratch() : *caches_[l];
    if (checkpointing_) {
      layer_rng_[l] = rng;
      *caches_[l] = LayerCache{};
      caches_[l]->x = x;
    }
    c.x = x;
    layer_forward(l, x.data(), training, rng, c);
  }
  if (checkpointing_) *scratch_ = LayerCache{};  // the scratch is refilled layer by layer in backward

  x_final_ = x;
  inv_rms_final_.resize(usz(N));
  xn_final_.resize(usz(N) * D);
  rmsnorm_forward(x_final_.data(), rms_final_.data(), xn_final_.data(), inv_rms_final_.data(), N, D, cfg_.norm_eps);
  logits_.resize(usz(N) * V);
  frozen_xwt(xn_final_.data(), classifier().data(), logits_.data(), N, D, V);
  peak_act_bytes_ = cached_bytes();

  // Mean cross-entropy over the targets that are not ignored.
  double loss = 0.0;
  int count = 0;
  for (int n = 0; n < N && targets; ++n) {
    if (targets[n] < 0) continue;
    loss += cross_entropy_loss_row(&logits_[usz(n) * V], V, targets[n]);
    ++count;
  }
  return count ? static_cast<float>(loss / count) : 0.0f;
}
//! [model-forward]

//! [model-backward]
void LlamaModel::backward() {
  if (caches_.empty() || T_ == 0) throw std::logic_error("LlamaModel::backward: no forward pass to differentiate");
  if (targets_.empty()) throw std::logic_error("LlamaModel::backward: the last forward had no targets");
  if (!backward_pending_) throw std::logic_error("LlamaModel::backward: called twice for one forward");
  backward_pending_ = false;  // the logits become gradients below
  const int N = B_ * T_, D = cfg_.dim, V = cfg_.vocab_size;
  const int count = static_cast<int>(std::count_if(targets_.begin(), targets_.end(), [](int t) { return t >= 0; }));
  // Loss → logits → final norm: the logits buffer becomes dLoss/dlogits.
  for (int n = 0; n < N; ++n) {
    float* lr = &logits_[usz(n) * V];
    if (targets_[n] < 0)
      std::fill_n(lr, V, 0.0f);
    else
      cross_entropy_backward_row(lr, V, targets_[n], 1.0f / static_cast<float>(count));
  }
  Vec dxn(usz(N) * D), dx(usz(N) * D, 0.0f);
  frozen_dyw(logits_.data(), classifier().data(), dxn.data(), N, D, V, false);
  rmsnorm_backward(x_final_.data(), rms_final_.data(), inv_rms_final_.data(), dxn.data(), dx.data(), N, D);

  for (int l = cfg_.n_layers - 1; l >= 0; --l) {
    if (fwd_checkpointed_) {
      // Recompute this layer's activations from its saved input and rng state.
      LayerCache& c = scratch();
      c.x = caches_[l]->x;
      std::mt19937_64 rng = layer_rng_[l];
      Vec out(usz(N) * D);
      layer_forward(l, out.data(), training_, rng, c);
      peak_act_bytes_ = std::max(peak_act_bytes_, cached_bytes());
      layer_backward(l, c, dx.data());
    } else {
      layer_backward(l, *caches_[l], dx.data());
    }
  }
}
//! [model-backward]

LlamaModel::LayerCache& LlamaModel::scratch() {
  if (!scratch_) scratch_ = std::make_unique<LayerCache>();
  return *scratch_;
}

std::int64_t LlamaModel::cached_bytes() const {
  std::int64_t n = 0;
  for (const auto& c : caches_)
    if (c) n += c->bytes();
  if (scratch_) n += scratch_->bytes();
  n += 4 * static_cast<std::int64_t>(x_final_.size() + inv_rms_final_.size() + xn_final_.size());
  return n;
}

// --- generation ----------------------------------------------------------------------

void LlamaModel::reset_kv() {
  kcache_.assign(usz(cfg_.n_layers), Vec(usz(cfg_.seq_len) * cfg_.kv_dim()));
  vcache_.assign(usz(cfg_.n_layers), Vec(usz(cfg_.seq_len) * cfg_.kv_dim()));
}

//! [decode-step]
// One token through the same building blocks, attending to the cached keys/values of
// all earlier positions instead of recomputing them.
const std::vector<float>& LlamaModel::decode_step(int token, int pos) {
  const int D = cfg_.dim, KV = cfg_.kv_dim(), HD = cfg_.hidden_dim, V = cfg_.vocab_size;
  const int H = cfg_.n_heads, hs = cfg_.head_size(), group = cfg_.n_heads / cfg_.n_kv_heads;
  if (token < 0 || token >= V) throw std::out_of_range("decode_step: token id " + std::to_string(token) + " out of range");
  if (pos < 0) throw std::out_of_range("decode_step: negative position " + std::to_string(pos));
  check_sequence_length(cfg_, pos + 1, "decode_step at position " + std::to_string(pos));
  if (kcache_.size() != usz(cfg_.n_layers)) reset_kv();
  std::mt19937_64 no_dropout;  // eval mode: never drawn from
  LoraCache lc;
  Vec x(tok_emb_.begin() + static_cast<std::ptrdiff_t>(usz(token) * D),
        tok_emb_.begin() + static_cast<std::ptrdiff_t>(usz(token + 1) * D));
  Vec xn(usz(D)), q(usz(D)), o(usz(D)), tmp(usz(D)), h1(usz(HD)), h3(usz(HD)), p(usz(pos) + 1);
  float inv = 0.0f;
  for (int l = 0; l < cfg_.n_layers; ++l) {
    const Layer& L = layers_[l];
    float* kc = &kcache_[l][usz(pos) * KV];
    float* vc = &vcache_[l][usz(pos) * KV];
    rmsnorm_forward(x.data(), L.rms_att.data(), xn.data(), &inv, 1, D, cfg_.norm_eps);
    linear(l, Proj::q, xn.data(), q.data(), 1, false, no_dropout, lc);
    linear(l, Proj::k, xn.data(), kc, 1, false, no_dropout, lc);
    linear(l, Proj::v, xn.data(), vc, 1, false, no_dropout, lc);
    rope(q.data(), 1, 1, pos, H, hs, rope_cos_, rope_sin_, false);
    rope(kc, 1, 1, pos, cfg_.n_kv_heads, hs, rope_cos_, rope_sin_, false);
    for (int h = 0; h < H; ++h)
      attend(&q[usz(h) * hs], &kcache_[l][usz(h / group) * hs], &vcache_[l][usz(h / group) * hs], pos + 1, KV, hs,
             p.data(), &o[usz(h) * hs]);
    linear(l, Proj::o, o.data(), tmp.data(), 1, false, no_dropout, lc);
    for (int i = 0; i < D; ++i) x[i] += tmp[i];
    rmsnorm_forward(x.data(), L.rms_ffn.data(), xn.data(), &inv, 1, D, cfg_.norm_eps);
    linear(l, Proj::gate, xn.data(), h1.data(), 1, false, no_dropout, lc);
    linear(l, Proj::up, xn.data(), h3.data(), 1, false, no_dropout, lc);
    for (int i = 0; i < HD; ++i) h1[i] = silu(h1[i]) * h3[i];
    linear(l, Proj::down, h1.data(), tmp.data(), 1, false, no_dropout, lc);
    for (int i = 0; i < D; ++i) x[i] += tmp[i];
  }
  rmsnorm_forward(x.data(), rms_final_.data(), xn.data(), &inv, 1, D, cfg_.norm_eps);
  dec_logits_.resize(usz(V));
  frozen_xwt(xn.data(), classifier().data(), dec_logits_.data(), 1, D, V);
  return dec_logits_;
}
//! [decode-step]

}  // namespace qlora
