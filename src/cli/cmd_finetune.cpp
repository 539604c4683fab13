// `qlora finetune`, `qlora eval`, `qlora generate` (chapters 7 and 8): QLoRA fine-tuning
// of a LLaMA checkpoint on a text file or instruction data, perplexity of a text file,
// and text generation (or a reply in a prompt template), each with or without a PEFT
// adapter. The work is in finetune.hpp and generate.hpp; this file only parses flags and
// prints.
#include "atomic_file.hpp"
#include "checkpoint.hpp"
#include "command.hpp"
#include "data_parallel.hpp"
#include "finetune.hpp"
#include "generate.hpp"
#include "interrupt.hpp"
#include "memory_plan.hpp"
#include "safetensors.hpp"
#include "search_path.hpp"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <iostream>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>

#include <unistd.h>

#ifdef QLORA_HAVE_CUDA
#include "bnb_config.hpp"
#include "cuda_check.cuh"
#include "generate_gpu.cuh"
#include "gpu_trainer.cuh"
#include "hf_folder.hpp"
#include "hf_llama.hpp"
#include "model_stream.cuh"
#include "paged.cuh"
#endif

namespace {

using namespace qlora;

// Flags shared by the three commands: which model, how it is stored, which adapter.
struct ModelOptions {
  std::string model = "kjv15M.bin";
  std::string storage = "nf4-dq";
  std::string adapter;
  std::string tokenizer;
  const CLI::Option* storage_flag = nullptr;

