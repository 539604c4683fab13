// LoRA: a low-rank update trained beside a frozen base weight (chapter 4, "LoRA").
//   y = x·Wᵀ + s · (dropout(x)·Aᵀ)·Bᵀ,   A: r×in, B: out×r, s = alpha/r (rsLoRA: alpha/√r)
// PEFT's initialisation: A ~ Kaiming-uniform(a=√5) = U(−1/√in, 1/√in), B = 0, so the
// model is unchanged at step 0. Dropout touches the LoRA input only. The base
// weight is frozen: backward gives dX, dA and dB, never dW.
#pragma once

#include <cstdint>
#include <random>
#include <vector>

namespace qlora {

struct LoraConfig {
  int r = 16;
  float alpha = 32.0f;
  float dropout = 0.05f;
  bool use_rslora = false;
  /// alpha / r, or alpha / sqrt(r) with rsLoRA.
  float scale() const;
};

/// The trainable adapter of one linear layer, with its gradients.
struct LoraAdapter {
  int in = 0, out = 0, r = 0;
  std::vector<float> A, B;    ///< A: r×in, B: out×r (row-major, PEFT's shapes)
  std::vector<float> dA, dB;  ///< gradients, same shapes (accumulated by backward)

  LoraAdapter() = default;
  LoraAdapter(int in_features, int out_features, int rank);
  /// PEFT init: A uniform in ±1/√in from rng, B zero.
  void init_peft(std::mt19937_64& rng);
  void zero_grad();
};

/// Uniform double in [0, 1) from the top 53 bits of one rng draw. Written out (not
/// std::uniform_real_distribution) so the numbers are the same with every standard library.
double uniform01(std::mt19937_64& rng);

/// Inverted-dropout mask of n values: draws ONE 64-bit seed = rng() and returns
/// lora_dropout_mask_hashed(n, p, seed). p must be in [0, 1). The GPU path draws its
/// seed the same way, so CPU and GPU drop the same elements for the same rng.
std::vector<float> lora_dropout_mask(std::int64_t n, float p, std::mt19937_64& rng);

/// The dropout mask as a function of (seed, index): element i is kept (value 1/(1-p))
/// iff u_i >= p, with u_i = (splitmix64(seed + (i+1)·0x9E3779B97F4A7C15) >> 40)·2⁻²⁴,
/// dropped (0) otherwise. kernels/lora.cu computes the same integer hash per thread.
std::vector<float> lora_dropout_mask_hashed(std::int64_t n, float p, std::uint64_t seed);

/// What forward keeps for backward: the dropout mask and the rank-r activations.
struct LoraCache {
  std::vector<float> mask;  ///< T×in, values 0 or 1/(1-p); empty when dropout is off
  std::vector<float> xa;    ///< T×r: dropout(x)·Aᵀ
};

/// Adds the LoRA term to y (T×out, which already holds x·Wᵀ): y += s·(dropout(x)·Aᵀ)·Bᵀ.
/// `training` enables dropout (mask drawn from rng); plain loops. When these T rows are
/// rows first_row.. of a larger batch (a data-parallel rank's share), the mask is that
/// batch's mask of those rows.
void lora_forward_ref(const LoraAdapter& ad, const LoraConfig& cfg, const float* x, float* y, int T, bool training,
                      std::mt19937_64& rng, LoraCache& cache, std::int64_t first_row = 0);

/// Backward of the LoRA term: accumulates dA, dB and ADDS the LoRA part of dX
/// (the caller adds dY·W for the frozen base). Plain loops.
void lora_backward_ref(LoraAdapter& ad, const LoraConfig& cfg, const float* x, const float* dy, float* dx, int T,
                       const LoraCache& cache);

/// Same two functions through BLAS (matmul.hpp), the CPU execution path.
void lora_forward(const LoraAdapter& ad, const LoraConfig& cfg, const float* x, float* y, int T, bool training,
                  std::mt19937_64& rng, LoraCache& cache, std::int64_t first_row = 0);
void lora_backward(LoraAdapter& ad, const LoraConfig& cfg, const float* x, const float* dy, float* dx, int T,
                   const LoraCache& cache);

/// Merge: W' = W + s·B·A (W: out×in float32); unmerge subtracts it again.
void lora_merge(const LoraAdapter& ad, const LoraConfig& cfg, float* W);
void lora_unmerge(const LoraAdapter& ad, const LoraConfig& cfg, float* W);

}  // namespace qlora
