// AdamW CPU reference and gradient clipping (chapter 6). See adamw.hpp.
#include "adamw.hpp"

#include "safetensors.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <set>
#include <stdexcept>

namespace qlora {

BiasCorrection bias_correction(const AdamWConfig& cfg, std::int64_t t) {
  if (t < 1) throw std::invalid_argument("AdamW: step count must be >= 1, got " + std::to_string(t));
  const double td = static_cast<double>(t);
  return {static_cast<float>(1.0 - std::pow(double{cfg.beta1}, td)),
          static_cast<float>(std::sqrt(1.0 - std::pow(double{cfg.beta2}, td)))};
}

//! [adamw_update]
void adamw_update(float* p, const float* g, float* m, float* v, std::size_t n, float lr, const AdamWConfig& cfg,
                  BiasCorrection bc) {
  const float decay = 1.0f - lr * cfg.weight_decay;  // decoupled: shrink p, independent of g
  const float step_size = lr / bc.c1;
  for (std::size_t i = 0; i < n; ++i) {
    p[i] *= decay;
    m[i] = cfg.beta1 * m[i] + (1.0f - cfg.beta1) * g[i];
    v[i] = cfg.beta2 * v[i] + (1.0f - cfg.beta2) * g[i] * g[i];
    const float denom = std::sqrt(v[i]) / bc.c2_sqrt + cfg.eps;
    p[i] -= step_size * (m[i] / denom);
  }
}
//! [adamw_update]

//! [clip_grad_norm]
double global_grad_norm(std::span<const std::span<const float>> grads) {
  double sum_sq = 0.0;
  for (auto g : grads)
    for (float x : g) sum_sq += double{x} * double{x};
  return std::sqrt(sum_sq);
}

float clip_scale(double norm, double max_norm) {
  // torch: clip_coef = max_norm / (total_norm + 1e-6), clamped to at most 1.
  return static_cast<float>(std::min(1.0, max_norm / (norm + 1e-6)));
}

double clip_grad_norm(std::span<const std::span<float>> grads, double max_norm) {
  if (!(max_norm > 0.0)) throw std::invalid_argument("clip_grad_norm: max_norm must be > 0");
  std::vector<std::span<const float>> views(grads.begin(), grads.end());
  const double norm = global_grad_norm(views);
  const float scale = clip_scale(norm, max_norm);
  if (scale < 1.0f)
    for (auto g : grads)
      for (float& x : g) x *= scale;
  return norm;
}
//! [clip_grad_norm]

void validate_params(const std::vector<OptimParam>& params) {
  std::set<std::string> names;
  for (const auto& p : params) {
    if (p.name.empty()) throw std::invalid_argument("optimizer: a parameter has an empty name");
    if (p.size > 0 && (p.value == nullptr || p.grad == nullptr))
      throw std::invalid_argument("optimizer: parameter '" + p.name + "' has a null value or gradient pointer");
    if (!names.insert(p.name).second)
      throw std::invalid_argument("optimizer: parameter name '" + p.name + "' appears twice");
  }
}

AdamW::AdamW(std::vector<OptimParam> params, AdamWConfig cfg) : params_(std::move(params)), cfg_(cfg) {
  validate_params(params_);
  for (const auto& p : params_) {
    m_.emplace_back(p.size, 0.0f);
    v_.emplace_back(p.size, 0.0f);
  }
}

void AdamW::step(float lr) {
  ++t_;
  const BiasCorrection bc = bias_correction(cfg_, t_);
  for (std::size_t i = 0; i < params_.size(); ++i)
    adamw_update(params_[i].value, params_[i].grad, m_[i].data(), v_[i].data(), params_[i].size, lr, cfg_, bc);
}

double AdamW::clip_grad_norm(double max_norm) {
  std::vector<std::span<float>> grads;
  for (const auto& p : params_) grads.emplace_back(p.grad, p.size);
  return qlora::clip_grad_norm(grads, max_norm);
}

std::string float_text(float x) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.9g", double{x});
  return buf;
}