  void add(CLI::App* cmd, bool with_adapter) {
    cmd->add_option("--model", model, "llama2.c .bin or Hugging Face folder (name searched in the model path)")
        ->capture_default_str();
    storage_flag = cmd->add_option("--storage", storage,
                                   "frozen base format: f32 bf16 nf4 nf4-dq fp4 fp4-dq int4 "
                                   "(a folder saved in 4 bits: its own)")
                       ->capture_default_str();
    cmd->add_option("--tokenizer", tokenizer, "tokenizer.model, tokenizer.bin or tokenizer.json (default: next to the model, else the model path)");
    if (with_adapter) cmd->add_option("--adapter", adapter, "PEFT adapter folder to apply");
  }
  std::filesystem::path model_path() const { return require_model(model); }
  std::unique_ptr<Tokenizer> load_tok(const std::filesystem::path& mp) const {
    return load_tokenizer(tokenizer.empty() ? find_tokenizer_for(mp) : std::filesystem::path(tokenizer));
  }
  // A folder saved in 4 bits is used as stored, in its own storage: --storage may only
  // repeat it, since any other storage would mean quantizing the stored weights again.
  BaseStorage storage_for(const LlamaWeights& w, const std::filesystem::path& mp) const {
    const BaseStorage asked = parse_base_storage(storage);
    const auto stored = prequantized_storage(w);
    if (!stored) return asked;
    if (storage_flag->count() > 0 && asked != *stored)
      throw std::invalid_argument(mp.string() + " is stored in " + to_string(*stored) + " and is used as stored; --storage " +
                                  storage + " would quantize it again (leave --storage out or pass --storage " +
                                  to_string(*stored) + ")");
    return *stored;
  }
  LlamaModel load(const std::filesystem::path& mp) const {
    const LlamaWeights w = load_llama_weights(mp);
    LlamaModel m(w, storage_for(w, mp));
    if (!adapter.empty()) adapter_from_peft(m, read_peft_adapter(adapter));
    return m;
  }
  /// The model, then its tokenizer, refused together when the tokenizer makes ids the model
  /// has no embedding for (stories260K's 512 tokens with the LLaMA-2 tokenizer's 32000, say).
  std::pair<LlamaModel, std::unique_ptr<Tokenizer>> load_with_tokenizer(const std::filesystem::path& mp) const {
    LlamaModel m = load(mp);
    auto tok = load_tok(mp);
    check_tokenizer(*tok, m.config(), mp);
    return {std::move(m), std::move(tok)};
  }
  static void check_tokenizer(const Tokenizer& tok, const LlamaConfig& c, const std::filesystem::path& mp) {
    if (tok.vocab_size() > c.vocab_size) {
      throw std::invalid_argument("the tokenizer (" + std::to_string(tok.vocab_size()) + " tokens) does not fit " +
                                  mp.string() + " (vocabulary " + std::to_string(c.vocab_size) +
                                  "): give the model's own tokenizer with --tokenizer");
    }
  }
};

// The model reads at most its context length of tokens at once (its RoPE tables end
// there), and no more than its sliding window.
void check_seq_len(int seq_len, const LlamaConfig& c, const std::filesystem::path& mp) {
  check_sequence_length(c, seq_len, "--seq-len " + std::to_string(seq_len) + " with " + mp.string());
}

void print_val(const char* when, double loss) {
  std::printf("%s: validation loss %.4f nats/token, perplexity %.2f\n", when, loss, std::exp(loss));
}

#ifdef QLORA_HAVE_CUDA
//! [join-nccl]
// A world of one sums nothing, so it builds no NCCL communicator: a single-GPU run is
// exactly what it was, and needs neither MPI nor NCCL at run time. A build without NCCL
// sums through MPI on the host instead (GpuTrainer::reduce_grads).
void join_nccl(cuda::GpuTrainer& gpu, Communicator& world, double timeout_s) {
  if (world.size() == 1) return;
#ifdef QLORA_HAVE_NCCL
  gpu.use_nccl(world, timeout_s);
#else
  (void)gpu, (void)timeout_s;
  if (world.rank() == 0) std::fprintf(stderr, "note: built without NCCL: gradients are summed through MPI on the host\n");
#endif
}
//! [join-nccl]
#endif

// The trainer for --device: cpu, cuda, or auto (cuda when this build has CUDA and a device is present).
// In a data-parallel run each rank takes its own GPU first, and its gradients are summed
// with NCCL.
std::unique_ptr<Trainer> make_trainer(const std::string& device, LlamaModel& model, const FinetuneConfig& cfg,
                                      double timeout_s) {
#ifdef QLORA_HAVE_CUDA
  const bool present = device != "cpu" && cuda::cuda_device_present();  // --device cpu never touches the driver
  if (device == "cuda" && !present) throw std::invalid_argument("--device cuda: no CUDA device is available here");
  if (present) {
    if (cfg.world->size() > 1) cuda::select_rank_device(*cfg.world);
    auto gpu = std::make_unique<cuda::GpuTrainer>(model, cfg.optim, cfg.weight_decay);
    join_nccl(*gpu, *cfg.world, timeout_s);
    return gpu;
  }
#else
  (void)timeout_s;
  if (device == "cuda") throw std::invalid_argument("--device cuda: this qlora was built without CUDA (QLORA_CUDA=OFF)");
#endif
  return std::make_unique<CpuTrainer>(model, cfg.optim, cfg.weight_decay);
}

#ifdef QLORA_HAVE_CUDA
// The model on the GPU for eval and generate. A Hugging Face folder without an adapter
// streams onto the GPU (no host copy of the model: this is how a 65B model is evaluated);
// anything else is loaded on the host first and uploaded.
std::unique_ptr<cuda::LlamaModelGpu> gpu_model(const ModelOptions& m, const std::filesystem::path& mp,
                                               const Tokenizer& tok) {
  if (!cuda::cuda_device_present()) throw std::invalid_argument("--device cuda: no CUDA device is available here");
  // A folder already in 4 bits loads as stored through the host model (small models only).
  if (std::filesystem::is_directory(mp) && m.adapter.empty() && !read_bnb_4bit_config(mp / "config.json")) {
    const HfLlamaFolder folder(mp);
    ModelOptions::check_tokenizer(tok, folder.config(), mp);
    std::mt19937_64 no_adapters(0);
    return std::make_unique<cuda::LlamaModelGpu>(folder.config(), parse_base_storage(m.storage),
                                                 cuda::folder_fill(folder), std::nullopt, no_adapters,
                                                 cuda::print_load_progress);
  }
  LlamaModel host = m.load(mp);
  ModelOptions::check_tokenizer(tok, host.config(), mp);
  return std::make_unique<cuda::LlamaModelGpu>(host);
}
#endif

// `qlora eval --device cuda`.
double eval_on_gpu(const ModelOptions& m, const std::filesystem::path& mp, int seq_len, int batch, int windows,
                   const std::function<std::vector<int>(const Tokenizer&)>& text_ids) {
#ifdef QLORA_HAVE_CUDA
  if (!cuda::cuda_device_present()) throw std::invalid_argument("--device cuda: no CUDA device is available here");
  auto tok = m.load_tok(mp);
  const std::unique_ptr<cuda::LlamaModelGpu> gpu = gpu_model(m, mp, *tok);
  check_seq_len(seq_len, gpu->config(), mp);
  const BatchLoss loss = [&](const int* x, const int* y, int B, int T) {
    std::mt19937_64 no_dropout(0);
    return gpu->forward(x, y, B, T, false, no_dropout);
  };
  return validation_loss(loss, text_ids(*tok), seq_len, batch, windows);
#else
  (void)m, (void)mp, (void)seq_len, (void)batch, (void)windows, (void)text_ids;
  throw std::invalid_argument("--device cuda: this qlora was built without CUDA (QLORA_CUDA=OFF)");
#endif
}

// `qlora finetune --stream`: the model built on the GPU from a Hugging Face folder, with no
// host copy (kernels/model_stream.cuh), and a trainer that holds it.
std::unique_ptr<Trainer> streamed_trainer(const ModelOptions& m, const std::filesystem::path& mp, const std::string& device,
                                          const LoraSetup& setup, std::mt19937_64& init_rng, const FinetuneConfig& cfg,
                                          bool checkpointing, std::unique_ptr<Tokenizer>& tok, std::int64_t& frozen_bytes,
                                          double timeout_s) {
#ifdef QLORA_HAVE_CUDA
  if (device == "cpu") throw std::invalid_argument("--stream builds the model on the GPU: it needs --device cuda or auto");
  if (!cuda::cuda_device_present()) throw std::invalid_argument("--stream: no CUDA device is available here");
  if (cfg.world->size() > 1) cuda::select_rank_device(*cfg.world);
  tok = m.load_tok(mp);
  const HfLlamaFolder folder(mp);
  ModelOptions::check_tokenizer(*tok, folder.config(), mp);
  auto gpu = std::make_unique<cuda::LlamaModelGpu>(folder.config(), parse_base_storage(m.storage),
                                                   cuda::folder_fill(folder), setup, init_rng, cuda::print_load_progress);
  gpu->set_checkpointing(checkpointing);
  frozen_bytes = gpu->frozen_bytes();
  auto trainer = std::make_unique<cuda::GpuTrainer>(std::move(gpu), cfg.optim, cfg.weight_decay);
  join_nccl(*trainer, *cfg.world, timeout_s);
  return trainer;
#else
  (void)m, (void)mp, (void)setup, (void)init_rng, (void)cfg, (void)checkpointing, (void)tok, (void)frozen_bytes,
      (void)timeout_s;
  throw std::invalid_argument(device == "cpu" ? "--stream builds the model on the GPU: it needs --device cuda or auto"
                                              : "--stream: this qlora was built without CUDA (QLORA_CUDA=OFF)");
#endif
}

//! [gpu-recipe]
// The defaults above are the CPU's shortened recipe (minutes on two cores). On a GPU
// every flag the user did not set takes the chapter's reference recipe instead:
// seq_len 256, batch 32, 400 steps, warmup 20, validation over every held-out window.
void apply_gpu_recipe(const CLI::App& cmd, FinetuneConfig& cfg) {
  auto unset = [&](const char* flag) { return cmd.count(flag) == 0; };
  if (unset("--seq-len")) cfg.seq_len = 256;
  if (unset("--batch")) cfg.batch = 32;
  if (unset("--steps")) cfg.steps = 400;
  if (unset("--warmup")) cfg.warmup = 20;
  if (unset("--eval-every")) cfg.eval_every = 100;
  if (unset("--save-every")) cfg.save_every = 200;
  if (unset("--val-windows")) cfg.val_windows = 0;
}
//! [gpu-recipe]

// `words` without `flag` and its value (either `flag VALUE` or `flag=VALUE`).
std::vector<std::string> without_flag(const std::vector<std::string>& words, const std::string& flag) {
  std::vector<std::string> kept;
  for (std::size_t i = 0; i < words.size(); ++i) {
    if (words[i] == flag) {
      ++i;  // and its value
      continue;
    }
    if (words[i].rfind(flag + "=", 0) != 0) kept.push_back(words[i]);
  }
  return kept;
}

// This very command line with `--resume DIR` in place of any --resume it had (and, from a
// data-parallel run, `--nproc N`: the ranks' own command lines have none).
std::string resume_command(const std::filesystem::path& dir, int nproc) {
  std::string cmd;
  for (const std::string& w : without_flag(qlora::cli::command_line(), "--resume")) cmd += qlora::cli::shell_quote(w) + " ";
  if (nproc > 1) cmd += "--nproc " + std::to_string(nproc) + " ";
  return cmd + "--resume " + qlora::cli::shell_quote(dir.string());
}

//! [nproc]
// `--nproc N`: this command again under mpirun, as N ranks (without --nproc). Refused
// when --device cuda asks for more ranks than this host has GPUs.
[[noreturn]] void run_under_mpirun(int nproc, const std::string& device) {
  if (launched_by_mpirun()) throw std::invalid_argument("--nproc " + std::to_string(nproc) + " under mpirun: use one or the other");
#ifdef QLORA_HAVE_CUDA
  const int gpus = device == "cpu" ? 0 : cuda::cuda_device_count();
  if ((device == "cuda" || gpus > 0) && nproc > gpus)  // auto without a GPU trains on the CPU
    throw std::invalid_argument("--nproc " + std::to_string(nproc) + " with --device " + device + ": this host has " +
                                std::to_string(gpus) + " CUDA device" + (gpus == 1 ? "" : "s") +
                                ", and data-parallel training takes one GPU per rank");
#else
  (void)device;
#endif
  if (!built_with_mpi())
    throw std::invalid_argument("--nproc " + std::to_string(nproc) +
                                ": this qlora was built without MPI (install libopenmpi-dev openmpi-bin, scripts/setup.sh)");
  const auto& words = qlora::cli::command_line();
  const std::vector<std::string> args = without_flag({words.begin() + 1, words.end()}, "--nproc");
  const std::vector<std::string> cmd =
      mpirun_command(nproc, std::filesystem::read_symlink("/proc/self/exe").string(), args);
  std::vector<char*> argv;
  for (const std::string& w : cmd) argv.push_back(const_cast<char*>(w.c_str()));
  argv.push_back(nullptr);
  std::fflush(stdout);
  execvp(argv[0], argv.data());
  throw std::runtime_error("--nproc: cannot start " + cmd[0] + ": " + std::strerror(errno));
}
//! [nproc]

//! [interrupted]
// Training under an InterruptGuard: SIGINT or SIGTERM ends the step, checkpoints it, and
// the command tells how to go on and exits with the shell's status for the signal.
std::vector<StepRecord> finetune_until_interrupted(Trainer& trainer, const FinetuneData& data, FinetuneConfig& cfg) {
  InterruptGuard guard;
  cfg.stop = &InterruptGuard::signal();
  try {
    return finetune(trainer, data, cfg);
  } catch (const TrainingInterrupted& e) {
    std::printf("%s\ncontinue with:\n  %s\n", e.what(), resume_command(e.checkpoint, cfg.world->size()).c_str());
    std::fflush(stdout);
    throw qlora::cli::ExitStatus{exit_status_for_signal(e.signal)};
  }
}
//! [interrupted]

// Instruction data: the model's greedy replies to the first held-out prompts, beside the
// reference answers, in the training template.
void print_replies(const char* when, LlamaModel& m, const Tokenizer& tok, const InstructDataReport& report, int tokens) {
  SampleConfig s;
  s.max_tokens = tokens;
  std::printf("%s greedy replies (template %s):\n", when, to_string(report.chat_template).c_str());
  for (const Conversation& c : report.val_samples) {
    const Conversation prompt = prompt_part(c);
    std::printf("  prompt:    %s%s\n", prompt.messages.back().content.c_str(),
                c.input.empty() ? "" : (" [input: " + c.input + "]").c_str());
    std::printf("  reference: %s\n", c.messages.back().content.c_str());
    std::printf("  reply:     %s\n", generate_reply(m, tok, report.chat_template, prompt, s).c_str());
  }
  std::printf("\n");
}

// The flags that only instruction data takes, refused by name with a text file.
void refuse_instruct_flags(const CLI::App& cmd, const std::string& data) {
  for (const char* flag : {"--val-data", "--template", "--train-on-inputs", "--group-by-length"})
    if (cmd.count(flag) > 0)
      throw std::invalid_argument(std::string(flag) + " applies to instruction data (*.jsonl); " + data +
                                  " is read as plain text");
}

// Under mpirun, an error on one rank ends the whole job at once, naming the rank: the
// others would otherwise wait in their next collective until its deadline.
void abort_job_on_error(Communicator& world, const std::function<void()>& body) {
  try {
    body();
  } catch (const std::exception& e) {
    if (world.size() > 1) world.abort(e.what());
    throw;
  }
}

//! [run-identity]
// What every rank of a run must share, checked before anything is loaded: the files (by
// size and a hash of their ends, so gigabytes are not read) and every flag given.
RunIdentity run_identity(const CLI::App& cmd, const ModelOptions& m, const std::string& data, const std::string& val_data) {
  RunIdentity id;
  const auto mp = m.model_path();
  id.add("--model", mp.filename().string() + " " + file_fingerprint(mp));
  const auto tok = m.tokenizer.empty() ? find_tokenizer_for(mp) : std::filesystem::path(m.tokenizer);
  id.add("--tokenizer", tok.filename().string() + " " + file_fingerprint(tok));
  const auto dp = require_data(data);
  id.add("--data", dp.filename().string() + " " + file_fingerprint(dp));
  if (!val_data.empty()) id.add("--val-data", file_fingerprint(require_data(val_data)));
  // A flag's value as given (else its default); numbers as numbers, so that 1e-3 and 0.001 agree.
  auto canonical = [](const std::string& v) {
    char* end = nullptr;
    const double d = std::strtod(v.c_str(), &end);
    if (v.empty() || *end != '\0') return v;
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.17g", d);
    return std::string(buf);
  };
  for (const CLI::Option* opt : cmd.get_options()) {
    const std::string name = opt->get_name();
    // The files are compared above by content (their paths may differ between hosts); a
    // rank may wait longer than another.
    if (name == "--help" || name == "--model" || name == "--tokenizer" || name == "--data" || name == "--val-data" ||
        name == "--collective-timeout")
      continue;
    std::string value;
    for (const std::string& r : opt->count() > 0 ? opt->reduced_results() : std::vector{opt->get_default_str()})
      value.append(value.empty() ? "" : " ").append(canonical(r));  // append: GCC 12 misfires -Wrestrict on operator+
    id.add(name, value);
  }
  return id;
}
//! [run-identity]

void print_sample(const char* when, LlamaModel& m, const Tokenizer& tok, int tokens) {
  SampleConfig s;
  s.max_tokens = tokens;
  std::printf("%s greedy sample:\n%s\n\n", when, generate_text(m, tok, "ROMEO:", s).c_str());
}

// A CUDA out-of-memory error, in loading or in training, with what qlora plan says of the
// run and the settings that would fit (a Hugging Face folder's config.json gives the shape).
void explain_out_of_memory(const std::filesystem::path& model, const TrainingSetup& setup,
                           const std::function<void()>& run) {
#ifdef QLORA_HAVE_CUDA
  try {
    run();
  } catch (const cuda::OutOfDeviceMemory& e) {
    if (!std::filesystem::is_directory(model)) throw;  // a llama2.c file: a small model, no plan
    throw std::runtime_error(std::string(e.what()) + "\n" +
                             fit_advice(read_hf_config(model / "config.json"), setup,
                                        static_cast<double>(cuda::device_memory().total)));
  }
#else
  (void)model, (void)setup;
  run();
#endif
}

}  // namespace

