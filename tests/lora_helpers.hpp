// Helpers shared by the tests that compare LoRA gradients: adapters with random non-zero
// B, all of a model's adapter gradients in one vector, the largest magnitude and the relative
// Frobenius error.
#pragma once

#include "llama_model.hpp"

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

namespace qlora::test {

/// Largest |a_i|, the scale the tests measure errors against.
inline double max_abs(const std::vector<float>& a) {
  double m = 0;
  for (float x : a) m = std::max(m, std::fabs(static_cast<double>(x)));
  return m;
}

/// ‖a − ref‖ / ‖ref‖; every element of a must be finite (a NaN is an element never written).
inline double rel_frobenius(const std::vector<float>& a, const std::vector<float>& ref) {
  REQUIRE(a.size() == ref.size());
  double num = 0, den = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    REQUIRE(std::isfinite(a[i]));
    num += (static_cast<double>(a[i]) - ref[i]) * (static_cast<double>(a[i]) - ref[i]);
    den += static_cast<double>(ref[i]) * ref[i];
  }
  return std::sqrt(num / den);
}

/// Adapters (r 4, alpha 8) with random non-zero B (PEFT starts B at 0, which would leave
/// dA = 0 and hide half the backward).
inline void add_random_lora(LlamaModel& m, float dropout, std::uint64_t seed) {
  LoraSetup s;
  s.config.r = 4;
  s.config.alpha = 8.0f;
  s.config.dropout = dropout;
  std::mt19937_64 rng(seed);
  m.add_lora(s, rng);
  std::normal_distribution<float> nd(0.0f, 0.02f);
  for (auto& [name, a] : m.named_adapters())
    for (float& b : a->B) b = nd(rng);
}

/// dA then dB of every adapter, in named_adapters() order.
inline std::vector<float> host_grads(LlamaModel& m) {
  std::vector<float> g;
  for (auto& [name, a] : m.named_adapters()) {
    g.insert(g.end(), a->dA.begin(), a->dA.end());
    g.insert(g.end(), a->dB.begin(), a->dB.end());
  }
  return g;
}

}  // namespace qlora::test
