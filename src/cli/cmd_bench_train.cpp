// `qlora bench train` (chapter 7, "Scaling up"): QLoRA training steps on a model of a real
// shape, built directly on the GPU (kernels/train_bench.cuh). The numbers go to
// docs/benchmarks.md beside transformers + PEFT + bitsandbytes on the same settings
// (tools/hf_train_bench.py, on the folder that --write-hf makes from the same weights).
#include "command.hpp"

#include "atomic_file.hpp"
#include "finetune.hpp"
#include "hf_llama.hpp"
#include "llama_model.hpp"
#include "memory_plan.hpp"
#include "model_shapes.hpp"

#include <cstdio>
#include <memory>
#include <stdexcept>
#include <string>

#ifdef QLORA_HAVE_CUDA
#include "cuda_check.cuh"
#include "paged.cuh"
#include "train_bench.cuh"
#endif

namespace {

struct BenchTrainArgs {
  std::string shape = "7b";
  std::string model;
  std::string storage = "nf4-dq";
  std::string optim = "paged_adamw_32bit";
  int batch = 4, seq_len = 512, rank = 64, steps = 10, warmup = 2;
  float alpha = 16.0f, dropout = 0.05f;
  bool no_checkpointing = false;
  bool offload = false;
  int attention = 2;
  std::string float_math = "tf32";
  double memory_limit_gib = 0;
  std::uint64_t seed = 1;
  std::string json, write_hf, tokens_out;
};

void run(const BenchTrainArgs& a) {
#ifdef QLORA_HAVE_CUDA
  qlora::cuda::TrainBenchOptions o;
  if (a.model.empty()) o.config = qlora::model_shape(a.shape);  // names the bad shape
  o.shape = a.shape;
  o.model_dir = a.model;
  o.storage = qlora::parse_base_storage(a.storage);
  o.optim = qlora::parse_optim(a.optim);
  o.batch = a.batch;
  o.seq_len = a.seq_len;
  o.rank = a.rank;
  o.alpha = a.alpha;
  o.dropout = a.dropout;
  o.checkpointing = !a.no_checkpointing;
  o.offload_checkpoints = a.offload;
  o.attention = a.attention;
  o.tf32 = a.float_math == "tf32";
  o.steps = a.steps;
  o.warmup = a.warmup;
  o.seed = a.seed;
  o.memory_limit_gib = a.memory_limit_gib;
  o.write_hf = a.write_hf;
  o.tokens_out = a.tokens_out;
  nlohmann::json r;
  try {
    r = qlora::cuda::run_train_bench(o);
  } catch (const qlora::cuda::OutOfDeviceMemory& e) {
    // Out of memory: say what the run needs and which settings would fit.
    const qlora::TrainingSetup s = qlora::cuda::training_setup(o);
    const qlora::LlamaConfig cfg = a.model.empty() ? o.config : qlora::read_hf_config(o.model_dir / "config.json");
    const double available = a.memory_limit_gib > 0 ? a.memory_limit_gib * 1073741824.0
                                                    : static_cast<double>(qlora::cuda::device_memory().total);
    throw std::runtime_error(std::string(e.what()) + "\n" + qlora::fit_advice(cfg, s, available));
  }
  if (!a.json.empty()) qlora::write_text_atomic(a.json, r.dump(2) + "\n");
#else
  (void)a;
  throw std::runtime_error("bench train needs a CUDA build of qlora (configure with -DQLORA_CUDA=ON on a machine with nvcc)");
#endif
}

}  // namespace

QLORA_COMMAND([](CLI::App& app) {
  auto a = std::make_shared<BenchTrainArgs>();
  auto* cmd = qlora::cli::command_group(app, "bench", "Benchmarks (each chapter adds its own)")->add_subcommand(
      "train",
      "Chapter 7: QLoRA training steps on a model of a real shape built directly on the GPU (random\n"
      "weights, or --model FOLDER streamed in): load time, host peak RSS, tokens/s, device memory (needs a CUDA GPU)");
  std::string shapes;
  for (const auto& s : qlora::model_shape_names()) shapes += (shapes.empty() ? "" : " ") + s;
  using qlora::cli::non_negative;
  using qlora::cli::positive;
  cmd->add_option("--shape", a->shape, "model shape: " + shapes)->capture_default_str();
  cmd->add_option("--model", a->model, "a Hugging Face folder to stream in instead of random weights");
  cmd->add_option("--storage", a->storage, "frozen base format: nf4 nf4-dq fp4 fp4-dq bf16")->capture_default_str();
  cmd->add_option("--optim", a->optim, "adamw_32bit adamw_8bit paged_adamw_32bit paged_adamw_8bit")->capture_default_str();
  cmd->add_option("--batch", a->batch, "sequences per step")->check(positive)->capture_default_str();
  cmd->add_option("--seq-len", a->seq_len, "tokens per sequence")->check(positive)->capture_default_str();
  cmd->add_option("--rank", a->rank, "LoRA rank on all seven projections")->check(positive)->capture_default_str();
  cmd->add_option("--alpha", a->alpha, "LoRA alpha")->check(positive)->capture_default_str();
  cmd->add_option("--dropout", a->dropout, "LoRA dropout")->check(non_negative)->capture_default_str();
  cmd->add_flag("--no-gradient-checkpointing", a->no_checkpointing, "keep every layer's activations");
  cmd->add_flag("--offload-checkpoints", a->offload, "keep each layer's checkpointed input in pinned host memory");
  cmd->add_option("--float-math", a->float_math,
                  "float32 products of the LoRA path and attention: tf32 (tensor cores) or fp32 (PEFT's arithmetic)")
      ->check(CLI::IsMember({"tf32", "fp32"}))
      ->capture_default_str();
  cmd->add_option("--attention", a->attention, "attention version: 1 (a warp per query row) or 2 (cuBLAS products)")
      ->check(CLI::IsMember({1, 2}))
      ->capture_default_str();
  cmd->add_option("--steps", a->steps, "timed steps")->check(positive)->capture_default_str();
  cmd->add_option("--warmup", a->warmup, "untimed steps first")->check(non_negative)->capture_default_str();
  cmd->add_option("--seed", a->seed, "weights, adapters and tokens")->capture_default_str();
  cmd->add_option("--memory-limit-gib", a->memory_limit_gib,
                  "hold the rest of the card with a cudaMalloc ballast, leaving this much")->check(non_negative);
  cmd->add_option("--json", a->json, "also write the report as JSON to this file");
  cmd->add_option("--write-hf", a->write_hf, "write the random model as a BF16 Hugging Face folder here and stop");
  cmd->add_option("--tokens-out", a->tokens_out, "write the token windows of every step here (JSON)");
  cmd->callback([a] { run(*a); });
});