QLORA_COMMAND([](CLI::App& app) {
  struct Options {
    ModelOptions m;
    std::string data = "tinyshakespeare.txt";
    int rank = 16;
    float alpha = 32.0f;
    float dropout = 0.05f;
    int sample_tokens = 48;
    FinetuneConfig cfg;
    std::string out = "finetune-out";
    std::string resume;
    std::string device = "auto";
    std::string optim = "adamw_32bit";
    bool checkpointing = false;
    bool stream = false;
    std::string val_data;
    std::string chat_template;
    bool train_on_inputs = false;
    int nproc = 1;
    double collective_timeout = 600;
  };
  auto o = std::make_shared<Options>();
  o->cfg.steps = 100;
  o->cfg.batch = 8;
  o->cfg.seq_len = 64;
  o->cfg.warmup = 10;
  o->cfg.eval_every = 50;
  o->cfg.save_every = 50;
  o->cfg.val_windows = 64;
  auto* cmd = app.add_subcommand("finetune", "Chapters 7 and 8: QLoRA fine-tune of a LLaMA checkpoint on a text file or instruction data (CPU or GPU)");
  o->m.add(cmd, false);
  cmd->add_option("--data", o->data,
                  "UTF-8 text file, or instruction data: *.jsonl of Alpaca records or conversations "
                  "(name searched in the data path)")
      ->capture_default_str();
  cmd->add_option("--val-data", o->val_data, "held-out *.jsonl records (default: the last 10% of --data's)");
  cmd->add_option("--template", o->chat_template,
                  "prompt template of instruction data: llama2, chatml, alpaca or llama3 (LLaMA-3's special "
                  "tokens: needs its tokenizer.json) (default: alpaca when every record is an Alpaca record, "
                  "else llama2)");
  cmd->add_flag("--train-on-inputs", o->train_on_inputs,
                "instruction data: a loss on the prompt tokens too (default: on the responses only)");
  cmd->add_flag("--group-by-length,!--no-group-by-length", o->cfg.group_by_length,
                "instruction data: batches of examples of similar length (default on)");
  // Every number is checked here, before anything is loaded, so a bad flag is named at once.
  cmd->add_option("--rank,-r", o->rank, "LoRA rank")->capture_default_str()->check(qlora::cli::positive);
  cmd->add_option("--alpha", o->alpha, "LoRA alpha")->capture_default_str()->check(qlora::cli::positive);
  cmd->add_option("--dropout", o->dropout, "LoRA dropout")->capture_default_str()->check(CLI::Range(0.0, 0.99));
  cmd->add_option("--lr", o->cfg.lr, "peak learning rate")->capture_default_str()->check(qlora::cli::positive);
  cmd->add_option("--warmup", o->cfg.warmup, "linear warmup steps")->capture_default_str()->check(qlora::cli::non_negative);
  cmd->add_option("--steps", o->cfg.steps, "optimizer steps")->capture_default_str()->check(qlora::cli::non_negative);
  cmd->add_option("--batch", o->cfg.batch, "sequences per micro-batch")->capture_default_str()->check(qlora::cli::positive);
  cmd->add_option("--seq-len", o->cfg.seq_len, "tokens per sequence")
      ->capture_default_str()
      ->check(CLI::Range(2, 1 << 20));  // a window predicts tokens 2..T from 1..T-1
  cmd->add_option("--grad-accum", o->cfg.grad_accum, "micro-batches per step")->capture_default_str()->check(qlora::cli::positive);
  cmd->add_option("--clip", o->cfg.clip, "gradient clipping max norm (0: off)")
      ->capture_default_str()
      ->check(qlora::cli::non_negative);
  cmd->add_option("--weight-decay", o->cfg.weight_decay, "AdamW weight decay")
      ->capture_default_str()
      ->check(qlora::cli::non_negative);
  cmd->add_option("--eval-every", o->cfg.eval_every, "validate every N steps (0: only before/after)")
      ->capture_default_str()
      ->check(qlora::cli::non_negative);
  cmd->add_option("--val-windows", o->cfg.val_windows,
                  "cap on validation windows (instruction data: on held-out examples, the first N) (0: all)")
      ->capture_default_str()
      ->check(qlora::cli::non_negative);
  cmd->add_option("--save-every", o->cfg.save_every, "checkpoint every N steps (0: only the final adapter)")
      ->capture_default_str()
      ->check(qlora::cli::non_negative);
  cmd->add_option("--save-total-limit", o->cfg.save_total_limit,
                  "keep the newest N checkpoints (0: all); the one resumed from is never deleted")
      ->capture_default_str()
      ->check(qlora::cli::non_negative);
  cmd->add_option("--max-bad-steps", o->cfg.max_bad_steps,
                  "a step with a non-finite loss or gradient norm is skipped; "
                  "stop after N such steps in a row")
      ->capture_default_str()
      ->check(qlora::cli::positive);
  cmd->add_option("--out", o->out, "output folder: log.jsonl, checkpoint-N/, adapter/")->capture_default_str();
  cmd->add_option("--resume", o->resume,
                  "checkpoint folder to continue from, or an output folder: its newest complete checkpoint-N. "
                  "SIGINT/SIGTERM during training write a checkpoint, print the --resume command and exit "
                  "with 130/143 (a second signal exits at once)");
  cmd->add_option("--seed", o->cfg.seed, "seed of the LoRA init, data order and dropout")->capture_default_str();
  cmd->add_option("--device", o->device, "cpu, cuda, or auto (cuda when a GPU is present)")
      ->capture_default_str()
      ->check(CLI::IsMember({"auto", "cpu", "cuda"}));
  cmd->add_option("--optim", o->optim, "adamw_32bit, adamw_8bit, paged_adamw_32bit (GPU), paged_adamw_8bit (GPU)")
      ->capture_default_str();
  cmd->add_flag("--gradient-checkpointing", o->checkpointing,
                "keep only each layer's input, recompute the layer in backward (less memory, more time)");
  cmd->add_flag("--stream", o->stream,
                "build the model on the GPU from a Hugging Face folder, one tensor at a time, with no host copy "
                "(for models the CPU cannot hold; the greedy samples are skipped)");
  cmd->add_option("--nproc", o->nproc,
                  "data-parallel ranks: runs this command under mpirun -np N, each rank on its share of "
                  "every batch (--device cuda: one GPU each). Or start it with mpirun yourself")
      ->capture_default_str()
      ->check(qlora::cli::positive);
  cmd->add_option("--collective-timeout", o->collective_timeout,
                  "data parallel: seconds a rank waits in a collective for the others before the job is aborted")
      ->capture_default_str()
      ->check(qlora::cli::positive);
  cmd->add_option("--sample-tokens", o->sample_tokens, "length of the ROMEO: samples (instruction data: of the replies)")
      ->capture_default_str()
      ->check(qlora::cli::non_negative);
  cmd->callback([o, cmd] {
    // Flags that do not fit the data are refused before anything is loaded.
    const bool instruct = std::filesystem::path(o->data).extension() == ".jsonl";
    if (!instruct) refuse_instruct_flags(*cmd, o->data);
    const auto chat_template =
        o->chat_template.empty() ? std::nullopt : std::optional(parse_chat_template(o->chat_template));
    TrainingSetup plan;  // for the advice after an out-of-memory error
    plan.batch = o->cfg.batch;
    plan.seq_len = o->cfg.seq_len;
    plan.rank = o->rank;
    plan.dropout = o->dropout;
    plan.storage = parse_base_storage(o->m.storage);
    plan.optim = parse_optim(o->optim);
    plan.checkpointing = o->checkpointing;
    if (o->nproc > 1) run_under_mpirun(o->nproc, o->device);
    const std::unique_ptr<Communicator> world = join_world(o->collective_timeout);
    o->cfg.world = world.get();
    const bool lead = world->rank() == 0;
    // Rank 0 speaks for the run; the others' stdout would only repeat it (their errors
    // still reach stderr).
    if (!lead && !std::freopen("/dev/null", "w", stdout))
      throw std::runtime_error("cannot silence stdout of rank " + std::to_string(world->rank()));
    abort_job_on_error(*world, [&] {
      if (world->size() > 1) check_same_run(*world, run_identity(*cmd, o->m, o->data, o->val_data));
      explain_out_of_memory(o->m.model_path(), plan, [&] {
        const auto mp = o->m.model_path();
        auto& cfg = o->cfg;
        cfg.out = o->out;
        cfg.resume = o->resume;
        cfg.optim = parse_optim(o->optim);
        LoraSetup setup;
        setup.config.r = o->rank;
        setup.config.alpha = o->alpha;
        setup.config.dropout = o->dropout;
        std::mt19937_64 init_rng(cfg.seed);
        // The host model, unless the model is streamed onto the GPU (then the trainer holds it).
        std::optional<LlamaModel> host;
        std::unique_ptr<Tokenizer> tok;
        std::unique_ptr<Trainer> trainer;
        std::string storage = o->m.storage;
        std::int64_t frozen_bytes = 0;
        if (o->stream) {
          trainer = streamed_trainer(o->m, mp, o->device, setup, init_rng, cfg, o->checkpointing, tok, frozen_bytes,
                                     o->collective_timeout);
        } else {
          auto [model, t] = o->m.load_with_tokenizer(mp);
          host.emplace(std::move(model));
          tok = std::move(t);
          host->add_lora(setup, init_rng);
          host->set_checkpointing(o->checkpointing);  // the GPU trainer's model copies the setting
          storage = to_string(host->storage());
          frozen_bytes = host->frozen_storage_bytes();
          trainer = make_trainer(o->device, *host, cfg, o->collective_timeout);
        }
        if (trainer->device() != "cpu") apply_gpu_recipe(*cmd, cfg);
        check_seq_len(cfg.seq_len, trainer->config(), mp);
        const auto data_path = require_data(o->data);
        InstructDataReport report;
        FinetuneData data;
        const std::int64_t lora_parameters = trainer->lora_parameter_count();
        if (instruct) {
          data = load_instruct_data(data_path, o->val_data.empty() ? std::filesystem::path{} : require_data(o->val_data),
                                    *tok, chat_template, o->train_on_inputs, cfg.seq_len, report);
          std::printf("model %s (%s base), %zu train / %zu held-out examples (template %s, loss on %s), "
                      "%lld LoRA parameters\n",
                      mp.string().c_str(), storage.c_str(), data.train_examples.size(), data.val_examples.size(),
                      to_string(report.chat_template).c_str(), o->train_on_inputs ? "every token" : "the responses",
                      static_cast<long long>(lora_parameters));
          if (report.train_skipped.total() > 0)
            std::printf("training, %s: %s\n", o->data.c_str(), report.train_skipped.summary(cfg.seq_len).c_str());
          if (report.val_skipped.total() > 0)
            std::printf("held out, %s: %s\n", (o->val_data.empty() ? o->data : o->val_data).c_str(),
                        report.val_skipped.summary(cfg.seq_len).c_str());
        } else {
          data = load_finetune_data(data_path, *tok);
          std::printf("model %s (%s base), %zu train / %zu validation tokens, %lld LoRA parameters\n", mp.string().c_str(),
                      storage.c_str(), data.train.size(), data.val.size(), static_cast<long long>(lora_parameters));
        }
        std::printf("training on %s with %s", trainer->device().c_str(), to_string(cfg.optim).c_str());
        if (world->size() > 1) std::printf(", %d data-parallel ranks", world->size());
        std::printf("\n");
        const BatchLoss eval = [&](const int* x, const int* y, int B, int T) { return trainer->eval_batch(x, y, B, T); };
        auto sample = [&](const char* when) {
          if (host && instruct)
            print_replies(when, *host, *tok, report, o->sample_tokens);
          else if (host)
            print_sample(when, *host, *tok, o->sample_tokens);
          else
            std::printf("%s greedy sample: skipped (the model was streamed onto the GPU; samples run on the host model)\n\n",
                        when);
        };
        if (!cfg.resume.empty()) std::printf("resuming from %s\n", resolve_resume(cfg.resume).string().c_str());
        double before = -1;
        if (cfg.resume.empty() && lead) {  // when resuming, the adapter's starting point is the checkpoint's
          before = held_out_loss(eval, data, cfg.seq_len, cfg.batch, cfg.val_windows);
          print_val("before", before);
          sample("before");
          std::fflush(stdout);
        }
        const auto records = finetune_until_interrupted(*trainer, data, cfg);
        if (!lead) return;  // rank 0 evaluates and writes the results
        const double after = held_out_loss(eval, data, cfg.seq_len, cfg.batch, cfg.val_windows);
        print_val("after", after);
        // Throughput over the whole run: tokens trained / seconds spent in training steps.
        double tokens = 0, seconds = 0, peak = 0;
        for (const auto& r : records) {
          const auto n = static_cast<double>(r.positions);
          tokens += n;
          seconds += n / r.tokens_per_s;
          peak = std::max(peak, r.peak_mem_mb);
        }
        if (!records.empty())
          std::printf("%d steps in %.1f s: %.0f tokens/s, peak memory %.0f MiB (%s)\n", static_cast<int>(records.size()),
                      seconds, tokens / seconds, peak, trainer->device() == "cpu" ? "process RSS" : "GPU in use");
        nlohmann::json summary = {
            {"model", mp.filename().string()}, {"storage", storage}, {"device", trainer->device()},
            {"optim", to_string(cfg.optim)}, {"steps", cfg.steps}, {"batch", cfg.batch}, {"seq_len", cfg.seq_len},
            {"grad_accum", cfg.grad_accum}, {"rank", o->rank}, {"alpha", o->alpha}, {"dropout", o->dropout},
            {"lr", cfg.lr}, {"warmup", cfg.warmup}, {"clip", cfg.clip}, {"weight_decay", cfg.weight_decay},
            {"val_windows", cfg.val_windows}, {"gradient_checkpointing", o->checkpointing}, {"val_loss_before", before}, {"val_loss_after", after},
            {"train_seconds", seconds}, {"tokens_per_s", seconds > 0 ? tokens / seconds : 0.0},
            {"peak_mem_mb", peak}, {"frozen_bytes", frozen_bytes}, {"lora_parameters", lora_parameters},
            {"streamed", o->stream}, {"data", std::filesystem::path(o->data).filename().string()}};
        if (instruct) {
          summary["template"] = to_string(report.chat_template);
          summary["train_on_inputs"] = o->train_on_inputs;
          summary["group_by_length"] = cfg.group_by_length;
          summary["train_examples"] = data.train_examples.size();
          summary["val_examples"] = data.val_examples.size();
          summary["skipped_records"] = report.train_skipped.total() + report.val_skipped.total();
        }
        write_text_atomic(cfg.out / "summary.json", summary.dump(2) + "\n");
        sample("after");
        write_peft_adapter(cfg.out / "adapter", trainer->adapter());
        std::printf("adapter: %s, log: %s\n", (cfg.out / "adapter").string().c_str(),
                    (cfg.out / "log.jsonl").string().c_str());
      });
    });
  });
});

