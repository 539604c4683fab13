// AdamW with FP32 states and global-norm gradient clipping: the CPU reference of
// the optimizer QLoRA trains its adapters with (chapter 6). The update follows
// torch.optim.AdamW exactly, so a run here and a run in PyTorch agree:
//
//   p ← p − lr·λ·p                          (decoupled weight decay, applied first)
//   m ← β1·m + (1 − β1)·g                   (first moment, "exp_avg")
//   v ← β2·v + (1 − β2)·g²                  (second moment, "exp_avg_sq")
//   p ← p − (lr / (1 − β1ᵗ)) · m / (√v / √(1 − β2ᵗ) + ε)
//
// The CUDA kernel in kernels/adamw.cu must match adamw_update(); the optimizer
// state is saved as a safetensors file for checkpoints.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <span>
#include <string>
#include <vector>

namespace qlora {

/// Hyperparameters. Defaults are torch.optim.AdamW's (QLoRA itself sets weight_decay = 0).
struct AdamWConfig {
  float beta1 = 0.9f;
  float beta2 = 0.999f;
  float eps = 1e-8f;
  float weight_decay = 0.01f;
};

/// One trainable tensor: its values and its gradient, both `size` floats, owned by the caller.
/// `name` keys the tensor's state in the saved state file.
struct OptimParam {
  std::string name;
  float* value = nullptr;
  float* grad = nullptr;
  std::size_t size = 0;
};

/// The two bias corrections of step t (t counts from 1): 1 − β1ᵗ and √(1 − β2ᵗ).
/// Computed once per step on the host (in double, rounded to float) and passed to every kernel,
/// so CPU and GPU see bit-identical constants.
struct BiasCorrection {
  float c1;       ///< 1 − β1ᵗ
  float c2_sqrt;  ///< √(1 − β2ᵗ)
};
BiasCorrection bias_correction(const AdamWConfig& cfg, std::int64_t t);

/// One AdamW update of one tensor, in place: p, m, v have n elements, g is read only.
/// This is the reference the CUDA kernel kernels/adamw.cu:adamw32_kernel matches.
void adamw_update(float* p, const float* g, float* m, float* v, std::size_t n, float lr, const AdamWConfig& cfg,
                  BiasCorrection bc);

/// Global L2 norm over all gradients, as torch.nn.utils.clip_grad_norm_ computes it
/// (the norm of the concatenation of every tensor), accumulated in double.
double global_grad_norm(std::span<const std::span<const float>> grads);

/// clip_grad_norm_ semantics: scale = min(1, max_norm / (norm + 1e-6)); every gradient is
/// multiplied by scale. Returns the norm before clipping (what trainers log as grad_norm).
double clip_grad_norm(std::span<const std::span<float>> grads, double max_norm);

/// The clip scale factor for a given total norm (shared by the CPU and the CUDA paths).
float clip_scale(double norm, double max_norm);

/// AdamW over a list of tensors with FP32 states (8 bytes of state per parameter).
class AdamW {
 public:
  /// Throws std::invalid_argument on a null pointer, an empty or duplicate name.
  explicit AdamW(std::vector<OptimParam> params, AdamWConfig cfg = {});

  /// Applies one update to every tensor from its current gradient, with learning rate lr.
  void step(float lr);
  /// Clips the gradients of all tensors to global norm max_norm; returns the norm before clipping.
  double clip_grad_norm(double max_norm);

  std::int64_t steps() const { return t_; }
  const AdamWConfig& config() const { return cfg_; }
  const std::vector<OptimParam>& params() const { return params_; }
  std::span<const float> exp_avg(std::size_t i) const { return m_.at(i); }
  std::span<const float> exp_avg_sq(std::size_t i) const { return v_.at(i); }

  /// Writes the state (step count, hyperparameters, m and v of every tensor as
  /// "NAME.exp_avg" / "NAME.exp_avg_sq", F32) to a safetensors file, atomically.
  void save_state(const std::filesystem::path& path) const;
  /// Reads a state written by save_state. Throws std::runtime_error naming the file and the
  /// tensor when the file is unreadable or corrupt, was written by another optimizer, or does
  /// not hold exactly this optimizer's tensors with these sizes.
  void load_state(const std::filesystem::path& path);

 private:
  std::vector<OptimParam> params_;
  AdamWConfig cfg_;
  std::int64_t t_ = 0;
  std::vector<std::vector<float>> m_, v_;
};

// The state file format, shared by AdamW and cuda::CudaAdamW (kernels/adamw.cuh), so a
// checkpoint written on the GPU resumes on the CPU and vice versa. Only the name and size
// of each OptimParam are used.

/// AdamW state as read from a file: the step count and m, v of every parameter, in order.
struct AdamWStateData {
  std::int64_t step = 0;
  std::vector<std::vector<float>> m, v;
};
/// Writes step, hyperparameters and "NAME.exp_avg" / "NAME.exp_avg_sq" (F32) atomically.
void save_adamw_state(const std::filesystem::path& path, const AdamWConfig& cfg,
                      const std::vector<OptimParam>& params, std::int64_t step,
                      const std::vector<std::vector<float>>& m, const std::vector<std::vector<float>>& v);
/// Reads a file written by save_adamw_state for exactly these parameters (names and sizes);
/// throws std::runtime_error naming the file and the tensor otherwise.
AdamWStateData load_adamw_state(const std::filesystem::path& path, const std::vector<OptimParam>& params);

// Helpers shared by the optimizers (adamw8bit.cpp uses them too).
struct SafeTensors;
/// Checks a parameter list (non-null pointers, unique non-empty names).
void validate_params(const std::vector<OptimParam>& params);
/// The "step" metadata of a state file written by `optimizer`; throws naming the file otherwise.
std::int64_t read_state_step(const SafeTensors& st, const std::filesystem::path& path, const std::string& optimizer);
/// Tensor `name` of a state file as `size` float32 values; throws naming the file and tensor otherwise.
std::vector<float> read_state_f32(const SafeTensors& st, const std::filesystem::path& path, const std::string& name,
                                  std::size_t size);
/// Text that reads back as the same float ("%.9g").
std::string float_text(float x);

}  // namespace qlora
