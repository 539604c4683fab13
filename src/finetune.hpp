// QLoRA fine-tuning on the CPU (chapter 7, "Training"): the data pipeline (a text
// file, tokenized with BOS first, the last 10% held out contiguously for
// validation, random seq_len windows of the rest from a seeded generator), the
// training loop (AdamW, linear warmup then constant learning rate, global-norm
// clipping, gradient accumulation), validation loss, a JSONL log of every step,
// and checkpoints (PEFT adapter + optimizer state + trainer state, checkpoint.hpp) that
// --resume continues from with the same data order, so the loss curve is identical.
// A long run survives: a step with a non-finite loss or gradient norm is skipped, too
// many in a row stop the run, and a signal stops it after a checkpoint.
// The loop drives a Trainer: CpuTrainer here, cuda::GpuTrainer (kernels/gpu_trainer.cuh)
// on the GPU; data order, logging and checkpoints are one code path for both. Under
// mpirun the same loop trains data-parallel (data_parallel.hpp): every rank builds each
// global batch, trains on its rows and adds its gradients to the others'.
#pragma once
#include "llama_model.hpp"
#include "example_batches.hpp"
#include "peft_adapter.hpp"
#include "tokenizer.hpp"

#include <atomic>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

namespace qlora {

class Communicator;

/// What a fine-tune reads: the token ids of a text, split into a training part and a
/// held-out validation part; or instruction examples (instruct_data.hpp), likewise split.
struct FinetuneData {
  std::vector<int> train;  ///< the first 90% of the tokens (BOS first)
  std::vector<int> val;    ///< the last 10%, contiguous
  std::vector<Example> train_examples;  ///< instruction data: trained in padded batches (example_batches.hpp)
  std::vector<Example> val_examples;    ///< held out: validation is the loss on their responses
  bool instruct() const { return !train_examples.empty(); }
};

/// Reads a UTF-8 text file, encodes it with `tok`, puts BOS first and holds out the
/// last `val_fraction` of the tokens. Throws std::runtime_error naming the file when
/// it cannot be read or is too short to split.
FinetuneData load_finetune_data(const std::filesystem::path& text_file, const Tokenizer& tok,
                                double val_fraction = 0.1);

/// What load_instruct_data read and left out.
struct InstructDataReport {
  ChatTemplate chat_template = ChatTemplate::llama2;
  int train_records = 0, val_records = 0;
  SkippedRecords train_skipped, val_skipped;
  std::vector<Conversation> val_samples;  ///< the first three single-turn held-out records, for sample replies
};

/// Instruction data (chapter 8): the records of train_file (JSONL, instruct_data.hpp) as
/// training examples; held out, the records of val_file, or when it is empty the last
/// val_fraction of train_file's records (contiguous, at least one). Rendered with
/// `chat_template`, else default_template of the training records; training labels on
/// the responses only unless train_on_inputs, held-out labels always on the responses
/// only, so that validation measures the same thing either way. Throws
/// std::runtime_error naming the file when no example is left on either side.
FinetuneData load_instruct_data(const std::filesystem::path& train_file, const std::filesystem::path& val_file,
                                const Tokenizer& tok, const std::optional<ChatTemplate>& chat_template,
                                bool train_on_inputs, int seq_len, InstructDataReport& report,
                                double val_fraction = 0.1);

/// The tokenizer next to a model file (or inside a model folder): tokenizer.model
/// (SentencePiece), else tokenizer.json (byte-level BPE); else require_model("tokenizer.model").
std::filesystem::path find_tokenizer_for(const std::filesystem::path& model);

/// A PEFT adapter with setup's LoraConfig and target modules and no module tensors yet:
/// what every exporter of adapters (host model or device) starts from.
PeftAdapter empty_peft_adapter(const LoraSetup& setup);
/// The model's adapters as a PEFT adapter, gradients dropped. No row conversion: the
/// model's q/k rows are in PEFT's (Hugging Face's) rotate-half order.
PeftAdapter adapter_to_peft(const LlamaModel& model);
/// The module `name` of a PEFT adapter, checked to have A and B of the given sizes; throws
/// std::runtime_error naming `where` and the module otherwise. (Every loader of adapter
/// values, host or device, goes through it.)
const LoraAdapter& peft_module(const PeftAdapter& peft, const std::string& name, std::size_t a_size,
                               std::size_t b_size, const std::string& where);
/// Loads a PEFT adapter into the model: adds adapters for its target modules with its
/// LoraConfig, then copies A and B as stored.
/// Throws std::runtime_error naming the module when a tensor is missing or mis-shaped.
void adapter_from_peft(LlamaModel& model, const PeftAdapter& adapter);

/// The optimizers of chapter 6, by the names transformers' Trainer gives them.
enum class OptimKind { adamw, adamw8bit, paged_adamw, paged_adamw8bit };
/// "adamw_32bit", "adamw_8bit", "paged_adamw_32bit", "paged_adamw_8bit".
std::string to_string(OptimKind k);
/// Inverse of to_string (also "adamw", "paged_adamw"); throws std::invalid_argument naming the value.
OptimKind parse_optim(const std::string& s);

struct FinetuneConfig {
  int steps = 30;
  int batch = 2;
  int seq_len = 32;
  int grad_accum = 1;
  float lr = 1e-3f;
  int warmup = 0;        ///< steps of linear warmup (lr·step/warmup), then constant lr
  double clip = 0.3;     ///< global-norm gradient clipping; ≤ 0 turns it off
  float weight_decay = 0.0f;
  OptimKind optim = OptimKind::adamw;
  int eval_every = 0;    ///< validation every N steps (0: never during training)
  int val_windows = 0;   ///< cap on validation windows (0: all)
  int save_every = 0;    ///< checkpoint every N steps into out/checkpoint-STEP (0: never)
  int save_total_limit = 3;  ///< keep the newest N checkpoints in out (0: all); never the one resumed from
  int max_bad_steps = 3;     ///< stop after this many non-finite steps in a row (each is skipped)
  bool group_by_length = true;  ///< instruction data: batches of similar lengths (example_batches.hpp)
  std::uint64_t seed = 1337;
  std::filesystem::path out;     ///< log.jsonl and checkpoints go here (empty: nothing written)
  std::filesystem::path resume;  ///< a checkpoint, or an output folder (its newest complete checkpoint), to continue from
  bool progress = true;          ///< a progress line per step on stderr
  /// Read after every step when set: a nonzero value (a signal number, InterruptGuard::signal())
  /// writes a checkpoint of that step and throws TrainingInterrupted.
  const std::atomic<int>* stop = nullptr;
  /// The ranks of a data-parallel run (data_parallel.hpp); null: this process alone.
  Communicator* world = nullptr;
};

/// What finetune() throws when cfg.stop turned nonzero: the run stopped after `step`, whose
/// checkpoint is `checkpoint` (empty when cfg.out is: nothing was written).
class TrainingInterrupted : public std::runtime_error {
 public:
  TrainingInterrupted(int signal, int step, std::filesystem::path checkpoint);
  int signal;
  int step;
  std::filesystem::path checkpoint;
};

/// One optimizer step as logged.
struct StepRecord {
  int step = 0;          ///< 1-based
  float loss = 0;        ///< mean training loss over the step's counted targets (all micro-batches)
  float lr = 0;
  double grad_norm = 0;  ///< before clipping
  std::int64_t positions = 0;  ///< input positions computed (batch × T per micro-batch, padding included)
  double tokens_per_s = 0;     ///< positions per second
  double peak_mem_mb = 0;  ///< peak memory of the training device so far, MiB (Trainer::peak_memory_mb)
  float val_loss = -1;   ///< when validated at this step, else −1
  std::string skipped;   ///< "non-finite loss" or "non-finite gradient norm" when the update was skipped, else empty
};

/// Learning rate at 1-based step `step`: linear warmup over `warmup` steps, then constant.
float learning_rate(const FinetuneConfig& cfg, int step);

/// The mean loss of one batch (B×T inputs x, targets y), without dropout.
using BatchLoss = std::function<float(const int* x, const int* y, int B, int T)>;

/// Mean next-token loss over consecutive seq_len windows of `tokens` (at most
/// max_windows when > 0), batched `batch` windows per forward, no dropout.
/// Throws std::invalid_argument when not even one window fits.
double validation_loss(const BatchLoss& loss, const std::vector<int>& tokens, int seq_len, int batch,
                       int max_windows = 0);
/// The same on the CPU model.
double validation_loss(LlamaModel& model, const std::vector<int>& tokens, int seq_len, int batch,
                       int max_windows = 0);
/// Mean loss over every counted target of the examples (at most max_examples when > 0),
/// `batch` examples per forward, padded to each batch's longest; the batches go by
/// length, so few pads are computed. Throws std::invalid_argument when there is none.
double validation_loss(const BatchLoss& loss, const std::vector<Example>& examples, int batch, int max_examples = 0);
/// The held-out loss of either kind of data: the text's windows or the examples' responses.
double held_out_loss(const BatchLoss& loss, const FinetuneData& data, int seq_len, int batch, int max_windows);

//! [trainer]
/// What the training loop drives: a model with LoRA adapters, their gradients and an
/// optimizer over them, on some device. Checkpoints save adapter() and load through
/// load_adapter(), so the loop needs no host copy of the model: a model streamed onto
/// the GPU trains the same way. sync_to_host / sync_from_host move the adapters to and
/// from the host model(), when there is one (the CPU trains it in place; without a host
/// model they do nothing).
class Trainer {
 public:
  virtual ~Trainer() = default;
  /// The host model; throws std::logic_error when the model lives on the GPU only.
  virtual LlamaModel& model() = 0;
  virtual const LlamaConfig& config() const = 0;
  /// The adapters' current values as a PEFT adapter (gradients dropped).
  virtual PeftAdapter adapter() = 0;
  /// Sets the adapters' values from a PEFT adapter with the same modules and shapes;
  /// throws std::runtime_error naming `where` and the module otherwise.
  virtual void load_adapter(const PeftAdapter& a, const std::string& where) = 0;
  /// Elements of all A and B matrices (read from their sizes, nothing copied).
  virtual std::int64_t lora_parameter_count() const = 0;
  virtual void zero_grad() = 0;
  /// Forward and backward of one micro-batch; gradients accumulate. Returns its mean loss.
  /// first_sequence: its first row in the step's global batch (data parallel; else 0).
  virtual float train_micro_batch(const int* x, const int* y, int B, int T, std::mt19937_64& dropout_rng,
                                  int first_sequence) = 0;
  /// Mean loss of one batch, no dropout, no gradients.
  virtual float eval_batch(const int* x, const int* y, int B, int T) = 0;
  virtual void scale_grads(float s) = 0;
  /// Replaces every gradient by its sum over the ranks of `world` (nothing for a world of one).
  virtual void reduce_grads(Communicator& world) = 0;
  /// Clips all gradients to global norm max_norm; returns the norm before clipping.
  virtual double clip_grad_norm(double max_norm) = 0;
  virtual void optimizer_step(float lr) = 0;
  virtual std::int64_t optimizer_steps() const = 0;
  virtual void save_optimizer(const std::filesystem::path& file) const = 0;
  virtual void load_optimizer(const std::filesystem::path& file) = 0;
  virtual void sync_to_host() = 0;
  virtual void sync_from_host() = 0;
  /// Peak memory so far, MiB: the process's peak RSS on the CPU, the GPU's peak used memory on a GPU.
  virtual double peak_memory_mb() const = 0;
  /// "cpu" or the GPU's name.
  virtual std::string device() const = 0;
};
//! [trainer]

/// Trains the host model's adapters in place on the CPU with the AdamW of chapter 6
/// (32-bit or 8-bit; the paged optimizers need a GPU and are refused).
class CpuTrainer final : public Trainer {
 public:
  CpuTrainer(LlamaModel& model, OptimKind optim, float weight_decay);
  ~CpuTrainer() override;
  LlamaModel& model() override { return model_; }
  const LlamaConfig& config() const override { return model_.config(); }
  PeftAdapter adapter() override { return adapter_to_peft(model_); }
  void load_adapter(const PeftAdapter& a, const std::string& where) override;
  std::int64_t lora_parameter_count() const override { return model_.lora_parameter_count(); }
  void zero_grad() override { model_.zero_grad(); }
  float train_micro_batch(const int* x, const int* y, int B, int T, std::mt19937_64& dropout_rng,
                          int first_sequence) override;
  float eval_batch(const int* x, const int* y, int B, int T) override;
  void scale_grads(float s) override;
  void reduce_grads(Communicator& world) override;
  double clip_grad_norm(double max_norm) override;
  void optimizer_step(float lr) override;
  std::int64_t optimizer_steps() const override;
  void save_optimizer(const std::filesystem::path& file) const override;
  void load_optimizer(const std::filesystem::path& file) override;
  void sync_to_host() override {}
  void sync_from_host() override {}
  double peak_memory_mb() const override;
  std::string device() const override { return "cpu"; }