QLORA_COMMAND([](CLI::App& app) {
  struct Options {
    ModelOptions m;
    std::string data = "tinyshakespeare.txt";
    int seq_len = 64;
    int batch = 8;
    int windows = 0;
    bool held_out = false;
    std::string dump_logits;
    std::string device = "cpu";
  };
  auto o = std::make_shared<Options>();
  auto* cmd = app.add_subcommand("eval", "Chapter 7: perplexity of a text file, optionally with a PEFT adapter");
  o->m.add(cmd, true);
  cmd->add_option("--data", o->data, "UTF-8 text file (name searched in the data path)")->capture_default_str();
  cmd->add_option("--seq-len", o->seq_len, "tokens per window")->capture_default_str()->check(CLI::Range(2, 1 << 20));
  cmd->add_option("--batch", o->batch, "windows per forward")->capture_default_str()->check(qlora::cli::positive);
  cmd->add_option("--windows", o->windows, "cap on windows (0: all)")->capture_default_str()->check(qlora::cli::non_negative);
  cmd->add_flag("--held-out", o->held_out, "only the last 10% (finetune's validation split)");
  cmd->add_option("--dump-logits", o->dump_logits,
                  "write the first window's \"tokens\" (int32 [T]) and \"logits\" (float32 [T, vocab]) "
                  "as safetensors, for tools/peft_check.py");
  cmd->add_option("--device", o->device,
                  "cpu (the float32 reference), or cuda: a Hugging Face folder streams onto the GPU in --storage")
      ->capture_default_str()
      ->check(CLI::IsMember({"cpu", "cuda"}));
  auto text_ids = [o](const Tokenizer& tok) {
    auto data = load_finetune_data(require_data(o->data), tok);
    std::vector<int> ids = data.val;
    if (!o->held_out) {
      ids = data.train;
      ids.insert(ids.end(), data.val.begin(), data.val.end());
    }
    return ids;
  };
  cmd->callback([o, text_ids] {
    if (std::filesystem::path(o->data).extension() == ".jsonl")
      throw std::invalid_argument("qlora eval reads a text file; the held-out response loss of instruction data (" +
                                  o->data + ") is what qlora finetune reports before and after training");
    const auto mp = o->m.model_path();
    if (o->device == "cuda") {
      if (!o->dump_logits.empty()) throw std::invalid_argument("--dump-logits: only with --device cpu");
      const double loss = eval_on_gpu(o->m, mp, o->seq_len, o->batch, o->windows, text_ids);
      std::printf("%s: loss %.4f nats/token, perplexity %.2f\n", o->data.c_str(), loss, std::exp(loss));
      return;
    }
    auto [model, tok] = o->m.load_with_tokenizer(mp);
    check_seq_len(o->seq_len, model.config(), mp);
    const std::vector<int> ids = text_ids(*tok);
    const double loss = validation_loss(model, ids, o->seq_len, o->batch, o->windows);
    std::printf("%s: loss %.4f nats/token, perplexity %.2f\n", o->data.c_str(), loss, std::exp(loss));
    if (!o->dump_logits.empty()) {  // validation_loss checked that one window fits
      const std::vector<int> window(ids.begin(), ids.begin() + o->seq_len);
      std::mt19937_64 no_dropout(0);
      model.forward(window.data(), nullptr, 1, o->seq_len, false, no_dropout);
      SafeTensors st;
      Tensor tokens{DType::I32, {o->seq_len}, {}};
      const auto* bytes = reinterpret_cast<const std::uint8_t*>(window.data());
      tokens.data.assign(bytes, bytes + window.size() * sizeof(std::int32_t));
      st.tensors["tokens"] = std::move(tokens);
      st.tensors["logits"] = Tensor::from_f32(model.logits(), {o->seq_len, model.config().vocab_size});
      write_safetensors(o->dump_logits, st);
      std::printf("first window's tokens and logits: %s\n", o->dump_logits.c_str());
    }
  });
});

