// `qlora bench train` (chapter 7, "Scaling up"): QLoRA training steps on a model of a real
// shape, built directly in device memory (random weights, or a Hugging Face folder
// streamed in), with the numbers a user plans by: load time and host peak RSS, tokens/s,
// model TFLOP/s, and device memory in use (cudaMemGetInfo: what an out-of-memory error
// depends on) at each phase of the first step.
#pragma once
#include "finetune.hpp"
#include "llama_model.hpp"
#include "memory_plan.hpp"

#include <nlohmann/json.hpp>

#include <cstdint>
#include <filesystem>
#include <string>

namespace qlora::cuda {

struct TrainBenchOptions {
  LlamaConfig config;            ///< the shape (ignored when model_dir is set)
  std::string shape = "7b";      ///< its name, for the report
  std::filesystem::path model_dir;  ///< a Hugging Face folder to stream in instead of random weights
  BaseStorage storage = BaseStorage::nf4_dq;
  int batch = 4, seq_len = 512, rank = 64;
  float alpha = 16.0f, dropout = 0.05f, lr = 1e-4f;
  OptimKind optim = OptimKind::paged_adamw;
  bool checkpointing = true;
  bool offload_checkpoints = false;  ///< LlamaModelGpu::set_offload_checkpoints
  int attention = 2;              ///< LlamaModelGpu::set_attention_version
  bool tf32 = true;               ///< LlamaModelGpu::set_float_math: tf32, or fp32 when false
  int steps = 10;   ///< timed steps
  int warmup = 2;   ///< untimed steps first
  std::uint64_t seed = 1;
  double memory_limit_gib = 0;    ///< > 0: a cudaMalloc ballast leaves only this much for the run
  std::filesystem::path write_hf;  ///< write the random model here as a BF16 folder, then stop
  std::filesystem::path tokens_out;  ///< write the batches' token ids here (JSON) for the anchor
};

/// The settings `qlora plan` needs for the same run (the optimizer states on the device:
/// where the trainer puts them is known only once it runs).
TrainingSetup training_setup(const TrainBenchOptions& o);

/// Runs the benchmark, printing progress; returns the report (also what --json writes).
nlohmann::json run_train_bench(const TrainBenchOptions& o);

}  // namespace qlora::cuda
