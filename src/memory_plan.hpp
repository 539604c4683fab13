// The memory planner: parameter counts and the bytes a fine-tuning run needs for
// LLaMA shapes (chapter 4, "How small is LoRA?"; `qlora plan` prints it). It is the
// arithmetic behind the QLoRA paper's headline: full 16-bit fine-tuning of LLaMA-65B
// needs more than 780 GB of GPU memory, QLoRA less than 48 GB.
//
// Conventions (all bytes are decimal: 1 GB = 10^9 bytes, as the paper counts):
//  - A LLaMA block has 4·dim² attention weights (q, k, v, o), 3·dim·hidden MLP
//    weights (gate, up, down) and two RMSNorm vectors; the model adds the token
//    embedding and the output head (vocab·dim each, untied) and a final norm.
//  - QLoRA quantizes the seven linear projections only (as bitsandbytes does);
//    embedding, output head and norms stay in BF16.
//  - 4-bit storage uses chapter 3's bits/parameter: NF4 with one float32 absmax per
//    64 weights is 4 + 32/64 = 4.5; with double quantization (8-bit absmax, one
//    float32 per 256 of them) 4 + 8/64 + 32/(64·256) ≈ 4.127.
//  - Full fine-tuning, the paper's convention: 16-bit weights (2 bytes) + 16-bit
//    gradients (2) + Adam's two float32 moments (8) = 12 bytes per parameter.
//  - LoRA training here: float32 A and B (4) + float32 gradients (4) + AdamW's two
//    float32 moments (8) = 16 bytes per LoRA parameter.
//  - Activations are not counted here: they depend on batch, sequence length and
//    gradient checkpointing. plan_training_memory below counts them, buffer by
//    buffer, for the GPU model of chapter 7.
#pragma once

#include "finetune.hpp"
#include "llama2c.hpp"
#include "llama_model.hpp"

#include <cstdint>
#include <string>
#include <vector>

namespace qlora {

struct LlamaShape {
  std::string name;
  int dim = 0, hidden = 0, layers = 0, heads = 0, vocab = 32000;
};

/// LLaMA-1 7B, 13B, 33B, 65B (Touvron et al., 2023, Table 2; vocabulary 32000).
const std::vector<LlamaShape>& llama_shapes();
/// Looks a shape up by name ("7B", case-insensitive); throws std::invalid_argument listing the names.
const LlamaShape& llama_shape(const std::string& name);

struct ParamCounts {
  std::int64_t linear = 0;     ///< the seven projections of every block
  std::int64_t embedding = 0;  ///< token embedding + output head
  std::int64_t norm = 0;       ///< RMSNorm weights
  std::int64_t total() const { return linear + embedding + norm; }
};

ParamCounts count_params(const LlamaShape& s);

/// LoRA parameters with rank r on all seven projections: r·(in + out) per projection.
std::int64_t lora_param_count(const LlamaShape& s, int r);

/// Bits per parameter of blockwise 4-bit storage (chapter 3's formula): 4 + 32/blocksize,
/// or with double quantization 4 + 8/blocksize + 32/(blocksize·blocksize2).
double quant4_bits_per_param(bool double_quant, int blocksize = 64, int blocksize2 = 256);

/// One row of the plan: a model shape at one LoRA rank.
struct MemoryPlan {
  LlamaShape shape;
  int r = 0;
  ParamCounts params;
  std::int64_t lora_params = 0;
  double lora_percent = 0;     ///< lora_params / params.total() · 100
  double base_bf16 = 0;        ///< bytes: every parameter in BF16
  double base_nf4 = 0;         ///< bytes: linear layers NF4 (4.5 bits), the rest BF16
  double base_nf4_dq = 0;      ///< bytes: linear layers NF4+DQ (≈4.127 bits), the rest BF16
  double lora_training = 0;    ///< bytes: LoRA weights + gradients + AdamW states (16 B/param)
  double full_finetune = 0;    ///< bytes: 16-bit full fine-tuning with Adam (12 B/param)
  double qlora_total = 0;      ///< bytes: base_nf4_dq + lora_training (no activations)
};

MemoryPlan plan_memory(const LlamaShape& s, int r);

// ---------------------------------------------------------------- one training step on the GPU

/// What a QLoRA training step of chapter 7's GPU model (LlamaModelGpu + GpuTrainer) is run with.
struct TrainingSetup {
  int batch = 4, seq_len = 512, rank = 64;
  float dropout = 0.05f;
  BaseStorage storage = BaseStorage::nf4_dq;
  OptimKind optim = OptimKind::paged_adamw;
  bool checkpointing = true;
  bool offload_checkpoints = false;  ///< checkpointed layer inputs in pinned host memory
  bool states_on_device = true;      ///< false: the trainer put the optimizer states in host memory
};

struct MemoryItem {
  std::string group;  ///< "context", "frozen weights", "LoRA + gradients", "optimizer states", "activations kept", "workspaces"
  std::string name;   ///< the workspace items are named as LlamaModelGpu::buffer_inventory names them
  double bytes = 0;
};

struct TrainingMemoryPlan {
  std::vector<MemoryItem> items;
  double total() const;                        ///< bytes: the predicted peak in use
  double group(const std::string& g) const;    ///< bytes of one group
};

/// The CUDA context, measured: cudaMemGetInfo's memory in use before the first allocation
/// (0.51 GiB on the H100 and the H200 with driver 580 and CUDA 13.0).
constexpr double kCudaContextBytes = 0.51 * 1073741824.0;
/// What the CUDA runtime adds during a step beyond our buffers (cuBLAS workspaces, kernels
/// loaded on first use): the mean of what the measured peaks of five runs (7B, 13B, 33B, 65B,
/// 65B with host states; H200, 2026-12-02) had beyond everything else in this plan, 0.01 to
/// 0.17 GiB (docs/benchmarks.md, "qlora plan against the measured peak").
constexpr double kCudaRuntimeBytes = 0.11 * 1073741824.0;

/// The device memory one cudaMalloc of `bytes` takes, measured on the H200 with driver 580
/// (tools/cuda_alloc_footprint.py): up to 1 MiB, a multiple of 8 KiB; above, of 2 MiB.
double cuda_malloc_footprint(double bytes);

/// The device memory of one training step of chapter 7's GPU model at its peak (between
/// forward and backward, or in backward's recomputed layer), buffer by buffer: the weights
/// as stored, the adapters with their gradients (float32), the optimizer states while they
/// are on the device, and every buffer of the forward and backward at the capacity the model
/// gives it. A GPU test checks the workspace items against the model's own inventory.
TrainingMemoryPlan plan_training_memory(const LlamaConfig& c, const TrainingSetup& s);

/// What to say after an out-of-memory error: this run's planned peak against `available`
/// bytes, and the changes of settings that fit (a smaller batch, checkpointing, offloaded
/// layer inputs, optimizer states in host memory), each with its planned peak and flag.
std::string fit_advice(const LlamaConfig& c, const TrainingSetup& s, double available);

}  // namespace qlora