// The prompts of `qlora generate --prompts FILE`: one per line, blank lines skipped.
std::vector<std::string> read_prompts(const std::string& file) {
  std::ifstream in(file);
  if (!in) throw std::invalid_argument("--prompts " + file + ": cannot open the file");
  std::vector<std::string> prompts;
  for (std::string line; std::getline(in, line);) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (!line.empty()) prompts.push_back(line);
  }
  if (prompts.empty()) throw std::invalid_argument("--prompts " + file + ": no prompts in the file (one per line)");
  return prompts;
}

// `qlora generate --device cuda`: the prompts decoded as batches on the GPU, then tokens/s.
void generate_on_gpu(const ModelOptions& m, const std::filesystem::path& mp, const std::vector<std::string>& prompts,
                     const SampleConfig& s, bool cuda_graphs) {
#ifdef QLORA_HAVE_CUDA
  auto tok = m.load_tok(mp);
  const std::unique_ptr<cuda::LlamaModelGpu> gpu = gpu_model(m, mp, *tok);
  cuda::GenerateStats st;
  for (const std::string& text : cuda::generate_text_gpu(*gpu, *tok, prompts, s, &st, cuda_graphs))
    std::printf("%s\n", text.c_str());
  std::printf("generated %lld tokens for %zu prompt(s) in %.3f s (prefill of %lld prompt tokens: %.3f s): "
              "%.1f tokens/s on the GPU, decoding\n",
              st.generated_tokens, prompts.size(), st.seconds, st.prompt_tokens, st.prefill_seconds,
              st.decode_tokens_per_s());
#else
  (void)m, (void)mp, (void)prompts, (void)s, (void)cuda_graphs;
  throw std::invalid_argument("--device cuda: this qlora was built without CUDA (QLORA_CUDA=OFF)");
#endif
}

