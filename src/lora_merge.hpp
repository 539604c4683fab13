// Merging a LoRA adapter into a 4-bit base (chapter 4, "Merging into a 4-bit
// base"). Merging W' = W + s·B·A (lora_merge in lora.hpp) is exact in float32,
// but a QLoRA base is stored in NF4: the merged weight has to be dequantized,
// merged and then either kept in BF16 (2 bytes/weight) or requantized to 4 bits,
// which rounds s·B·A together with W onto the 16-level NF4 grid. This file
// implements both paths and measures what each costs, on random or real weights
// (`qlora merge-error` prints the measurement).
#pragma once

#include "bf16.hpp"
#include "lora.hpp"
#include "quant4.hpp"

#include <random>
#include <span>
#include <vector>

namespace qlora {

/// Dequantize the 4-bit base, add s·B·A, round to BF16.
std::vector<bf16> merge_into_bf16(const Quant4Tensor& base, const LoraAdapter& ad, const LoraConfig& cfg);

/// Dequantize the 4-bit base, add s·B·A, quantize again with the base's own settings.
Quant4Tensor merge_into_quant4(const Quant4Tensor& base, const LoraAdapter& ad, const LoraConfig& cfg);

/// A stand-in for a trained adapter: A from PEFT's init, B normal, then B scaled so the
/// update s·B·A has the given root-mean-square value.
LoraAdapter synthetic_adapter(int in, int out, const LoraConfig& cfg, double delta_rms, std::mt19937_64& rng);

/// Normal(0, std) weights from rng (Box–Muller on uniform01, the same numbers everywhere).
std::vector<float> normal_weights(std::size_t n, double std, std::mt19937_64& rng);

/// Errors of both merge paths, measured against the exact merge deq(Wq) + s·B·A.
struct MergeError {
  double weight_rms = 0;      ///< rms of the original weight W
  double base_quant_rms = 0;  ///< rms of deq(quant(W)) − W: the error already in the base
  double delta_rms = 0;       ///< rms of the update s·B·A
  double bf16_rms = 0, bf16_max = 0;  ///< merge into BF16
  double q4_rms = 0, q4_max = 0;      ///< dequantize → merge → requantize
  /// rms of (requantized merge − deq(Wq)) − s·B·A, over delta_rms: the share of the
  /// update lost by requantizing (1 would mean nothing of it survives on average).
  double q4_delta_rel = 0;
  double bf16_delta_rel = 0;  ///< the same for the BF16 merge
};

/// W: out×in float32 weights (the unquantized base). Quantizes W with (type, blocksize,
/// double_quant), then merges the adapter both ways and compares with the exact merge.
MergeError measure_merge_error(std::span<const float> W, const LoraAdapter& ad, const LoraConfig& cfg, QuantType type,
                               int blocksize, bool double_quant);

}  // namespace qlora