 private:
  struct Optim;
  LlamaModel& model_;
  std::unique_ptr<Optim> opt_;
  std::vector<float> flat_grads_;  ///< every gradient in one buffer: one all-reduce per step
};

/// One optimizer step's forward and backward passes: the gradient and the returned loss
/// are those of the mean over every counted target of all the micro-batches, as
/// transformers' Trainer takes it across gradient accumulation (num_items_in_batch), so
/// a token weighs the same in a micro-batch of short answers as in one of long answers.
/// A micro-batch without counted targets is not run.
double accumulate_gradients(Trainer& tr, const std::vector<MicroBatch>& micro, std::mt19937_64& dropout_rng);
/// The same for one rank of a data-parallel step: `micro` are this rank's rows of the
/// step's micro-batches, `counted` the counted targets of the whole step on all ranks.
/// Gradient and loss are this rank's share: summed over the ranks, they are the step's.
double accumulate_gradients(Trainer& tr, const std::vector<MicroBatch>& micro, std::int64_t counted,
                            std::mt19937_64& dropout_rng);

/// Trains the trainer's adapters (its model must have LoRA). With cfg.resume, first
/// loads the adapter, the optimizer state and the generator states of that checkpoint
/// and continues from its step. Returns the records of the steps it ran. Throws
/// std::runtime_error after cfg.max_bad_steps non-finite steps in a row, and
/// TrainingInterrupted when cfg.stop asks.
std::vector<StepRecord> finetune(Trainer& trainer, const FinetuneData& data, const FinetuneConfig& cfg);
/// The same on the CPU (CpuTrainer with cfg.optim and cfg.weight_decay).
std::vector<StepRecord> finetune(LlamaModel& model, const FinetuneData& data, const FinetuneConfig& cfg);

}  // namespace qlora
