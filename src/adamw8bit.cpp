// 8-bit blockwise AdamW, CPU reference (chapter 6). See adamw8bit.hpp.
#include "adamw8bit.hpp"

#include "dynamic_map.hpp"
#include "safetensors.hpp"

#include <algorithm>
#include <cmath>
#include <stdexcept>

namespace qlora {

const std::array<float, 256>& adam8bit_map1() {
  static const std::array<float, 256> map = dynamic_map(true);
  return map;
}

const std::array<float, 256>& adam8bit_map2() {
  static const std::array<float, 256> map = dynamic_map(false);
  return map;
}

Adam8bitStepConsts adam8bit_consts(const AdamWConfig& cfg, float lr, std::int64_t t) {
  const BiasCorrection bc = bias_correction(cfg, t);
  return {cfg.beta1,
          1.0f - cfg.beta1,
          cfg.beta2,
          1.0f - cfg.beta2,
          -lr * bc.c2_sqrt / bc.c1,
          cfg.eps * bc.c2_sqrt,
          1.0f - lr * cfg.weight_decay,
          cfg.weight_decay > 0.0f};
}

std::uint8_t requantize_state(float s, float absmax, const std::array<float, 256>& map, bool fix_sign) {
  const float x = absmax > 0.0f ? s / absmax : 0.0f;
  std::uint8_t c = quantize_dynamic(x, map);
  // Nearest-code rounding can turn a tiny negative m into the code of 0 (+0): bitsandbytes
  // then steps one code down (or up) so the momentum keeps its direction.
  if (fix_sign && std::signbit(map[c]) != std::signbit(s)) c = static_cast<std::uint8_t>(s > 0.0f ? c + 1 : c - 1);
  return c;
}

//! [adamw8bit_update]
void adamw8bit_update(float* p, const float* g, std::uint8_t* c1, std::uint8_t* c2, float* absmax1, float* absmax2,
                      std::size_t n, const Adam8bitStepConsts& k) {
  const auto& map1 = adam8bit_map1();
  const auto& map2 = adam8bit_map2();
  float s1[kOptimBlock], s2[kOptimBlock];
  for (std::size_t base = 0, b = 0; base < n; base += kOptimBlock, ++b) {
    const std::size_t len = std::min(kOptimBlock, n - base);
    // 1-3: dequantize with the old absmax, update in float32, find the new absmax.
    float max1 = 0.0f, max2 = 0.0f;
    for (std::size_t j = 0; j < len; ++j) {
      const float gj = g[base + j];
      s1[j] = map1[c1[base + j]] * absmax1[b];
      s1[j] = s1[j] * k.beta1 + k.one_minus_beta1 * gj;
      s2[j] = map2[c2[base + j]] * absmax2[b];
      s2[j] = s2[j] * k.beta2 + k.one_minus_beta2 * gj * gj;
      max1 = std::max(max1, std::abs(s1[j]));
      max2 = std::max(max2, std::abs(s2[j]));
    }
    absmax1[b] = max1;
    absmax2[b] = max2;
    // 4-5: update the parameters from the float states, then store the states as codes.
    for (std::size_t j = 0; j < len; ++j) {
      float& pj = p[base + j];
      pj = pj + k.step_size * (s1[j] / (std::sqrt(s2[j]) + k.eps_scaled));
      if (k.apply_decay) pj = pj * k.decay;
      c1[base + j] = requantize_state(s1[j], max1, map1, true);
      c2[base + j] = requantize_state(s2[j], max2, map2, false);
    }
  }
}
//! [adamw8bit_update]

std::size_t adam8bit_state_bytes(std::size_t n) {
  if (n < kMin8bitSize) return 2 * n * sizeof(float);
  const std::size_t blocks = (n + kOptimBlock - 1) / kOptimBlock;
  return 2 * n + 2 * blocks * sizeof(float);
}

AdamW8bit::AdamW8bit(std::vector<OptimParam> params, AdamWConfig cfg) : params_(std::move(params)), cfg_(cfg) {
  validate_params(params_);
  for (std::size_t i = 0; i < params_.size(); ++i) {
    const std::size_t n = params_[i].size;
    State s;
    if (is_8bit(i)) {
      const std::size_t blocks = (n + kOptimBlock - 1) / kOptimBlock;
      // Codes 0 with absmax 0 dequantize to 0, as bitsandbytes initialises them.
      s.c1.assign(n, 0);
      s.c2.assign(n, 0);
      s.absmax1.assign(blocks, 0.0f);
      s.absmax2.assign(blocks, 0.0f);
    } else {
      s.m32.assign(n, 0.0f);
      s.v32.assign(n, 0.0f);
    }
    state_.push_back(std::move(s));
  }
}

void AdamW8bit::step(float lr) {
  ++t_;
  const Adam8bitStepConsts k = adam8bit_consts(cfg_, lr, t_);
  const BiasCorrection bc = bias_correction(cfg_, t_);
  for (std::size_t i = 0; i < params_.size(); ++i) {
    const OptimParam& p = params_[i];
    State& s = state_[i];
    if (is_8bit(i))
      adamw8bit_update(p.value, p.grad, s.c1.data(), s.c2.data(), s.absmax1.data(), s.absmax2.data(), p.size, k);
    else
      adamw_update(p.value, p.grad, s.m32.data(), s.v32.data(), p.size, lr, cfg_, bc);
  }
}

double AdamW8bit::clip_grad_norm(double max_norm) {
  std::vector<std::span<float>> grads;
  for (const auto& p : params_) grads.emplace_back(p.grad, p.size);
  return qlora::clip_grad_norm(grads, max_norm);
}

std::vector<float> AdamW8bit::exp_avg(std::size_t i) const {
  const State& s = state_.at(i);
  if (!is_8bit(i)) return s.m32;
  std::vector<float> out(params_[i].size);
  dequantize_blockwise_8bit(s.c1, static_cast<int>(kOptimBlock), adam8bit_map1(), s.absmax1, out);
  return out;
}

std::vector<float> AdamW8bit::exp_avg_sq(std::size_t i) const {
  const State& s = state_.at(i);
  if (!is_8bit(i)) return s.v32;
  std::vector<float> out(params_[i].size);
  dequantize_blockwise_8bit(s.c2, static_cast<int>(kOptimBlock), adam8bit_map2(), s.absmax2, out);
  return out;
}

std::size_t AdamW8bit::state_bytes() const {
  std::size_t total = 0;
  for (const auto& p : params_) total += adam8bit_state_bytes(p.size);
  return total;
}

void save_adamw8bit_state(const std::filesystem::path& path, const AdamWConfig& cfg,
                          const std::vector<OptimParam>& params, std::int64_t step,
                          const std::vector<AdamW8bit::State>& states) {
  SafeTensors st;
  st.metadata = {{"optimizer", "adamw8bit"},
                 {"step", std::to_string(step)},
                 {"block_size", std::to_string(kOptimBlock)},
                 {"beta1", float_text(cfg.beta1)},
                 {"beta2", float_text(cfg.beta2)},
                 {"eps", float_text(cfg.eps)},
                 {"weight_decay", float_text(cfg.weight_decay)}};
  for (std::size_t i = 0; i < params.size(); ++i) {
    const std::string& name = params[i].name;
    const AdamW8bit::State& s = states.at(i);
    const auto n = static_cast<std::int64_t>(params[i].size);
    if (params[i].size >= kMin8bitSize) {
      const auto blocks = static_cast<std::int64_t>(s.absmax1.size());
      st.tensors[name + ".state1"] = Tensor::from_u8(s.c1, {n});
      st.tensors[name + ".state2"] = Tensor::from_u8(s.c2, {n});
      st.tensors[name + ".absmax1"] = Tensor::from_f32(s.absmax1, {blocks});
      st.tensors[name + ".absmax2"] = Tensor::from_f32(s.absmax2, {blocks});
    } else {
      st.tensors[name + ".exp_avg"] = Tensor::from_f32(s.m32, {n});
      st.tensors[name + ".exp_avg_sq"] = Tensor::from_f32(s.v32, {n});
    }
  }
  write_safetensors(path, st);
}

void AdamW8bit::save_state(const std::filesystem::path& path) const {
  save_adamw8bit_state(path, cfg_, params_, t_, state_);
}

namespace {

std::vector<std::uint8_t> read_codes(const SafeTensors& st, const std::filesystem::path& path,
                                     const std::string& name, std::size_t size) {
  if (!st.contains(name))
    throw std::runtime_error("optimizer state " + path.string() + ": missing tensor '" + name + "'");
  const Tensor& t = st.at(name);
  if (t.dtype != DType::U8 || t.numel() != static_cast<std::int64_t>(size))
    throw std::runtime_error("optimizer state " + path.string() + ": tensor '" + name + "' is " +
                             to_string(t.dtype) + " with " + std::to_string(t.numel()) +
                             " elements, expected U8 with " + std::to_string(size));
  return t.data;
}

void check_absmax(const std::vector<float>& absmax, const std::filesystem::path& path, const std::string& name) {
  for (float a : absmax)
    if (!(a >= 0.0f) || std::isinf(a))
      throw std::runtime_error("optimizer state " + path.string() + ": tensor '" + name +
                               "' holds a negative, NaN or infinite absmax");
}

}  // namespace

AdamW8bitStateData load_adamw8bit_state(const std::filesystem::path& path, const std::vector<OptimParam>& params) {
  const SafeTensors st = read_safetensors(path);
  AdamW8bitStateData d;
  d.step = read_state_step(st, path, "adamw8bit");
  auto it = st.metadata.find("block_size");
  if (it == st.metadata.end() || it->second != std::to_string(kOptimBlock))
    throw std::runtime_error("optimizer state " + path.string() + ": block_size must be " +
                             std::to_string(kOptimBlock));
  std::size_t expected = 0;
  for (const auto& p : params) {
    const std::size_t n = p.size;
    AdamW8bit::State s;
    if (n >= kMin8bitSize) {
      const std::size_t blocks = (n + kOptimBlock - 1) / kOptimBlock;
      s.c1 = read_codes(st, path, p.name + ".state1", n);
      s.c2 = read_codes(st, path, p.name + ".state2", n);
      s.absmax1 = read_state_f32(st, path, p.name + ".absmax1", blocks);
      s.absmax2 = read_state_f32(st, path, p.name + ".absmax2", blocks);
      check_absmax(s.absmax1, path, p.name + ".absmax1");
      check_absmax(s.absmax2, path, p.name + ".absmax2");
      expected += 4;
    } else {
      s.m32 = read_state_f32(st, path, p.name + ".exp_avg", n);
      s.v32 = read_state_f32(st, path, p.name + ".exp_avg_sq", n);
      expected += 2;
    }
    d.states.push_back(std::move(s));
  }
  if (st.tensors.size() != expected)
    throw std::runtime_error("optimizer state " + path.string() + ": holds " + std::to_string(st.tensors.size()) +
                             " tensors, expected " + std::to_string(expected));
  return d;
}

void AdamW8bit::load_state(const std::filesystem::path& path) {
  AdamW8bitStateData d = load_adamw8bit_state(path, params_);  // a bad file throws before anything changes
  state_ = std::move(d.states);
  t_ = d.step;
}

}  // namespace qlora
