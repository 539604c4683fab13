// The fine-tuning loop's GPU side (chapter 7, "Training on the GPU"): a Trainer
// (src/finetune.hpp) whose model is LlamaModelGpu and whose optimizer is one of
// chapter 6's CUDA AdamWs — 32-bit or 8-bit states, in device memory or paged. The
// loop itself (data order, logging, checkpoints, resume) is finetune() in
// src/finetune.cpp, shared with the CPU: that is what makes the CPU and GPU runs
// comparable step for step.
#pragma once
#include "adamw.cuh"
#include "finetune.hpp"
#include "llama_model_gpu.cuh"

#include <memory>
#include <string>

namespace qlora::cuda {

/// True when a CUDA device is usable here (the CLI's `--device auto` asks this).
bool cuda_device_present();

class GpuTrainer final : public Trainer {
 public:
  /// Uploads `host` (frozen weights in their stored form, adapters) and builds the optimizer.
  GpuTrainer(LlamaModel& host, OptimKind optim, float weight_decay);
  ~GpuTrainer() override;
  LlamaModel& model() override { return host_; }
  LlamaModelGpu& gpu_model() { return *gpu_; }
  void zero_grad() override { gpu_->zero_grad(); }
  float train_micro_batch(const int* x, const int* y, int B, int T, std::mt19937_64& dropout_rng) override;
  float eval_batch(const int* x, const int* y, int B, int T) override;
  void scale_grads(float s) override { gpu_->scale_grads(s); }
  double clip_grad_norm(double max_norm) override;
  void optimizer_step(float lr) override;
  std::int64_t optimizer_steps() const override;
  void save_optimizer(const std::filesystem::path& file) const override;
  void load_optimizer(const std::filesystem::path& file) override;
  void sync_to_host() override { gpu_->download_adapters(host_); }
  void sync_from_host() override { gpu_->upload_adapters(host_); }
  /// The largest device memory in use (cudaMemGetInfo: total − free, all processes) seen after a forward pass.
  double peak_memory_mb() const override { return peak_used_mb_; }
  std::string device() const override { return device_name_; }

 private:
  struct Optim;
  LlamaModel& host_;
  std::unique_ptr<LlamaModelGpu> gpu_;
  std::unique_ptr<Optim> opt_;
  std::unique_ptr<GradClipper> clipper_;
  bool paged_ = false;
  double peak_used_mb_ = 0;
  std::string device_name_;  ///< asked once: the loop logs it every step
  void sample_memory();
};

}  // namespace qlora::cuda
