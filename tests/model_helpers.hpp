// Inputs shared by the model tests: a tiny LLaMA configuration for exactness tests,
// seeded random token ids and seeded uniform random values.
#pragma once

#include "llama2c.hpp"
#include "lora.hpp"

#include <cstdint>
#include <random>
#include <vector>

namespace qlora::test {

/// A 2-layer LLaMA with 16-wide layers, 4 query heads and `n_kv_heads` kv heads, vocabulary 32.
inline LlamaConfig tiny_config(int n_kv_heads, bool shared) {
  LlamaConfig c;
  c.dim = 16;
  c.hidden_dim = 24;
  c.n_layers = 2;
  c.n_heads = 4;
  c.n_kv_heads = n_kv_heads;
  c.vocab_size = 32;
  c.seq_len = 8;
  c.shared_classifier = shared;
  return c;
}

/// n token ids uniform in [0, vocab) from a seeded generator.
inline std::vector<int> random_tokens(int n, int vocab, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<int> t(static_cast<std::size_t>(n));
  for (int& x : t) x = static_cast<int>(rng() % static_cast<std::uint64_t>(vocab));
  return t;
}

/// n values uniform in [lo, hi) from `rng` (chapter 4's uniform01: the same on every platform).
inline std::vector<float> random_vec(std::size_t n, std::mt19937_64& rng, double lo = -1.0, double hi = 1.0) {
  std::vector<float> v(n);
  for (float& x : v) x = static_cast<float>(lo + (hi - lo) * uniform01(rng));
  return v;
}

}  // namespace qlora::test