void save_adamw_state(const std::filesystem::path& path, const AdamWConfig& cfg,
                      const std::vector<OptimParam>& params, std::int64_t step,
                      const std::vector<std::vector<float>>& m, const std::vector<std::vector<float>>& v) {
  SafeTensors st;
  st.metadata = {{"optimizer", "adamw"},        {"step", std::to_string(step)},
                 {"beta1", float_text(cfg.beta1)}, {"beta2", float_text(cfg.beta2)},
                 {"eps", float_text(cfg.eps)},     {"weight_decay", float_text(cfg.weight_decay)}};
  for (std::size_t i = 0; i < params.size(); ++i) {
    const auto n = static_cast<std::int64_t>(params[i].size);
    st.tensors[params[i].name + ".exp_avg"] = Tensor::from_f32(m.at(i), {n});
    st.tensors[params[i].name + ".exp_avg_sq"] = Tensor::from_f32(v.at(i), {n});
  }
  write_safetensors(path, st);
}

void AdamW::save_state(const std::filesystem::path& path) const {
  save_adamw_state(path, cfg_, params_, t_, m_, v_);
}

std::int64_t read_state_step(const SafeTensors& st, const std::filesystem::path& path,
                             const std::string& expected_optimizer) {
  auto meta = [&](const std::string& key) -> const std::string& {
    auto it = st.metadata.find(key);
    if (it == st.metadata.end())
      throw std::runtime_error("optimizer state " + path.string() + ": metadata has no '" + key + "' entry");
    return it->second;
  };
  if (meta("optimizer") != expected_optimizer)
    throw std::runtime_error("optimizer state " + path.string() + ": written by optimizer '" + meta("optimizer") +
                             "', expected '" + expected_optimizer + "'");
  const std::string& s = meta("step");
  std::size_t used = 0;
  long long step = -1;
  try {
    step = std::stoll(s, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used != s.size() || s.empty() || step < 0)
    throw std::runtime_error("optimizer state " + path.string() + ": step '" + s + "' is not a count");
  return step;
}

std::vector<float> read_state_f32(const SafeTensors& st, const std::filesystem::path& path,
                                  const std::string& name, std::size_t size) {
  if (!st.contains(name))
    throw std::runtime_error("optimizer state " + path.string() + ": missing tensor '" + name + "'");
  const Tensor& t = st.at(name);
  if (t.dtype != DType::F32 || t.numel() != static_cast<std::int64_t>(size))
    throw std::runtime_error("optimizer state " + path.string() + ": tensor '" + name + "' is " +
                             to_string(t.dtype) + " with " + std::to_string(t.numel()) +
                             " elements, expected F32 with " + std::to_string(size));
  return t.to_f32();
}

AdamWStateData load_adamw_state(const std::filesystem::path& path, const std::vector<OptimParam>& params) {
  const SafeTensors st = read_safetensors(path);
  AdamWStateData d;
  d.step = read_state_step(st, path, "adamw");
  if (st.tensors.size() != 2 * params.size())
    throw std::runtime_error("optimizer state " + path.string() + ": holds " + std::to_string(st.tensors.size()) +
                             " tensors, expected " + std::to_string(2 * params.size()) +
                             " (exp_avg and exp_avg_sq of each parameter)");
  for (const auto& p : params) {
    d.m.push_back(read_state_f32(st, path, p.name + ".exp_avg", p.size));
    d.v.push_back(read_state_f32(st, path, p.name + ".exp_avg_sq", p.size));
  }
  return d;
}

void AdamW::load_state(const std::filesystem::path& path) {
  // Everything is read before the live state changes, so a bad file leaves the optimizer as it was.
  AdamWStateData d = load_adamw_state(path, params_);
  m_ = std::move(d.m);
  v_ = std::move(d.v);
  t_ = d.step;
}

}  // namespace qlora