// --device auto: cuda when this build has CUDA and a device is present.
bool generate_uses_gpu(const std::string& device) {
  if (device == "cpu") return false;  // never touches the driver
#ifdef QLORA_HAVE_CUDA
  const bool present = cuda::cuda_device_present();
  if (device == "cuda" && !present) throw std::invalid_argument("--device cuda: no CUDA device is available here");
  return present;
#else
  if (device == "cuda") throw std::invalid_argument("--device cuda: this qlora was built without CUDA (QLORA_CUDA=OFF)");
  return false;
#endif
}

//! [chat-session]
// `qlora generate --chat`: the conversation grows by one user line and one reply per turn,
// and every reply is generated from the whole conversation so far, rendered by the template
// as in training. `c` ends with the --prompt turn; `first` says whether it was given.
static void chat_session(LlamaModel& model, const Tokenizer& tok, ChatTemplate t, Conversation c, bool first,
                         const SampleConfig& s) {
  auto reply = [&] {
    const std::string text = generate_reply(model, tok, t, c, s);
    std::printf("%s\n", text.c_str());
    std::fflush(stdout);
    c.messages.push_back({Role::assistant, text});
  };
  if (first) reply();
  else c.messages.pop_back();
  const bool terminal = isatty(STDIN_FILENO) != 0;
  std::string line;
  auto next_line = [&] {
    if (terminal) std::fputs("> ", stderr);  // a prompt only for a person at the keyboard
    return static_cast<bool>(std::getline(std::cin, line));
  };
  while (next_line()) {
    if (line.empty()) continue;
    c.messages.push_back({Role::user, line});
    reply();
  }
}
//! [chat-session]

