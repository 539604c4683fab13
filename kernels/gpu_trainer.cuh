// The fine-tuning loop's GPU side (chapter 7, "Training on the GPU"): a Trainer
// (src/finetune.hpp) whose model is LlamaModelGpu and whose optimizer is one of
// chapter 6's CUDA AdamWs — 32-bit or 8-bit states, in device memory or paged. The
// loop itself (data order, logging, checkpoints, resume) is finetune() in
// src/finetune.cpp, shared with the CPU: that is what makes the CPU and GPU runs
// comparable step for step.
#pragma once
#include "adamw.cuh"
#include "data_parallel.hpp"
#include "finetune.hpp"
#include "llama_model_gpu.cuh"

#include <memory>
#include <string>

namespace qlora::cuda {

/// True when a CUDA device is usable here (the CLI's `--device auto` asks this).
bool cuda_device_present();

/// CUDA devices visible to this process.
int cuda_device_count();

/// A data-parallel rank takes the GPU of its index on its host. Throws
/// std::invalid_argument when the host runs more ranks than it has GPUs.
void select_rank_device(const Communicator& world);

class NcclGrads;

class GpuTrainer final : public Trainer {
 public:
  /// Uploads `host` (frozen weights in their stored form, adapters) and builds the optimizer.
  GpuTrainer(LlamaModel& host, OptimKind optim, float weight_decay);
  /// Trains a model that lives on the GPU only (streamed there; it needs adapters). It has
  /// no host copy: model() throws std::logic_error, sync_to_host/sync_from_host do nothing,
  /// and adapter()/load_adapter() read and write the device adapters directly.
  GpuTrainer(std::unique_ptr<LlamaModelGpu> model, OptimKind optim, float weight_decay);
  ~GpuTrainer() override;
  LlamaModel& model() override { return host(); }
  LlamaModelGpu& gpu_model() { return *gpu_; }
  void zero_grad() override { gpu_->zero_grad(); }
  float train_micro_batch(const int* x, const int* y, int B, int T, std::mt19937_64& dropout_rng,
                          int first_sequence) override;
  float eval_batch(const int* x, const int* y, int B, int T) override;
  void scale_grads(float s) override { gpu_->scale_grads(s); }
  /// With use_nccl: NCCL's all-reduce, GPU to GPU. Without: through host memory and
  /// `world`'s all-reduce (MPI), for builds without NCCL. A world of one without NCCL: nothing.
  void reduce_grads(Communicator& world) override;
  /// Sums gradients with NCCL from now on: joins `world`'s NCCL communicator (every rank
  /// calls it). Throws std::runtime_error in a build without NCCL.
  void use_nccl(Communicator& world, double timeout_s);
  double clip_grad_norm(double max_norm) override;
  void optimizer_step(float lr) override;
  std::int64_t optimizer_steps() const override;
  void save_optimizer(const std::filesystem::path& file) const override;
  void load_optimizer(const std::filesystem::path& file) override;
  const LlamaConfig& config() const override { return gpu_->config(); }
  PeftAdapter adapter() override;
  void load_adapter(const PeftAdapter& a, const std::string& where) override;
  std::int64_t lora_parameter_count() const override;
  void sync_to_host() override {
    if (host_) gpu_->download_adapters(*host_);
  }
  void sync_from_host() override {
    if (host_) gpu_->upload_adapters(*host_);
  }
  /// The largest device memory in use (cudaMemGetInfo: total − free, all processes) seen after a forward pass.
  double peak_memory_mb() const override { return peak_used_mb_; }
  std::string device() const override { return device_name_; }
  /// Whether the last update sent paged optimizer states out of device memory.
  bool states_paged_out() const { return paged_out_; }
  /// Where the optimizer states live (a paged optimizer's go to pinned host memory when
  /// they would not fit in free device memory).
  StatePlacement state_placement() const { return placement_; }

 private:
  struct Optim;
  LlamaModel* host_ = nullptr;  ///< the host model, when there is one
  std::unique_ptr<LlamaModelGpu> gpu_;
  std::unique_ptr<Optim> opt_;
  std::unique_ptr<GradClipper> clipper_;
  std::vector<DeviceSpan> grads_;  ///< every gradient tensor, in the optimizer's order
  std::unique_ptr<NcclGrads> nccl_;
  std::vector<float> host_grads_;  ///< the all-reduce through host memory, without NCCL
  bool paged_out_ = false;
  StatePlacement placement_ = StatePlacement::Device;
  std::int64_t pass_need_ = 0;  ///< bytes the last forward + backward allocated
  double peak_used_mb_ = 0;
  std::string device_name_;  ///< asked once: the loop logs it every step
  void init(std::unique_ptr<LlamaModelGpu> model, OptimKind optim, float weight_decay);
  LlamaModel& host() const;
  std::int64_t sample_memory();  ///< bytes in use now; updates the peak
  static std::int64_t device_memory_used();
};

}  // namespace qlora::cuda
