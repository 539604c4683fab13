// QLoRA fine-tuning loop on the CPU (chapter 7, "Training"). See finetune.hpp.
#include "finetune.hpp"

#include "adamw.hpp"
#include "adamw8bit.hpp"
#include "checkpoint.hpp"
#include "data_parallel.hpp"
#include "example_batches.hpp"
#include "interrupt.hpp"
#include "search_path.hpp"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <optional>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <stdexcept>
#include <utility>
#include <variant>

#include <sys/resource.h>

namespace qlora {

namespace fs = std::filesystem;

namespace {
// Copies into the existing buffer: the optimizer holds pointers to A and B, which a
// vector assignment from a temporary would leave dangling.
void copy_values(const std::vector<float>& src, std::vector<float>& dst) {
  std::copy(src.begin(), src.end(), dst.begin());
}

// Copies A and B of every adapter the model has from a PEFT adapter (the model's q/k
// rows are in PEFT's rotate-half order, so B's rows copy as stored); `where` names the
// source in errors.
void copy_adapter_values(LlamaModel& model, const PeftAdapter& peft, const std::string& where) {
  for (int l = 0; l < model.config().n_layers; ++l)
    for (Proj p : kAllProj) {
      LoraAdapter* a = model.adapter(l, p);
      if (!a) continue;
      const LoraAdapter& m = peft_module(peft, hf_module_name(l, p), a->A.size(), a->B.size(), where);
      copy_values(m.A, a->A);
      copy_values(m.B, a->B);
    }
}
}  // namespace

const LoraAdapter& peft_module(const PeftAdapter& peft, const std::string& name, std::size_t a_size,
                               std::size_t b_size, const std::string& where) {
  auto it = peft.modules.find(name);
  if (it == peft.modules.end()) throw std::runtime_error(where + " has no tensors for module " + name);
  if (it->second.A.size() != a_size || it->second.B.size() != b_size)
    throw std::runtime_error(where + ": tensors of module " + name + " do not match the model's adapter shapes");
  return it->second;
}

void CpuTrainer::load_adapter(const PeftAdapter& a, const std::string& where) { copy_adapter_values(model_, a, where); }

FinetuneData load_finetune_data(const fs::path& text_file, const Tokenizer& tok, double val_fraction) {
  std::ifstream in(text_file, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read data file " + text_file.string());
  std::string text{std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
  std::vector<int> ids{tok.bos_id()};
  auto body = tok.encode(text);
  ids.insert(ids.end(), body.begin(), body.end());
  const auto n = ids.size();
  const auto n_val = static_cast<std::size_t>(static_cast<double>(n) * val_fraction);
  if (n_val < 2 || n - n_val < 2)
    throw std::runtime_error("data file " + text_file.string() + " is too short to split (" + std::to_string(n) +
                             " tokens)");
  FinetuneData d;
  d.train.assign(ids.begin(), ids.end() - static_cast<std::ptrdiff_t>(n_val));
  d.val.assign(ids.end() - static_cast<std::ptrdiff_t>(n_val), ids.end());
  return d;
}

FinetuneData load_instruct_data(const fs::path& train_file, const fs::path& val_file, const Tokenizer& tok,
                                const std::optional<ChatTemplate>& chat_template, bool train_on_inputs, int seq_len,
                                InstructDataReport& report, double val_fraction) {
  std::vector<InstructRecord> train = read_instruct_jsonl(train_file), val;
  if (!val_file.empty()) {
    val = read_instruct_jsonl(val_file);
  } else {
    const auto n_val = std::max<std::size_t>(1, static_cast<std::size_t>(static_cast<double>(train.size()) * val_fraction));
    if (train.size() <= n_val)
      throw std::runtime_error("data file " + train_file.string() + " has " + std::to_string(train.size()) +
                               " records: too few to hold some out (give the held-out records with --val-data)");
    val.assign(train.end() - static_cast<std::ptrdiff_t>(n_val), train.end());
    train.resize(train.size() - n_val);
  }
  report.chat_template = chat_template ? *chat_template : default_template(train);
  report.train_records = static_cast<int>(train.size());
  report.val_records = static_cast<int>(val.size());
  FinetuneData d;
  d.train_examples = make_examples(train, tok, {report.chat_template, train_on_inputs, seq_len}, train_file,
                                   report.train_skipped);
  const fs::path& val_source = val_file.empty() ? train_file : val_file;
  // Samples are single-turn: one user message (after a system message, if any) and its answer.
  for (std::size_t i = 0; i < val.size() && report.val_samples.size() < 3; ++i) {
    const auto& m = val[i].conversation.messages;
    const auto users = std::count_if(m.begin(), m.end(), [](const Message& x) { return x.role == Role::user; });
    if (users == 1 && m.back().role == Role::assistant) report.val_samples.push_back(val[i].conversation);
  }
  d.val_examples = make_examples(val, tok, {report.chat_template, false, seq_len}, val_source, report.val_skipped);
  auto require_some = [&](const std::vector<Example>& examples, const fs::path& file, const SkippedRecords& skipped,
                          const std::string& what) {
    if (examples.empty())
      throw std::runtime_error("no " + what + " example left in " + file.string() + ": " + skipped.summary(seq_len));
  };
  require_some(d.train_examples, train_file, report.train_skipped, "training");
  require_some(d.val_examples, val_source, report.val_skipped, "held-out");
  return d;
}

fs::path find_tokenizer_for(const fs::path& model) {
  const auto dir = fs::is_directory(model) ? model : model.parent_path();
  for (const char* name : {"tokenizer.model", "tokenizer.json"})
    if (auto p = dir / name; fs::exists(p)) return p;
  return require_model("tokenizer.model");
}

PeftAdapter empty_peft_adapter(const LoraSetup& setup) {
  PeftAdapter out;
  out.config = setup.config;
  for (Proj p : kAllProj)
    if (setup.targets[static_cast<std::size_t>(p)]) out.target_modules.emplace_back(proj_name(p));
  return out;
}

PeftAdapter adapter_to_peft(const LlamaModel& model) {
  PeftAdapter out = empty_peft_adapter(model.lora_setup());
  for (int l = 0; l < model.config().n_layers; ++l)
    for (Proj p : kAllProj) {
      const LoraAdapter* a = model.adapter(l, p);
      if (!a) continue;
      LoraAdapter copy(a->in, a->out, a->r);
      copy.A = a->A;
      copy.B = a->B;
      copy.dA.clear();
      copy.dB.clear();
      out.modules.emplace(hf_module_name(l, p), std::move(copy));
    }
  return out;
}

void adapter_from_peft(LlamaModel& model, const PeftAdapter& adapter) {
  LoraSetup setup;
  setup.config = adapter.config;
  setup.targets.fill(false);
  for (const auto& m : adapter.target_modules) setup.targets[static_cast<std::size_t>(parse_proj(m))] = true;
  std::mt19937_64 unused(0);  // every A and B is overwritten below
  model.add_lora(setup, unused);
  copy_adapter_values(model, adapter, "adapter");
}

float learning_rate(const FinetuneConfig& cfg, int step) {
  if (cfg.warmup > 0 && step < cfg.warmup) return cfg.lr * static_cast<float>(step) / static_cast<float>(cfg.warmup);
  return cfg.lr;
}

std::string to_string(OptimKind k) {
  switch (k) {
    case OptimKind::adamw: return "adamw_32bit";
    case OptimKind::adamw8bit: return "adamw_8bit";
    case OptimKind::paged_adamw: return "paged_adamw_32bit";
    case OptimKind::paged_adamw8bit: return "paged_adamw_8bit";
  }
  return "?";
}

OptimKind parse_optim(const std::string& s) {
  for (OptimKind k : {OptimKind::adamw, OptimKind::adamw8bit, OptimKind::paged_adamw, OptimKind::paged_adamw8bit})
    if (s == to_string(k)) return k;
  if (s == "adamw") return OptimKind::adamw;
  if (s == "paged_adamw") return OptimKind::paged_adamw;
  throw std::invalid_argument("unknown optimizer '" + s +
                              "' (expected adamw_32bit, adamw_8bit, paged_adamw_32bit or paged_adamw_8bit)");
}

double validation_loss(const BatchLoss& loss, const std::vector<int>& tokens, int seq_len, int batch,
                       int max_windows) {
  const auto T = static_cast<std::size_t>(seq_len);
  std::size_t windows = tokens.size() < 2 ? 0 : (tokens.size() - 1) / T;
  if (max_windows > 0) windows = std::min(windows, static_cast<std::size_t>(max_windows));
  if (windows == 0)
    throw std::invalid_argument("validation text (" + std::to_string(tokens.size()) +
                                " tokens) is shorter than one window of --seq-len " + std::to_string(seq_len));
  double sum = 0;
  for (std::size_t w0 = 0; w0 < windows; w0 += static_cast<std::size_t>(batch)) {
    const std::size_t nb = std::min(static_cast<std::size_t>(batch), windows - w0);
    std::vector<int> x(nb * T), y(nb * T);
    for (std::size_t b = 0; b < nb; ++b)
      for (std::size_t t = 0; t < T; ++t) {
        x[b * T + t] = tokens[(w0 + b) * T + t];
        y[b * T + t] = tokens[(w0 + b) * T + t + 1];
      }
    // Every window is full, so the mean over a batch times its size sums window means.
    sum += static_cast<double>(loss(x.data(), y.data(), static_cast<int>(nb), seq_len)) * static_cast<double>(nb);
  }
  return sum / static_cast<double>(windows);
}

double validation_loss(const BatchLoss& loss, const std::vector<Example>& examples, int batch, int max_examples) {
  std::size_t n = examples.size();
  if (max_examples > 0) n = std::min(n, static_cast<std::size_t>(max_examples));
  if (n == 0) throw std::invalid_argument("no held-out example to validate on");
  std::vector<int> order(n);
  for (std::size_t i = 0; i < n; ++i) order[i] = static_cast<int>(i);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) {
    return examples[static_cast<std::size_t>(a)].ids.size() > examples[static_cast<std::size_t>(b)].ids.size();
  });
  double sum = 0;
  std::int64_t counted = 0;
  for (std::size_t b0 = 0; b0 < n; b0 += static_cast<std::size_t>(batch)) {
    const std::vector<int> idx(order.begin() + static_cast<std::ptrdiff_t>(b0),
                               order.begin() + static_cast<std::ptrdiff_t>(std::min(n, b0 + static_cast<std::size_t>(batch))));
    const MicroBatch mb = pad_batch(examples, idx, 0);
    // A batch's loss is its mean over its counted targets: weighted by their number, the
    // batches add up to the mean over every held-out response token.
    sum += static_cast<double>(loss(mb.x.data(), mb.y.data(), mb.B, mb.T)) * static_cast<double>(mb.counted);
    counted += mb.counted;
  }
  if (counted == 0) throw std::invalid_argument("the held-out examples have no response token");
  return sum / static_cast<double>(counted);
}

double held_out_loss(const BatchLoss& loss, const FinetuneData& data, int seq_len, int batch, int max_windows) {
  return data.instruct() ? validation_loss(loss, data.val_examples, batch, max_windows)
                         : validation_loss(loss, data.val, seq_len, batch, max_windows);
}

double validation_loss(LlamaModel& model, const std::vector<int>& tokens, int seq_len, int batch, int max_windows) {
  std::mt19937_64 rng(0);  // no dropout in evaluation, so never drawn from
  return validation_loss([&](const int* x, const int* y, int B, int T) { return model.forward(x, y, B, T, false, rng); },
                         tokens, seq_len, batch, max_windows);
}

namespace {

// Peak resident set size of this process in MiB (Linux reports ru_maxrss in KiB).
double peak_rss_mb() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return static_cast<double>(u.ru_maxrss) / 1024.0;
}

std::vector<OptimParam> optim_params(LlamaModel& model) {
  std::vector<OptimParam> params;
  for (auto& [name, a] : model.named_adapters()) {
    params.push_back({name + ".lora_A", a->A.data(), a->dA.data(), a->A.size()});
    params.push_back({name + ".lora_B", a->B.data(), a->dB.data(), a->B.size()});
  }
  return params;
}

}  // namespace