QLORA_COMMAND([](CLI::App& app) {
  struct Options {
    ModelOptions m;
    std::string prompt = "ROMEO:";
    std::string chat_template;
    std::string system;
    std::string input;
    std::string prompts;
    std::string device = "cpu";
    bool chat = false;
    bool no_cuda_graphs = false;
    SampleConfig s;
  };
  auto o = std::make_shared<Options>();
  auto* cmd = app.add_subcommand("generate", "Chapters 7 and 8: generate text, or a reply in a prompt template, "
                                             "optionally with a PEFT adapter");
  o->m.add(cmd, true);
  cmd->add_option("--prompt", o->prompt, "prompt text (with --template: the user's message, or Alpaca's instruction)")
      ->capture_default_str();
  cmd->add_option("--template", o->chat_template,
                  "llama2, chatml, alpaca or llama3: format --prompt as a user turn, as finetune formats its "
                  "instruction data, and print the reply");
  cmd->add_option("--system", o->system, "with --template llama2, chatml or llama3: a system message first");
  cmd->add_option("--input", o->input, "with --template: Alpaca's input (chat templates: after the instruction)");
  cmd->add_option("--max-tokens", o->s.max_tokens, "tokens to generate")->capture_default_str()->check(qlora::cli::non_negative);
  cmd->add_option("--temperature", o->s.temperature, "0: greedy")->capture_default_str()->check(qlora::cli::non_negative);
  cmd->add_option("--top-p", o->s.top_p, "nucleus sampling mass")->capture_default_str()->check(CLI::Range(0.0, 1.0));
  cmd->add_option("--seed", o->s.seed, "sampling seed")->capture_default_str();
  cmd->add_option("--prompts", o->prompts,
                  "file of prompts, one per line, generated in order (on the GPU as batches of up to 32)");
  cmd->add_flag("--chat", o->chat,
                "with --template: a conversation on stdin, one user turn per line (--prompt, when given, is "
                "the first); each reply ends at the template's end of turn (EOS, chatml's <|im_end|>, "
                "llama3's <|eot_id|>)");
  cmd->add_flag("--no-cuda-graphs", o->no_cuda_graphs,
                "on the GPU: launch every kernel of a decode step from the host instead of replaying the step "
                "from a CUDA graph (to measure what the graph saves)");
  cmd->add_option("--device", o->device, "cpu (the float32 reference), cuda, or auto (cuda when a GPU is present)")
      ->capture_default_str()
      ->check(CLI::IsMember({"cpu", "cuda", "auto"}));
  cmd->callback([o, cmd] {
    if (o->chat_template.empty())
      for (const char* flag : {"--system", "--input"})
        if (cmd->count(flag) > 0) throw std::invalid_argument(std::string(flag) + " needs --template");
    // The prompt as an instruction record: alpaca renders it as its instruction (and
    // input), the chat templates as the user's turn.
    if (o->chat && o->chat_template.empty()) throw std::invalid_argument("--chat needs --template");
    Conversation c;
    if (!o->chat_template.empty()) {
      if (!o->prompts.empty()) throw std::invalid_argument("--prompts with --template is not implemented: one --prompt at a time");
      if (o->device != "cpu") throw std::invalid_argument("--template with --device " + o->device + " is not implemented: use --device cpu");
      const ChatTemplate t = parse_chat_template(o->chat_template);
      if (!o->system.empty()) c.messages.push_back({Role::system, o->system});
      c.messages.push_back({Role::user, o->prompt});
      c.instruction_record = true;
      c.input = o->input;
      render_chat(t, c, true);  // a template that cannot take it says so before the model loads
    }
    const std::vector<std::string> prompts = o->prompts.empty() ? std::vector<std::string>{o->prompt}
                                                                : read_prompts(o->prompts);
    const auto mp = o->m.model_path();
    const bool on_gpu = generate_uses_gpu(o->device);
    if (o->no_cuda_graphs && !on_gpu) throw std::invalid_argument("--no-cuda-graphs: this run decodes on the CPU");
    if (on_gpu) return generate_on_gpu(o->m, mp, prompts, o->s, !o->no_cuda_graphs);
    auto [model, tok] = o->m.load_with_tokenizer(mp);
    if (o->chat) return chat_session(model, *tok, parse_chat_template(o->chat_template), c, cmd->count("--prompt") > 0, o->s);
    if (!o->chat_template.empty()) {
      std::printf("%s\n", generate_reply(model, *tok, parse_chat_template(o->chat_template), c, o->s).c_str());
      return;
    }
    for (const std::string& p : prompts) {
      check_generation_fits(model.config(), static_cast<int>(prompt_ids(*tok, p).size()), o->s.max_tokens);
      std::printf("%s\n", generate_text(model, *tok, p, o->s).c_str());
    }
  });
});
