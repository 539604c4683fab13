// Merging LoRA into a 4-bit base and measuring the cost (chapter 4). See lora_merge.hpp.
#include "lora_merge.hpp"

#include <algorithm>
#include <cmath>
#include <numbers>
#include <stdexcept>
#include <string>

namespace qlora {

namespace {

void check_base(const Quant4Tensor& base, const LoraAdapter& ad) {
  if (base.numel != static_cast<std::int64_t>(ad.out) * ad.in)
    throw std::invalid_argument("LoRA merge: base has " + std::to_string(base.numel) + " values, adapter expects " +
                                std::to_string(ad.out) + "×" + std::to_string(ad.in));
}

// deq(base) + s·B·A in float32: the exact merge both paths round.
std::vector<float> merged_f32(const Quant4Tensor& base, const LoraAdapter& ad, const LoraConfig& cfg) {
  check_base(base, ad);
  std::vector<float> w = dequantize_4bit_f32(base);
  lora_merge(ad, cfg, w.data());
  return w;
}

double rms(const std::vector<double>& v) {
  double s = 0.0;
  for (double x : v) s += x * x;
  return std::sqrt(s / static_cast<double>(v.size()));
}

}  // namespace

//! [merge-4bit]
std::vector<bf16> merge_into_bf16(const Quant4Tensor& base, const LoraAdapter& ad, const LoraConfig& cfg) {
  return to_bf16(merged_f32(base, ad, cfg));
}

Quant4Tensor merge_into_quant4(const Quant4Tensor& base, const LoraAdapter& ad, const LoraConfig& cfg) {
  // The update is far smaller than a 4-bit step of W (see `qlora merge-error`), so
  // requantizing rounds most of it away: merged 4-bit models lose adapter quality.
  return quantize_4bit(merged_f32(base, ad, cfg), base.shape, base.type, base.blocksize, base.double_quant);
}
//! [merge-4bit]

std::vector<float> normal_weights(std::size_t n, double std, std::mt19937_64& rng) {
  std::vector<float> w(n);
  for (std::size_t k = 0; k < n; k += 2) {
    const double u1 = 1.0 - uniform01(rng), u2 = uniform01(rng);  // u1 in (0, 1]: log is finite
    const double radius = std * std::sqrt(-2.0 * std::log(u1));
    w[k] = static_cast<float>(radius * std::cos(2.0 * std::numbers::pi * u2));
    if (k + 1 < n) w[k + 1] = static_cast<float>(radius * std::sin(2.0 * std::numbers::pi * u2));
  }
  return w;
}

LoraAdapter synthetic_adapter(int in, int out, const LoraConfig& cfg, double delta_rms, std::mt19937_64& rng) {
  LoraAdapter ad(in, out, cfg.r);
  ad.init_peft(rng);
  ad.B = normal_weights(ad.B.size(), 1.0, rng);
  std::vector<float> delta(static_cast<std::size_t>(out) * in, 0.0f);
  lora_merge(ad, cfg, delta.data());
  double sq = 0.0;
  for (float d : delta) sq += (double)d * d;
  const double now = std::sqrt(sq / static_cast<double>(delta.size()));
  for (float& b : ad.B) b = static_cast<float>(b * (delta_rms / now));  // s·B·A is linear in B
  return ad;
}

MergeError measure_merge_error(std::span<const float> W, const LoraAdapter& ad, const LoraConfig& cfg, QuantType type,
                               int blocksize, bool double_quant) {
  const std::size_t n = W.size();
  if (n != static_cast<std::size_t>(ad.out) * ad.in)
    throw std::invalid_argument("merge error: W has " + std::to_string(n) + " values, adapter expects " +
                                std::to_string(ad.out) + "×" + std::to_string(ad.in));
  const Quant4Tensor base = quantize_4bit(W, {ad.out, ad.in}, type, blocksize, double_quant);
  const std::vector<float> deq = dequantize_4bit_f32(base);
  const std::vector<float> exact = merged_f32(base, ad, cfg);
  const std::vector<bf16> as_bf16 = merge_into_bf16(base, ad, cfg);
  const std::vector<float> as_q4 = dequantize_4bit_f32(merge_into_quant4(base, ad, cfg));

  std::vector<double> w(n), qerr(n), delta(n), e_bf16(n), e_q4(n);
  MergeError m;
  for (std::size_t k = 0; k < n; ++k) {
    w[k] = W[k];
    qerr[k] = (double)deq[k] - W[k];
    delta[k] = (double)exact[k] - deq[k];
    e_bf16[k] = (double)bf16_to_f32(as_bf16[k]) - exact[k];
    e_q4[k] = (double)as_q4[k] - exact[k];
    m.bf16_max = std::max(m.bf16_max, std::fabs(e_bf16[k]));
    m.q4_max = std::max(m.q4_max, std::fabs(e_q4[k]));
  }
  m.weight_rms = rms(w);
  m.base_quant_rms = rms(qerr);
  m.delta_rms = rms(delta);
  m.bf16_rms = rms(e_bf16);
  m.q4_rms = rms(e_q4);
  // (merged − deq) − delta = merged − exact: the error IS the part of the update lost.
  m.q4_delta_rel = m.q4_rms / m.delta_rms;
  m.bf16_delta_rel = m.bf16_rms / m.delta_rms;
  return m;
}

}  // namespace qlora