// --- the CPU trainer ---------------------------------------------------------------

struct CpuTrainer::Optim {
  std::variant<AdamW, AdamW8bit> opt;
};

CpuTrainer::CpuTrainer(LlamaModel& model, OptimKind optim, float weight_decay) : model_(model) {
  if (!model.has_lora()) throw std::invalid_argument("finetune: the model has no LoRA adapters");
  if (optim == OptimKind::paged_adamw || optim == OptimKind::paged_adamw8bit)
    throw std::invalid_argument("--optim " + to_string(optim) + " pages optimizer state out of GPU memory: it needs --device cuda");
  AdamWConfig acfg;
  acfg.weight_decay = weight_decay;
  model.zero_grad();
  if (optim == OptimKind::adamw)
    opt_.reset(new Optim{std::variant<AdamW, AdamW8bit>(std::in_place_type<AdamW>, optim_params(model), acfg)});
  else
    opt_.reset(new Optim{std::variant<AdamW, AdamW8bit>(std::in_place_type<AdamW8bit>, optim_params(model), acfg)});
}

CpuTrainer::~CpuTrainer() = default;

float CpuTrainer::train_micro_batch(const int* x, const int* y, int B, int T, std::mt19937_64& dropout_rng,
                                   int first_sequence) {
  const float loss = model_.forward(x, y, B, T, true, dropout_rng, first_sequence);
  model_.backward();
  return loss;
}

