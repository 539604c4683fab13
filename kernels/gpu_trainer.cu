// The fine-tuning loop's GPU side (chapter 7). See gpu_trainer.cuh.
#include "gpu_trainer.cuh"

#include "nvtx_range.cuh"
#ifdef QLORA_HAVE_NCCL
#include "nccl_grads.cuh"
#else
namespace qlora::cuda {
class NcclGrads {};  // never made without NCCL (use_nccl throws); complete for unique_ptr's destructor
}  // namespace qlora::cuda
#endif

#include <variant>

namespace qlora::cuda {

int cuda_device_count() {
  int count = 0;
  return cudaGetDeviceCount(&count) == cudaSuccess ? count : 0;
}

bool cuda_device_present() { return cuda_device_count() > 0; }

void select_rank_device(const Communicator& world) {
  const int count = cuda_device_count();
  if (world.local_size() > count)
    throw std::invalid_argument(std::to_string(world.local_size()) + " ranks run on this host but it has " +
                                std::to_string(count) + " CUDA device" + (count == 1 ? "" : "s") +
                                ": data-parallel training takes one GPU per rank");
  CUDA_CHECK(cudaSetDevice(world.local_rank()));
}

struct GpuTrainer::Optim {
  std::variant<CudaAdamW, CudaAdamW8bit> opt;
  Optim(std::vector<DeviceParam> params, AdamWConfig cfg, OptimKind kind, StatePlacement where)
      : opt(make(std::move(params), cfg, kind, where)) {}

