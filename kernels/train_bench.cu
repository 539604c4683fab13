// `qlora bench train` (chapter 7). See train_bench.cuh.
#include "train_bench.cuh"

#include "atomic_file.hpp"
#include "gpu_trainer.cuh"
#include "hf_folder.hpp"
#include "memory_plan.hpp"
#include "model_shapes.hpp"
#include "model_stream.cuh"
#include "paged.cuh"

#include <sys/resource.h>

#include <chrono>
#include <cstdio>
#include <memory>
#include <random>
#include <stdexcept>
#include <vector>

namespace qlora::cuda {
namespace {

constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;

double used_gib() {
  const DeviceMemory m = device_memory();
  return static_cast<double>(m.total - m.free) / kGiB;
}

double peak_rss_gib() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return static_cast<double>(u.ru_maxrss) * 1024.0 / kGiB;  // ru_maxrss is in KiB on Linux
}

double seconds_since(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

}  // namespace

TrainingSetup training_setup(const TrainBenchOptions& o) {
  TrainingSetup s;
  s.batch = o.batch;
  s.seq_len = o.seq_len;
  s.rank = o.rank;
  s.dropout = o.dropout;
  s.storage = o.storage;
  s.optim = o.optim;
  s.checkpointing = o.checkpointing;
  s.offload_checkpoints = o.offload_checkpoints;
  return s;
}

nlohmann::json run_train_bench(const TrainBenchOptions& o) {
  if (o.batch <= 0 || o.seq_len <= 0 || o.rank <= 0 || o.steps <= 0 || o.warmup < 0)
    throw std::invalid_argument("bench train: need --batch, --seq-len, --rank, --steps > 0 and --warmup >= 0");
  CUDA_CHECK(cudaFree(nullptr));  // create the context: its memory is part of the baseline
  const double context_gib = used_gib();
  cudaDeviceProp prop{};
  CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));

  // The random model as a folder, for transformers: written, then nothing else.
  if (!o.write_hf.empty()) {
    const auto t0 = std::chrono::steady_clock::now();
    write_hf_folder(o.config, random_fill(o.seed), o.write_hf, std::int64_t{5} << 30,
                    [](const std::filesystem::path& f) { std::fprintf(stderr, "wrote %s\n", f.c_str()); });
    return {{"benchmark", "qlora bench train --write-hf"}, {"shape", o.shape}, {"dir", o.write_hf.string()},
            {"seconds", seconds_since(t0)}};
  }

  // A ballast holds the rest of the card, so the run has memory_limit_gib in all.
  DeviceBuffer<std::uint8_t> ballast;
  if (o.memory_limit_gib > 0) {
    const DeviceMemory m = device_memory();
    const double limit = o.memory_limit_gib * kGiB;
    const double in_use = static_cast<double>(m.total - m.free);
    if (limit <= in_use) throw std::invalid_argument("bench train: --memory-limit-gib is below the memory already in use");
    ballast = DeviceBuffer<std::uint8_t>(static_cast<std::size_t>(static_cast<double>(m.free) - (limit - in_use)));
  }
  const double base_gib = used_gib();  // context (+ ballast)

  LoraSetup lora;
  lora.config.r = o.rank;
  lora.config.alpha = o.alpha;
  lora.config.dropout = o.dropout;
  std::mt19937_64 rng(o.seed);

  const auto t_load = std::chrono::steady_clock::now();
  std::unique_ptr<HfLlamaFolder> folder;
  LlamaConfig cfg = o.config;
  TensorFill fill;
  if (!o.model_dir.empty()) {
    folder = std::make_unique<HfLlamaFolder>(o.model_dir);
    cfg = folder->config();
    fill = folder_fill(*folder);
  } else {
    fill = random_fill(o.seed);
  }
  if (o.seq_len > cfg.seq_len)
    throw std::invalid_argument("bench train: --seq-len " + std::to_string(o.seq_len) + " exceeds the model's context " +
                                std::to_string(cfg.seq_len));
  auto model = std::make_unique<LlamaModelGpu>(cfg, o.storage, fill, lora, rng, print_load_progress);
  model->set_checkpointing(o.checkpointing);
  model->set_offload_checkpoints(o.offload_checkpoints);
  model->set_attention_version(o.attention);
  model->set_float_math(o.tf32 ? FloatMath::tf32 : FloatMath::fp32);
  const double load_s = seconds_since(t_load);
  const double rss_load = peak_rss_gib();
  folder.reset();  // unmaps the shards
  const double after_load = used_gib() - base_gib;
  const std::int64_t frozen = model->frozen_bytes();
  LlamaModelGpu& m = *model;
  GpuTrainer trainer(std::move(model), o.optim, 0.0f);
  const std::int64_t lora_params = trainer.lora_parameter_count();
  std::fprintf(stderr, "optimizer states: %s memory\n", to_string(trainer.state_placement()));

  // Random token windows; targets are the next tokens.
  const int B = o.batch, T = o.seq_len, N = B * T;
  std::vector<std::vector<int>> tokens;
  std::mt19937_64 data_rng(o.seed + 1);
  nlohmann::json token_json = nlohmann::json::array();
  for (int s = 0; s < o.warmup + o.steps; ++s) {
    std::vector<int> w(static_cast<std::size_t>(B) * (T + 1));
    for (int& t : w) t = static_cast<int>(data_rng() % static_cast<std::uint64_t>(cfg.vocab_size));
    token_json.push_back(w);
    tokens.push_back(std::move(w));
  }
  if (!o.tokens_out.empty()) write_text_atomic(o.tokens_out, token_json.dump() + "\n");
  std::vector<int> x(static_cast<std::size_t>(N)), y(static_cast<std::size_t>(N));

  nlohmann::json steps = nlohmann::json::array();
  double timed_s = 0, peak_gib = 0, fwd_gib = 0;
  std::mt19937_64 dropout_rng(o.seed + 2);
  const std::string name = o.model_dir.empty() ? o.shape : o.model_dir.string();
  std::fprintf(stderr, "training: %s, %s, batch %d × seq %d, r %d, %s%s\n", name.c_str(), to_string(o.storage).c_str(),
               B, T, o.rank, to_string(o.optim).c_str(), o.checkpointing ? ", gradient checkpointing" : "");
  for (int s = 0; s < o.warmup + o.steps; ++s) {
    for (int b = 0; b < B; ++b)
      for (int t = 0; t < T; ++t) {
        x[static_cast<std::size_t>(b) * T + t] = tokens[s][static_cast<std::size_t>(b) * (T + 1) + t];
        y[static_cast<std::size_t>(b) * T + t] = tokens[s][static_cast<std::size_t>(b) * (T + 1) + t + 1];
      }
    CUDA_CHECK(cudaDeviceSynchronize());
    const auto t0 = std::chrono::steady_clock::now();
    trainer.zero_grad();
    const float loss = trainer.train_micro_batch(x.data(), y.data(), B, T, dropout_rng, 0);
    if (s == 0) fwd_gib = trainer.peak_memory_mb() / 1024.0 - base_gib;
    const double norm = trainer.clip_grad_norm(1.0);
    trainer.optimizer_step(o.lr);
    CUDA_CHECK(cudaDeviceSynchronize());
    const double dt = seconds_since(t0);
    peak_gib = std::max(peak_gib, std::max(used_gib(), trainer.peak_memory_mb() / 1024.0) - base_gib);
    if (s >= o.warmup) timed_s += dt;
    steps.push_back({{"step", s + 1}, {"loss", loss}, {"grad_norm", norm}, {"seconds", dt}, {"timed", s >= o.warmup},
                     {"states_paged_out", trainer.states_paged_out()}});
    std::fprintf(stderr, "step %d/%d: loss %.4f, grad norm %.4f, %.3f s, %.0f tokens/s, %.2f GiB in use%s\n", s + 1,
                 o.warmup + o.steps, loss, norm, dt, N / dt, used_gib() - base_gib + context_gib,
                 trainer.states_paged_out() ? ", optimizer states paged out" : "");
  }
  const double tokens_per_s = static_cast<double>(N) * o.steps / timed_s;
  const std::int64_t params = llama_parameter_count(cfg);
  // Model FLOPs of a QLoRA step with recomputation: 2·P·T forward, 2·P·T for the input
  // gradients, 2·P·T to recompute the forward (no weight gradients for frozen weights).
  const double tflops = 6.0 * static_cast<double>(params) * tokens_per_s / 1e12;
  // The model's buffers after the last step, and qlora plan's prediction for the same run.
  nlohmann::json inventory = nlohmann::json::object();
  double act_gib = 0, work_gib = 0;
  for (const auto& [what, bytes] : m.buffer_inventory()) {
    inventory[what] = static_cast<double>(bytes) / kGiB;
    const bool kept = what == "layer inputs" || what == "layer activations" || what == "final norm";
    (kept ? act_gib : work_gib) += static_cast<double>(bytes) / kGiB;
  }
  TrainingSetup setup = training_setup(o);
  setup.states_on_device = trainer.state_placement() != StatePlacement::Host && !trainer.states_paged_out();
  const TrainingMemoryPlan plan = plan_training_memory(cfg, setup);
  nlohmann::json plan_json = nlohmann::json::object();
  for (const MemoryItem& i : plan.items) plan_json[i.group][i.name] = i.bytes / kGiB;
  const double states_gib = setup.states_on_device ? plan.group("optimizer states") / kGiB : 0.0;
  nlohmann::json r = {
      {"benchmark", "qlora bench train"},
      {"device", prop.name},
      {"shape", name},
      {"config", {{"dim", cfg.dim}, {"hidden_dim", cfg.hidden_dim}, {"n_layers", cfg.n_layers}, {"n_heads", cfg.n_heads},
                  {"n_kv_heads", cfg.n_kv_heads}, {"vocab_size", cfg.vocab_size}}},
      {"parameters", params},
      {"storage", to_string(o.storage)},
      {"batch", B}, {"seq_len", T}, {"rank", o.rank}, {"alpha", o.alpha}, {"dropout", o.dropout},
      {"optim", to_string(o.optim)}, {"optimizer_states", to_string(trainer.state_placement())}, {"gradient_checkpointing", o.checkpointing}, {"offload_checkpoints", o.offload_checkpoints}, {"attention_version", o.attention}, {"float_math", o.tf32 ? "tf32" : "fp32"},
      {"warmup_steps", o.warmup}, {"timed_steps", o.steps},
      {"load_seconds", load_s}, {"load_peak_rss_gib", rss_load},
      {"tokens_per_s", tokens_per_s}, {"model_tflops", tflops},
      {"memory_limit_gib", o.memory_limit_gib},
      {"memory_gib",
       {{"context", context_gib},
        {"peak_in_use", peak_gib + context_gib},
        {"after_load", after_load},
        {"peak_after_first_forward", fwd_gib},
        {"frozen_weights", static_cast<double>(frozen) / kGiB},
        {"lora_params_and_grads", static_cast<double>(lora_params) * 8.0 / kGiB},
        {"optimizer_states_resident", states_gib},
        {"activations_kept", act_gib},
        {"workspaces", work_gib},
        {"buffers", inventory}}},
      {"plan_gib", {{"peak_in_use", plan.total() / kGiB}, {"items", plan_json}}},
      {"lora_parameters", lora_params},
      {"steps", steps}};
  std::printf("bench train on %s: %s (%.2f B parameters), %s, batch %d × seq %d, r %d, %s, %s products\n",
              prop.name, r["shape"].get<std::string>().c_str(), static_cast<double>(params) / 1e9,
              to_string(o.storage).c_str(), B, T, o.rank, to_string(o.optim).c_str(), o.tf32 ? "tf32" : "fp32");
  std::printf("  load %.1f s (host peak RSS %.2f GiB); %.0f tokens/s over %d steps; %.1f model TFLOP/s\n", load_s,
              rss_load, tokens_per_s, o.steps, tflops);
  std::printf("  device memory in use: peak %.2f GiB (context %.2f, frozen weights %.2f, LoRA + grads %.2f, "
              "optimizer states %.2f, activations kept %.2f, workspaces %.2f)\n",
              peak_gib + context_gib, context_gib, static_cast<double>(frozen) / kGiB,
              static_cast<double>(lora_params) * 8.0 / kGiB, states_gib, act_gib, work_gib);
  std::printf("  qlora plan: %.2f GiB (context %.2f, frozen weights %.2f, LoRA + grads %.2f, optimizer states %.2f, "
              "activations kept %.2f, workspaces %.2f): measured/plan %.3f\n",
              plan.total() / kGiB, plan.group("context") / kGiB, plan.group("frozen weights") / kGiB,
              plan.group("LoRA + gradients") / kGiB, plan.group("optimizer states") / kGiB,
              plan.group("activations kept") / kGiB, plan.group("workspaces") / kGiB,
              (peak_gib + context_gib) / (plan.total() / kGiB));
  return r;
}

}  // namespace qlora::cuda