float CpuTrainer::eval_batch(const int* x, const int* y, int B, int T) {
  std::mt19937_64 unused(0);  // no dropout in evaluation
  return model_.forward(x, y, B, T, false, unused);
}

void CpuTrainer::scale_grads(float s) {
  for (auto& [name, a] : model_.named_adapters()) {
    for (float& g : a->dA) g *= s;
    for (float& g : a->dB) g *= s;
  }
}

//! [cpu-reduce-grads]
// Every gradient goes into one buffer and through one MPI all-reduce: a collective per
// tensor would pay its latency a hundred times a step for kilobytes each.
void CpuTrainer::reduce_grads(Communicator& world) {
  if (world.size() == 1) return;
  flat_grads_.clear();
  for (auto& [name, a] : model_.named_adapters()) {
    flat_grads_.insert(flat_grads_.end(), a->dA.begin(), a->dA.end());
    flat_grads_.insert(flat_grads_.end(), a->dB.begin(), a->dB.end());
  }
  world.allreduce_sum(flat_grads_.data(), flat_grads_.size(), "the gradient all-reduce");
  auto from = flat_grads_.begin();
  for (auto& [name, a] : model_.named_adapters()) {
    for (auto* g : {&a->dA, &a->dB}) {
      std::copy(from, from + static_cast<std::ptrdiff_t>(g->size()), g->begin());
      from += static_cast<std::ptrdiff_t>(g->size());
    }
  }
}
//! [cpu-reduce-grads]