 private:
  static std::variant<CudaAdamW, CudaAdamW8bit> make(std::vector<DeviceParam> params, AdamWConfig cfg, OptimKind kind,
                                                     StatePlacement where) {
    if (kind == OptimKind::adamw || kind == OptimKind::paged_adamw)
      return std::variant<CudaAdamW, CudaAdamW8bit>(std::in_place_type<CudaAdamW>, std::move(params), cfg, where);
    return std::variant<CudaAdamW, CudaAdamW8bit>(std::in_place_type<CudaAdamW8bit>, std::move(params), cfg, where);
  }
};

namespace {

//! [state-placement]
// Where a paged optimizer's states live. Managed memory while they fit in what is free
// (then they stay on the GPU until a pass needs their room); when even that would ask for
// more managed memory than the card has free, which this project never does, pinned host
// memory that the update reads over the bus. A plain optimizer's states are on the device.
StatePlacement choose_state_placement(OptimKind kind, std::size_t params) {
  const bool paged = kind == OptimKind::paged_adamw || kind == OptimKind::paged_adamw8bit;
  if (!paged) return StatePlacement::Device;
  const bool eight_bit = kind == OptimKind::paged_adamw8bit;
  const double bytes = static_cast<double>(params) * (eight_bit ? 2.0 : 8.0);  // two moments per parameter
  const DeviceMemory m = device_memory();
  return bytes + static_cast<double>(kManagedSafetyMargin) <= static_cast<double>(m.free) ? StatePlacement::Paged
                                                                                          : StatePlacement::Host;
}
//! [state-placement]

}  // namespace

GpuTrainer::GpuTrainer(LlamaModel& host, OptimKind optim, float weight_decay) : host_(&host) {
  if (!host.has_lora()) throw std::invalid_argument("finetune: the model has no LoRA adapters");
  host.zero_grad();
  init(std::make_unique<LlamaModelGpu>(host), optim, weight_decay);
}

GpuTrainer::GpuTrainer(std::unique_ptr<LlamaModelGpu> model, OptimKind optim, float weight_decay) {
  if (model->named_adapters().empty()) throw std::invalid_argument("finetune: the model has no LoRA adapters");
  init(std::move(model), optim, weight_decay);
  gpu_->zero_grad();
}

void GpuTrainer::init(std::unique_ptr<LlamaModelGpu> model, OptimKind optim, float weight_decay) {
  gpu_ = std::move(model);
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
  std::size_t n = 0;
  for (const DeviceParam& p : params) n += p.size;
  placement_ = choose_state_placement(optim, n);
  opt_ = std::make_unique<Optim>(std::move(params), acfg, optim, placement_);
  grads_ = grads;
  clipper_ = std::make_unique<GradClipper>(std::move(grads));
  int dev = 0;
  CUDA_CHECK(cudaGetDevice(&dev));
  cudaDeviceProp prop{};
  CUDA_CHECK(cudaGetDeviceProperties(&prop, dev));
  device_name_ = prop.name;
}

//! [gpu-trainer-adapter]
// Checkpoints read and write the adapters straight from the device, one module at a
// time through host memory: the host model, when there is one, is not involved.
PeftAdapter GpuTrainer::adapter() {
  CUDA_CHECK(cudaStreamSynchronize(gpu_->stream()));
  PeftAdapter out = empty_peft_adapter(gpu_->lora_setup());
  for (auto& [name, d] : gpu_->named_adapters()) {
    LoraAdapter h(d->in, d->out, d->r);
    d->download(h);
    h.dA.clear();
    h.dB.clear();
    out.modules.emplace(name, std::move(h));
  }
  return out;
}

void GpuTrainer::load_adapter(const PeftAdapter& a, const std::string& where) {
  CUDA_CHECK(cudaStreamSynchronize(gpu_->stream()));
  for (auto& [name, d] : gpu_->named_adapters()) {
    LoraAdapter h(d->in, d->out, d->r);  // zero gradients
    const LoraAdapter& m = peft_module(a, name, h.A.size(), h.B.size(), where);
    h.A = m.A;
    h.B = m.B;
    d->upload(h);
  }
  if (host_) gpu_->download_adapters(*host_);  // keep the host model's copy in step
}
//! [gpu-trainer-adapter]

std::int64_t GpuTrainer::lora_parameter_count() const {
  std::int64_t n = 0;
  for (auto& [name, a] : gpu_->named_adapters()) n += static_cast<std::int64_t>(a->A.size() + a->B.size());
  return n;
}

LlamaModel& GpuTrainer::host() const {
  if (!host_) throw std::logic_error("GpuTrainer: this model was streamed onto the GPU and has no host copy");
  return *host_;
}

GpuTrainer::~GpuTrainer() = default;

std::int64_t GpuTrainer::device_memory_used() {
  const DeviceMemory m = device_memory();
  return static_cast<std::int64_t>(m.total - m.free);
}

std::int64_t GpuTrainer::sample_memory() {
  const std::int64_t used = device_memory_used();
  peak_used_mb_ = std::max(peak_used_mb_, static_cast<double>(used) / (1024.0 * 1024.0));
  return used;
}

//! [gpu-train-step]
float GpuTrainer::train_micro_batch(const int* x, const int* y, int B, int T, std::mt19937_64& dropout_rng,
                                   int first_sequence) {
  const std::int64_t before = device_memory_used();
  const float loss = gpu_->forward(x, y, B, T, true, dropout_rng, first_sequence);
  std::int64_t peak = sample_memory();  // activations are at their peak between forward and backward
  gpu_->backward();
  peak = std::max(peak, sample_memory());
  // What this pass allocated on top of what was in use when it began (the model keeps
  // its buffers, so after the first pass of a shape this is about zero).
  pass_need_ = std::max<std::int64_t>(0, peak - before);
  return loss;
}

void GpuTrainer::optimizer_step(float lr) {
  // step() pages paged states in first. Out they go again only when the next forward
  // and backward need their room: the memory the last pass allocated, against what is
  // free now, with a 5% margin. While it fits they stay, and the paged AdamW
  // runs at the speed of the resident one.
  NvtxRange range("optimizer");
  std::visit([&](auto& o) {
    o.step(lr, gpu_->stream());
    CUDA_CHECK(cudaStreamSynchronize(gpu_->stream()));
    if (placement_ == StatePlacement::Paged) {
      const DeviceMemory m = device_memory();
      paged_out_ = static_cast<double>(m.free) < 1.05 * static_cast<double>(pass_need_);
      if (paged_out_) o.page_out(gpu_->stream());
    }
  }, opt_->opt);
  CUDA_CHECK(cudaStreamSynchronize(gpu_->stream()));
}
//! [gpu-train-step]

float GpuTrainer::eval_batch(const int* x, const int* y, int B, int T) {
  std::mt19937_64 unused(0);  // no dropout in evaluation
  return gpu_->forward(x, y, B, T, false, unused);
}

//! [gpu-reduce-grads]
void GpuTrainer::reduce_grads(Communicator& world) {
#ifdef QLORA_HAVE_NCCL
  if (nccl_) return nccl_->all_reduce(gpu_->stream());
#endif
  if (world.size() == 1) return;
  NvtxRange range("all-reduce (host)");
  std::size_t n = 0;
  for (const DeviceSpan& g : grads_) n += g.size;
  host_grads_.resize(n);
  std::size_t at = 0;
  for (const DeviceSpan& g : grads_) {
    CUDA_CHECK(cudaMemcpyAsync(host_grads_.data() + at, g.data, g.size * sizeof(float), cudaMemcpyDeviceToHost,
                               gpu_->stream()));
    at += g.size;
  }
  CUDA_CHECK(cudaStreamSynchronize(gpu_->stream()));
  world.allreduce_sum(host_grads_.data(), n, "the gradient all-reduce");
  at = 0;
  for (const DeviceSpan& g : grads_) {
    CUDA_CHECK(cudaMemcpyAsync(g.data, host_grads_.data() + at, g.size * sizeof(float), cudaMemcpyHostToDevice,
                               gpu_->stream()));
    at += g.size;
  }
}
//! [gpu-reduce-grads]

void GpuTrainer::use_nccl(Communicator& world, double timeout_s) {
#ifdef QLORA_HAVE_NCCL
  nccl_ = std::make_unique<NcclGrads>(world, grads_, timeout_s);
#else
  (void)world, (void)timeout_s;
  throw std::runtime_error("this qlora was built without NCCL: data-parallel GPU ranks sum their gradients through MPI");
#endif
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
