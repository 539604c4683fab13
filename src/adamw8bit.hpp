// 8-bit AdamW with blockwise-quantized states, as bitsandbytes' AdamW8bit /
// paged_adamw_8bit (Dettmers et al., "8-bit Optimizers via Block-wise Quantization"):
// the CPU reference of chapter 6. Each state tensor is split into blocks of 256
// values; a block stores one float absmax and 256 one-byte codes into the dynamic
// map of dynamic_map.hpp: the signed map for the first moment m (it has a sign),
// the unsigned map for the second moment v (never negative, so all 256 codes go to
// magnitudes). State memory: 2 bytes + 8/256 bytes of absmax = 2.03125 bytes per
// parameter, against 8 bytes for FP32 m and v.
//
// One step of one block (the order of bitsandbytes' kOptimizerStatic8bit2StateBlockwise):
//   1. dequantize: m = map1[c1]·absmax1, v = map2[c2]·absmax2
//   2. update in float32: m = β1·m + (1−β1)·g, v = β2·v + (1−β2)·g·g
//   3. the block's new absmax is the max |.| of the *updated* states
//   4. p ← p − (lr·√(1−β2ᵗ)/(1−β1ᵗ)) · m / (√v + ε·√(1−β2ᵗ)), then p ← p·(1 − lr·λ)
//      (algebraically torch's AdamW update; bitsandbytes applies the decay after it)
//   5. requantize m/absmax1 and v/absmax2 to the nearest code; if rounding flipped
//      the sign of m, step one code back towards it
// The parameter update uses the float states of step 2, not their quantized values.
// Tensors smaller than 4096 elements keep FP32 states (bitsandbytes' min_8bit_size):
// their absmax overhead would be relatively large and their memory is negligible.
#pragma once

#include "adamw.hpp"

#include <array>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <span>
#include <vector>

namespace qlora {

/// Values per quantization block of the optimizer states (bitsandbytes BLOCKSIZE_2STATE).
inline constexpr std::size_t kOptimBlock = 256;
/// Tensors with fewer elements keep FP32 states (bitsandbytes' min_8bit_size default).
inline constexpr std::size_t kMin8bitSize = 4096;

/// The two code books: signed dynamic map for m, unsigned for v.
const std::array<float, 256>& adam8bit_map1();
const std::array<float, 256>& adam8bit_map2();

/// The host-side constants of one 8-bit step, computed once and shared with the CUDA kernel
/// so both see identical floats.
struct Adam8bitStepConsts {
  float beta1, one_minus_beta1, beta2, one_minus_beta2;
  float step_size;    ///< −lr·√(1−β2ᵗ)/(1−β1ᵗ)
  float eps_scaled;   ///< ε·√(1−β2ᵗ)
  float decay;        ///< 1 − lr·λ
  bool apply_decay;   ///< λ > 0
};
Adam8bitStepConsts adam8bit_consts(const AdamWConfig& cfg, float lr, std::int64_t t);

/// Quantize one updated state value against its block absmax (step 5 above). A zero absmax
/// (the whole block is zero) gives the code of 0.
std::uint8_t requantize_state(float s, float absmax, const std::array<float, 256>& map, bool fix_sign);

/// One 8-bit AdamW update of one tensor of n elements, in place: codes c1, c2 (n bytes each),
/// absmax1, absmax2 (ceil(n/256) floats each). The reference of
/// kernels/adamw.cu:adamw8bit_blockwise_kernel.
void adamw8bit_update(float* p, const float* g, std::uint8_t* c1, std::uint8_t* c2, float* absmax1, float* absmax2,
                      std::size_t n, const Adam8bitStepConsts& k);

/// Bytes of optimizer state for a tensor of n elements (8-bit or FP32 by size).
std::size_t adam8bit_state_bytes(std::size_t n);

/// 8-bit AdamW over a list of tensors. Same interface as AdamW.
class AdamW8bit {
 public:
  explicit AdamW8bit(std::vector<OptimParam> params, AdamWConfig cfg = {});

  void step(float lr);
  double clip_grad_norm(double max_norm);

  std::int64_t steps() const { return t_; }
  const std::vector<OptimParam>& params() const { return params_; }
  /// Whether tensor i has 8-bit states (else FP32, below kMin8bitSize).
  bool is_8bit(std::size_t i) const { return params_.at(i).size >= kMin8bitSize; }
  /// Dequantized states of tensor i (for tests and for comparing with AdamW).
  std::vector<float> exp_avg(std::size_t i) const;
  std::vector<float> exp_avg_sq(std::size_t i) const;
  /// Total bytes of optimizer state held.
  std::size_t state_bytes() const;

  /// Saves codes (U8) and absmax (F32) as "NAME.state1", "NAME.absmax1", "NAME.state2",
  /// "NAME.absmax2" (or F32 "NAME.exp_avg"/".exp_avg_sq" for small tensors), atomically.
  void save_state(const std::filesystem::path& path) const;
  /// Throws std::runtime_error naming the file and tensor on any mismatch; a failed load
  /// leaves the optimizer unchanged.
  void load_state(const std::filesystem::path& path);

  /// Raw state of tensor i, for the GPU tests.
  struct State {
    std::vector<std::uint8_t> c1, c2;
    std::vector<float> absmax1, absmax2;
    std::vector<float> m32, v32;  ///< FP32 states of small tensors
  };
  const State& state(std::size_t i) const { return state_.at(i); }

 private:
  std::vector<OptimParam> params_;
  AdamWConfig cfg_;
  std::int64_t t_ = 0;
  std::vector<State> state_;
};

// The 8-bit state file format, shared by AdamW8bit and cuda::CudaAdamW8bit (kernels/adamw.cuh)
// so a checkpoint from either resumes on the other. Only name and size of each OptimParam are used;
// tensors of at least kMin8bitSize elements have 8-bit states, the others FP32.

/// Writes step, block size, hyperparameters and every tensor's state atomically (see save_state).
void save_adamw8bit_state(const std::filesystem::path& path, const AdamWConfig& cfg,
                          const std::vector<OptimParam>& params, std::int64_t step,
                          const std::vector<AdamW8bit::State>& states);
/// A file written by save_adamw8bit_state for exactly these parameters: the step count and states.
struct AdamW8bitStateData {
  std::int64_t step = 0;
  std::vector<AdamW8bit::State> states;
};
/// Throws std::runtime_error naming the file and the tensor on any mismatch.
AdamW8bitStateData load_adamw8bit_state(const std::filesystem::path& path, const std::vector<OptimParam>& params);

}  // namespace qlora