double CpuTrainer::clip_grad_norm(double max_norm) {
  return std::visit([&](auto& o) { return o.clip_grad_norm(max_norm); }, opt_->opt);
}
void CpuTrainer::optimizer_step(float lr) {
  std::visit([&](auto& o) { o.step(lr); }, opt_->opt);
}
std::int64_t CpuTrainer::optimizer_steps() const {
  return std::visit([](const auto& o) { return o.steps(); }, opt_->opt);
}
void CpuTrainer::save_optimizer(const fs::path& file) const {
  std::visit([&](const auto& o) { o.save_state(file); }, opt_->opt);
}
void CpuTrainer::load_optimizer(const fs::path& file) {
  std::visit([&](auto& o) { o.load_state(file); }, opt_->opt);
}
double CpuTrainer::peak_memory_mb() const { return peak_rss_mb(); }

namespace {

//! [check-replicas]
// The ranks never exchange adapters: each steps from the same summed gradient and so
// holds the same values, as long as the all-reduce gives every rank the same bits. NCCL's
// ring computes each sum once and passes it on; MPI only recommends it. So before rank 0
// saves them as everyone's, the ranks compare a hash of their adapters.
void check_replicas(Communicator& world, Trainer& tr, int step) {
  std::uint64_t h = content_hash(nullptr, 0);
  for (const auto& [name, m] : tr.adapter().modules) {
    h = content_hash(m.A.data(), m.A.size() * sizeof(float), h);
    h = content_hash(m.B.data(), m.B.size() * sizeof(float), h);
  }
  if (!same_on_every_rank(world, h, "the adapter comparison"))
    throw std::runtime_error("after step " + std::to_string(step) +
                             " the ranks hold different adapters: their gradient all-reduce did not give every rank "
                             "the same sum");
}
//! [check-replicas]

// Why a step's update must not happen, or empty.
std::string non_finite(const StepRecord& rec) {
  if (!std::isfinite(rec.loss)) return "non-finite loss";
  if (!std::isfinite(rec.grad_norm)) return "non-finite gradient norm";
  return {};
}

std::string number(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", v);
  return buf;
}

// The error that ends a diverged run: which step, what the adapters hold now, where to
// go back to, and what usually cures it.
std::string diverged_message(const FinetuneConfig& cfg, const StepRecord& rec, int bad_in_a_row,
                             const fs::path& last_good) {
  std::string m = "training diverged: step " + std::to_string(rec.step) + " had a " + rec.skipped + ", " +
                  std::to_string(bad_in_a_row) + (bad_in_a_row == 1 ? " non-finite step" : " non-finite steps") +
                  " in a row (--max-bad-steps " +
                  std::to_string(cfg.max_bad_steps) + "); each was skipped, so the adapters are as after step " +
                  std::to_string(rec.step - bad_in_a_row) + ". ";
  m += last_good.empty() ? std::string("No checkpoint was written before (--save-every). ")
                         : "Last good checkpoint: " + last_good.string() + " (--resume it). ";
  m += "Cures: a lower --lr (now " + number(cfg.lr) + "), gradient clipping with --clip (now " +
       (cfg.clip > 0 ? number(cfg.clip) : std::string("0: off")) + "), a longer --warmup (now " +
       std::to_string(cfg.warmup) + ")";
  return m;
}

}  // namespace

