// The fine-tuning loop's GPU side (chapter 7). See gpu_trainer.cuh.
#include "gpu_trainer.cuh"

#include <variant>

namespace qlora::cuda {

bool cuda_device_present() {
  int count = 0;
  return cudaGetDeviceCount(&count) == cudaSuccess && count > 0;
}

struct GpuTrainer::Optim {
  std::variant<CudaAdamW, CudaAdamW8bit> opt;
  Optim(std::vector<DeviceParam> params, AdamWConfig cfg, OptimKind kind)
      : opt(make(std::move(params), cfg, kind)) {}

 private:
  static std::variant<CudaAdamW, CudaAdamW8bit> make(std::vector<DeviceParam> params, AdamWConfig cfg, OptimKind kind) {
    const StatePlacement where =
        kind == OptimKind::paged_adamw || kind == OptimKind::paged_adamw8bit ? StatePlacement::Paged : StatePlacement::Device;
    if (kind == OptimKind::adamw || kind == OptimKind::paged_adamw)
      return std::variant<CudaAdamW, CudaAdamW8bit>(std::in_place_type<CudaAdamW>, std::move(params), cfg, where);
    return std::variant<CudaAdamW, CudaAdamW8bit>(std::in_place_type<CudaAdamW8bit>, std::move(params), cfg, where);
  }
};

GpuTrainer::GpuTrainer(LlamaModel& host, OptimKind optim, float weight_decay)
    : host_(host), paged_(optim == OptimKind::paged_adamw || optim == OptimKind::paged_adamw8bit) {
  if (!host.has_lora()) throw std::invalid_argument("finetune: the model has no LoRA adapters");
  host.zero_grad();
  gpu_ = std::make_unique<LlamaModelGpu>(host);
  // The same tensors, names and order as the CPU trainer's optimizer: state files
  // written on one device load on the other.
  std::vector<DeviceParam> params;
  std::vector<DeviceSpan> grads;
  for (auto& [name, a] : gpu_->named_adapters()) {
    params.push_back({name + ".lora_A", a->A.data(), a->dA.data(), a->A.size()});
    params.push_back({name + ".lora_B", a->B.data(), a->dB.data(), a->B.size()});
    grads.push_back({a->dA.data(), a->dA.size()});
    grads.push_back({a->dB.data(), a->dB.size()});
  }
  AdamWConfig acfg;
  acfg.weight_decay = weight_decay;
  opt_ = std::make_unique<Optim>(std::move(params), acfg, optim);
  clipper_ = std::make_unique<GradClipper>(std::move(grads));
  // A paged optimizer's states wait in host memory while forward and backward need the
  // room; the update prefetches them in and sends them out again (chapter 6).
  if (paged_) std::visit([&](auto& o) { o.page_out(gpu_->stream()); }, opt_->opt);
  int dev = 0;
  CUDA_CHECK(cudaGetDevice(&dev));
  cudaDeviceProp prop{};
  CUDA_CHECK(cudaGetDeviceProperties(&prop, dev));
  device_name_ = prop.name;
}

GpuTrainer::~GpuTrainer() = default;

void GpuTrainer::sample_memory() {
  const DeviceMemory m = device_memory();
  peak_used_mb_ = std::max(peak_used_mb_, static_cast<double>(m.total - m.free) / (1024.0 * 1024.0));
}

//! [gpu-train-step]
float GpuTrainer::train_micro_batch(const int* x, const int* y, int B, int T, std::mt19937_64& dropout_rng) {
  const float loss = gpu_->forward(x, y, B, T, true, dropout_rng);
  sample_memory();  // activations are at their peak between forward and backward
  gpu_->backward();
  return loss;
}

void GpuTrainer::optimizer_step(float lr) {
  // step() pages paged states in first; out they go again, until the next update.
  std::visit([&](auto& o) {
    o.step(lr, gpu_->stream());
    if (paged_) o.page_out(gpu_->stream());
  }, opt_->opt);
  CUDA_CHECK(cudaStreamSynchronize(gpu_->stream()));
}
//! [gpu-train-step]

float GpuTrainer::eval_batch(const int* x, const int* y, int B, int T) {
  std::mt19937_64 unused(0);  // no dropout in evaluation
  return gpu_->forward(x, y, B, T, false, unused);
}

double GpuTrainer::clip_grad_norm(double max_norm) { return clipper_->clip(max_norm, gpu_->stream()); }

std::int64_t GpuTrainer::optimizer_steps() const {
  return std::visit([](const auto& o) { return o.steps(); }, opt_->opt);
}

void GpuTrainer::save_optimizer(const std::filesystem::path& file) const {
  CUDA_CHECK(cudaStreamSynchronize(gpu_->stream()));
  std::visit([&](const auto& o) { o.save_state(file); }, opt_->opt);
}

void GpuTrainer::load_optimizer(const std::filesystem::path& file) {
  CUDA_CHECK(cudaStreamSynchronize(gpu_->stream()));
  std::visit([&](auto& o) { o.load_state(file); }, opt_->opt);
}

}  // namespace qlora::cuda
