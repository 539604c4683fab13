// QLoRA fine-tuning on the CPU (chapter 7, "Training"): the data pipeline (a text
// file, tokenized with BOS first, the last 10% held out contiguously for
// validation, random seq_len windows of the rest from a seeded generator), the
// training loop (AdamW, linear warmup then constant learning rate, global-norm
// clipping, gradient accumulation), validation loss, a JSONL log of every step,
// and checkpoints (PEFT adapter + optimizer state + trainer state) that --resume
// continues from with the same data order, so the loss curve is identical.
#pragma once
#include "llama_model.hpp"
#include "peft_adapter.hpp"
#include "tokenizer.hpp"

#include <cstdint>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

namespace qlora {

/// Token ids of a text, split into a training part and a held-out validation part.
struct FinetuneData {
  std::vector<int> train;  ///< the first 90% of the tokens (BOS first)
  std::vector<int> val;    ///< the last 10%, contiguous
};

/// Reads a UTF-8 text file, encodes it with `tok`, puts BOS first and holds out the
/// last `val_fraction` of the tokens. Throws std::runtime_error naming the file when
/// it cannot be read or is too short to split.
FinetuneData load_finetune_data(const std::filesystem::path& text_file, const Tokenizer& tok,
                                double val_fraction = 0.1);

/// The SentencePiece tokenizer.model next to a model file (or inside a model folder),
/// else require_model("tokenizer.model").
std::filesystem::path find_tokenizer_for(const std::filesystem::path& model);

/// The model's adapters as a PEFT adapter: q/k lora_B rows converted to Hugging
/// Face's rotate-half order (lora_B_to_hf), gradients dropped.
PeftAdapter adapter_to_peft(const LlamaModel& model);
/// Loads a PEFT adapter into the model: adds adapters for its target modules with its
/// LoraConfig, then copies A and B (converting q/k B back with lora_B_from_hf).
/// Throws std::runtime_error naming the module when a tensor is missing or mis-shaped.
void adapter_from_peft(LlamaModel& model, const PeftAdapter& adapter);

struct FinetuneConfig {
  int steps = 30;
  int batch = 2;
  int seq_len = 32;
  int grad_accum = 1;
  float lr = 1e-3f;
  int warmup = 0;        ///< steps of linear warmup (lr·step/warmup), then constant lr
  double clip = 0.3;     ///< global-norm gradient clipping; ≤ 0 turns it off
  float weight_decay = 0.0f;
  int eval_every = 0;    ///< validation every N steps (0: never during training)
  int val_windows = 0;   ///< cap on validation windows (0: all)
  int save_every = 0;    ///< checkpoint every N steps into out/checkpoint-STEP (0: never)
  std::uint64_t seed = 1337;
  std::filesystem::path out;     ///< log.jsonl and checkpoints go here (empty: nothing written)
  std::filesystem::path resume;  ///< a checkpoint folder to continue from (empty: fresh start)
  bool progress = true;          ///< a progress line per step on stderr
};

/// One optimizer step as logged.
struct StepRecord {
  int step = 0;          ///< 1-based
  float loss = 0;        ///< mean training loss over the step's micro-batches
  float lr = 0;
  double grad_norm = 0;  ///< before clipping
  double tokens_per_s = 0;
  double peak_rss_mb = 0;  ///< the process's peak resident memory so far (getrusage), MiB
  float val_loss = -1;   ///< when validated at this step, else −1
};

/// Learning rate at 1-based step `step`: linear warmup over `warmup` steps, then constant.
float learning_rate(const FinetuneConfig& cfg, int step);

/// Mean next-token loss over consecutive seq_len windows of `tokens` (at most
/// max_windows when > 0), batched `batch` windows per forward, no dropout.
/// Throws std::invalid_argument when not even one window fits.
double validation_loss(LlamaModel& model, const std::vector<int>& tokens, int seq_len, int batch,
                       int max_windows = 0);

/// Trains the model's adapters (the model must have LoRA). With cfg.resume, first
/// loads the adapter, the optimizer state and the generator states of that checkpoint
/// and continues from its step. Returns the records of the steps it ran.
std::vector<StepRecord> finetune(LlamaModel& model, const FinetuneData& data, const FinetuneConfig& cfg);

}  // namespace qlora