TrainingInterrupted::TrainingInterrupted(int sig, int at_step, fs::path dir)
    : std::runtime_error("training interrupted by " + signal_name(sig) + " after step " + std::to_string(at_step) +
                         (dir.empty() ? std::string(" (no --out: nothing saved)") : ", checkpoint " + dir.string())),
      signal(sig),
      step(at_step),
      checkpoint(std::move(dir)) {}

//! [loss-normalization]
double accumulate_gradients(Trainer& tr, const std::vector<MicroBatch>& micro, std::int64_t counted,
                            std::mt19937_64& dropout_rng) {
  // Micro-batch m weighs w_m = counted_m / counted. backward gives the gradient of each
  // micro-batch's mean, so the accumulated gradient is kept in units of the latest
  // micro-batch's weight (rescaled by w_prev / w_m before adding one) and multiplied by
  // the last weight at the end. With equal counts (text windows) no rescaling happens
  // and this is the plain average.
  double loss = 0, w_prev = 0;
  for (const MicroBatch& mb : micro) {
    if (mb.counted == 0) continue;  // no loss, no gradient
    const double w = static_cast<double>(mb.counted) / static_cast<double>(counted);
    if (w_prev > 0 && w != w_prev) tr.scale_grads(static_cast<float>(w_prev / w));
    loss += static_cast<double>(tr.train_micro_batch(mb.x.data(), mb.y.data(), mb.B, mb.T, dropout_rng, mb.first_row)) * w;
    w_prev = w;
  }
  if (w_prev > 0 && w_prev != 1.0) tr.scale_grads(static_cast<float>(w_prev));
  return loss;
}

double accumulate_gradients(Trainer& tr, const std::vector<MicroBatch>& micro, std::mt19937_64& dropout_rng) {
  std::int64_t counted = 0;
  for (const MicroBatch& mb : micro) counted += mb.counted;
  return accumulate_gradients(tr, micro, counted, dropout_rng);
}
//! [loss-normalization]

//! [training_loop]
std::vector<StepRecord> finetune(Trainer& tr, const FinetuneData& data, const FinetuneConfig& cfg) {
  if (cfg.batch < 1 || cfg.seq_len < 2 || cfg.grad_accum < 1 || cfg.steps < 0)
    throw std::invalid_argument("finetune: --batch, --grad-accum must be >= 1 and --seq-len >= 2");
  if (cfg.max_bad_steps < 1) throw std::invalid_argument("finetune: --max-bad-steps must be >= 1");
  SingleProcess alone;
  Communicator& world = cfg.world ? *cfg.world : alone;
  // Only rank 0 writes the log, the checkpoints and the progress line.
  const bool lead = world.rank() == 0;
  if (cfg.batch < world.size())
    throw std::invalid_argument("finetune: --batch " + std::to_string(cfg.batch) + " cannot give each of " +
                                std::to_string(world.size()) + " ranks a row");
  check_sequence_length(tr.config(), cfg.seq_len, "finetune: --seq-len " + std::to_string(cfg.seq_len));
  const auto T = static_cast<std::size_t>(cfg.seq_len);
  if (!data.instruct() && data.train.size() < T + 2)
    throw std::invalid_argument("training text is shorter than one --seq-len window");
  for (const auto& e : data.train_examples)
    if (e.ids.size() > T + 1)
      throw std::invalid_argument("the example of line " + std::to_string(e.line) + " has " +
                                  std::to_string(e.ids.size()) + " tokens, more than --seq-len " +
                                  std::to_string(cfg.seq_len) + " + 1");

  tr.zero_grad();
  // Two generators: one picks the data windows, one draws the dropout masks. Both are
  // saved in checkpoints, so a resumed run sees the same windows and masks.
  TrainerState state;
  state.data_rng.seed(cfg.seed);
  state.dropout_rng.seed(cfg.seed ^ 0x9E3779B97F4A7C15ull);
  // The newest checkpoint, and the newest written after a step that was not skipped:
  // where a diverged run is best resumed from.
  fs::path resumed_from, last_checkpoint, last_good;
  if (!cfg.resume.empty()) {
    resumed_from = resolve_resume(cfg.resume);
    state = load_checkpoint(resumed_from, tr);
    last_checkpoint = last_good = resumed_from;
  }
  const int start = state.step;
  int bad_in_a_row = 0;
  auto checkpoint = [&] {
    if (world.size() > 1) check_replicas(world, tr, state.step);
    last_checkpoint = checkpoint_dir(cfg.out, state.step);
    if (bad_in_a_row == 0) last_good = last_checkpoint;
    if (!lead) return;  // the other ranks only know where it is
    save_checkpoint(last_checkpoint, tr, state);
    prune_checkpoints(cfg.out, cfg.save_total_limit, {resumed_from, last_good});
  };

  std::ofstream log;
  if (!cfg.out.empty() && lead) {
    fs::create_directories(cfg.out);
    log.open(cfg.out / "log.jsonl", start > 0 ? std::ios::app : std::ios::trunc);
    if (!log) throw std::runtime_error("cannot write " + (cfg.out / "log.jsonl").string());
  }

  const std::size_t B = static_cast<std::size_t>(cfg.batch);
  // Text: batch windows at random offsets drawn from data_rng. Instruction data:
  // micro-batch k of the example schedule, k counted from the first step.
  std::optional<ExampleSchedule> schedule;
  if (data.instruct()) {
    std::vector<int> lengths;
    for (const auto& e : data.train_examples) lengths.push_back(static_cast<int>(e.ids.size()));
    schedule.emplace(std::move(lengths), cfg.batch, cfg.seed, cfg.group_by_length);
  }
  auto micro_batch = [&](int step, int micro) {
    if (schedule)
      return pad_batch(data.train_examples, schedule->batch(std::int64_t{step - 1} * cfg.grad_accum + micro), 0);
    const double max_start = static_cast<double>(data.train.size() - T - 1);
    MicroBatch mb;
    mb.B = cfg.batch;
    mb.T = cfg.seq_len;
    mb.counted = static_cast<std::int64_t>(B * T);
    mb.x.resize(B * T);
    mb.y.resize(B * T);
    for (std::size_t b = 0; b < B; ++b) {
      const auto off = static_cast<std::size_t>(uniform01(state.data_rng) * (max_start + 1.0));
      for (std::size_t t = 0; t < T; ++t) {
        mb.x[b * T + t] = data.train[off + t];
        mb.y[b * T + t] = data.train[off + t + 1];
      }
    }
    return mb;
  };
  std::vector<StepRecord> records;
  const BatchLoss eval = [&](const int* ex, const int* ey, int eb, int et) { return tr.eval_batch(ex, ey, eb, et); };
  const auto t_begin = std::chrono::steady_clock::now();
  for (int step = start + 1; step <= cfg.steps; ++step) {
    const auto t0 = std::chrono::steady_clock::now();
    tr.zero_grad();
    //! [data-parallel-step]
    // Every rank builds the whole step, so the data generator advances alike everywhere
    // and the global batch is one process's; each then trains on its rows only. The
    // weights count the step's targets on all ranks, so the summed gradients and losses
    // are the step's mean. Every row holds a counted target (instruction records without
    // one are skipped when loaded), so every rank runs every micro-batch and draws the
    // same dropout seeds.
    std::vector<MicroBatch> micro(static_cast<std::size_t>(cfg.grad_accum));
    std::int64_t positions = 0, counted = 0;
    for (int m = 0; m < cfg.grad_accum; ++m) {
      MicroBatch& mb = micro[static_cast<std::size_t>(m)];
      mb = micro_batch(step, m);
      positions += std::int64_t{mb.B} * mb.T;
      counted += mb.counted;
      if (world.size() > 1) mb = rank_slice(mb, world.rank(), world.size());
    }
    double loss = accumulate_gradients(tr, micro, counted, state.dropout_rng);
    tr.reduce_grads(world);
    world.allreduce_sum(&loss, 1, "the loss all-reduce");
    //! [data-parallel-step]
    StepRecord rec;
    rec.step = step;
    rec.loss = static_cast<float>(loss);
    // Measured even without clipping (an infinite bound scales nothing), so that a NaN
    // gradient behind a finite loss is caught too: one host sync per step on the GPU.
    rec.grad_norm = tr.clip_grad_norm(cfg.clip > 0 ? cfg.clip : std::numeric_limits<double>::infinity());
    rec.lr = learning_rate(cfg, step);
    //! [skip-non-finite]
    // One NaN reaching AdamW would stay in its moments and spread to every adapter for
    // good. So the update is skipped before it touches either, and the step's gradients
    // are zeroed, so that nothing of the bad step is left in the trainer.
    rec.skipped = non_finite(rec);
    if (rec.skipped.empty()) {
      tr.optimizer_step(rec.lr);
      bad_in_a_row = 0;
    } else {
      tr.zero_grad();
      ++state.skipped_steps;
      ++bad_in_a_row;
    }
    //! [skip-non-finite]
    state.step = step;
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    rec.positions = positions;
    rec.tokens_per_s = static_cast<double>(positions) / dt;
    rec.peak_mem_mb = tr.peak_memory_mb();
    if (lead && cfg.eval_every > 0 && (step % cfg.eval_every == 0 || step == cfg.steps))
      rec.val_loss = static_cast<float>(held_out_loss(eval, data, cfg.seq_len, cfg.batch, cfg.val_windows));
    if (log) {
      nlohmann::json j = {{"step", rec.step},           {"loss", rec.loss},
                          {"lr", rec.lr},               {"grad_norm", rec.grad_norm},
                          {"tokens_per_s", rec.tokens_per_s}, {"peak_mem_mb", rec.peak_mem_mb},
                          {"device", tr.device()}};
      if (rec.val_loss >= 0) j["val_loss"] = rec.val_loss;
      if (!rec.skipped.empty()) j["skipped"] = rec.skipped;  // its loss or norm is logged as null
      log << j.dump() << "\n" << std::flush;
    }
    const bool saved = cfg.save_every > 0 && !cfg.out.empty() && (step % cfg.save_every == 0 || step == cfg.steps);
    if (saved) checkpoint();
    if (cfg.progress && lead) {
      const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_begin).count();
      const double eta = elapsed / (step - start) * (cfg.steps - step);
      std::fprintf(stderr, "\rstep %d/%d  loss %.4f  lr %.2e  %.0f tok/s  mem %.0f MiB  ETA %.0fs   ", step, cfg.steps,
                   rec.loss, static_cast<double>(rec.lr), rec.tokens_per_s, rec.peak_mem_mb, eta);
      if (!rec.skipped.empty()) std::fprintf(stderr, "  skipped: %s\n", rec.skipped.c_str());
      if (rec.val_loss >= 0) std::fprintf(stderr, "  val %.4f\n", static_cast<double>(rec.val_loss));
      if (step == cfg.steps) std::fprintf(stderr, "\n");
    }
    records.push_back(rec);
    if (bad_in_a_row >= cfg.max_bad_steps) throw std::runtime_error(diverged_message(cfg, rec, bad_in_a_row, last_good));
    //! [stop-on-signal]
    // A signal only set a flag: the step above has finished, so this is a clean point to
    // save. The ranks agree on it, so that all stop after the same step, even when the
    // signal reached one of them only.
    const int stop = world.allreduce_max(cfg.stop ? cfg.stop->load() : 0, "the stop decision");
    if (stop != 0) {
      if (!cfg.out.empty() && !saved) checkpoint();
      if (cfg.progress && lead) std::fprintf(stderr, "\n");
      throw TrainingInterrupted(stop, step, cfg.out.empty() ? fs::path{} : last_checkpoint);
    }
    //! [stop-on-signal]
  }
  tr.sync_to_host();
  return records;
}
//! [training_loop]

std::vector<StepRecord> finetune(LlamaModel& model, const FinetuneData& data, const FinetuneConfig& cfg) {
  CpuTrainer tr(model, cfg.optim, cfg.weight_decay);
  return finetune(tr, data, cfg);
}

}  // namespace qlora
