// Chapter 7, "When things go wrong": a long run survives. A step with a non-finite loss
// or gradient norm is skipped without touching the adapters, the optimizer state or the
// next step's gradients, and too many in a row stop the run with a message that says
// what to do; SIGINT and SIGTERM stop it after a checkpoint from which --resume (of the
// checkpoint or of the output folder) continues bit for bit; --save-total-limit keeps
// the newest checkpoints and never the one resumed from. kjv15M on tinyshakespeare, on
// the CPU, in process and through real `qlora finetune` processes.
#include "checkpoint.hpp"
#include "file_helpers.hpp"
#include "finetune.hpp"
#include "finetune_helpers.hpp"

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <atomic>
#include <chrono>
#include <csignal>
#include <cstring>
#include <fstream>
#include <limits>
#include <thread>
#include <vector>

#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

using namespace qlora;
using test::fresh_model;
using test::same_bytes;
using test::TamperedTrainer;
namespace fs = std::filesystem;

namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// Every line of a finetune log.jsonl.
std::vector<nlohmann::json> log_lines(const fs::path& log) {
  std::ifstream in(log);
  std::vector<nlohmann::json> lines;
  for (std::string line; std::getline(in, line);) lines.push_back(nlohmann::json::parse(line));
  return lines;
}

// The same step of two runs: bit-identical loss and gradient norm.
void check_same_step(const StepRecord& a, const StepRecord& b) {
  INFO("step " << a.step);
  CHECK(a.step == b.step);
  CHECK(std::memcmp(&a.loss, &b.loss, sizeof a.loss) == 0);
  CHECK(a.grad_norm == b.grad_norm);
}

bool all_gradients_zero(LlamaModel& m) {
  for (auto& [name, a] : m.named_adapters())
    for (const auto* g : {&a->dA, &a->dB})
      for (float x : *g)
        if (x != 0.0f) return false;
  return true;
}

// Adapter and optimizer files of two checkpoints are byte for byte the same.
void check_same_checkpoint(const fs::path& a, const fs::path& b) {
  INFO(a.string() << " vs " << b.string());
  CHECK(same_bytes(a / "adapter_model.safetensors", b / "adapter_model.safetensors"));
  CHECK(same_bytes(a / "optimizer.safetensors", b / "optimizer.safetensors"));
}

// `qlora finetune` with these arguments, started in the background with stdout and
// stderr going to `output`.
pid_t spawn_finetune(const std::vector<std::string>& args, const fs::path& output) {
  const std::string bin = test::qlora_bin();
  std::vector<std::string> words = {bin, "finetune"};
  words.insert(words.end(), args.begin(), args.end());
  const pid_t pid = fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    const int fd = open(output.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) _exit(126);
    dup2(fd, 1);
    dup2(fd, 2);
    std::vector<char*> argv;
    for (auto& w : words) argv.push_back(w.data());
    argv.push_back(nullptr);
    execv(bin.c_str(), argv.data());
    _exit(127);
  }
  return pid;
}

// Waits until the run has logged its first step (so it is training, with the handlers
// installed), or fails after a minute.
void wait_for_first_step(const fs::path& log, pid_t pid) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::minutes(1);
  while (log_lines(log).empty()) {
    int status = 0;
    REQUIRE(waitpid(pid, &status, WNOHANG) == 0);  // still running
    REQUIRE(std::chrono::steady_clock::now() < deadline);
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
}

int exit_status(pid_t pid) {
  int status = 0;
  REQUIRE(waitpid(pid, &status, 0) == pid);
  REQUIRE(WIFEXITED(status));
  return WEXITSTATUS(status);
}

std::string text_of(const fs::path& file) {
  const auto bytes = test::read_bytes(file);
  return {bytes.begin(), bytes.end()};
}

}  // namespace

TEST_CASE("a step whose gradient norm is not finite is skipped and leaves nothing behind", "[ch07][long-runs]") {
  const auto* f = test::finetune_fixture();
  if (!f) return;
  auto cfg = test::tiny_finetune_config();
  cfg.steps = 3;
  cfg.save_every = 1;
  cfg.save_total_limit = 0;
  cfg.out = test::temp_path("test_ch07_long", "grad_nan");
  // The third backward leaves a NaN in one gradient; the loss stays finite.
  auto run = [&](LlamaModel& m, const FinetuneConfig& c) {
    CpuTrainer cpu(m, c.optim, c.weight_decay);
    TamperedTrainer tr(cpu, [&](int n, float loss) {
      if (n == 3) m.named_adapters().front().second->dA[0] = kNaN;
      return loss;
    });
    auto recs = finetune(tr, f->data, c);
    CHECK(cpu.optimizer_steps() == c.steps - 1);
    return recs;
  };
  auto m = fresh_model(*f, 1);
  const auto recs = run(m, cfg);
  REQUIRE(recs.size() == 3);
  CHECK(recs[1].skipped.empty());
  CHECK(recs[2].skipped == "non-finite gradient norm");
  CHECK(std::isfinite(recs[2].loss));
  // The skipped step changed neither the adapters nor the optimizer state, and its
  // gradients are gone (it was the last step: nothing else zeroed them).
  check_same_checkpoint(cfg.out / "checkpoint-2", cfg.out / "checkpoint-3");
  CHECK(all_gradients_zero(m));
  const auto lines = log_lines(cfg.out / "log.jsonl");
  REQUIRE(lines.size() == 3);
  CHECK(lines[2].at("skipped") == "non-finite gradient norm");
  CHECK(lines[2].at("grad_norm").is_null());  // JSON has no NaN
  CHECK_FALSE(lines[1].contains("skipped"));

  // The checkpoint counts the skipped step: a resumed run continues like an uninterrupted one.
  auto longer = cfg;
  longer.steps = 5;
  longer.out = test::temp_path("test_ch07_long", "grad_nan_full");
  auto m_full = fresh_model(*f, 1);
  const auto full = run(m_full, longer);
  auto resumed_cfg = longer;
  resumed_cfg.out = test::temp_path("test_ch07_long", "grad_nan_resumed");
  resumed_cfg.resume = cfg.out / "checkpoint-3";
  auto m_resumed = fresh_model(*f, 99);
  const auto resumed = finetune(m_resumed, f->data, resumed_cfg);
  REQUIRE(resumed.size() == 2);
  for (std::size_t i = 0; i < 2; ++i) check_same_step(resumed[i], full[i + 3]);

  // Without clipping the norm is still measured (an infinite bound scales nothing), so the
  // same NaN gradient behind a finite loss is caught the same way.
  auto noclip = cfg;
  noclip.clip = 0;
  noclip.out = test::temp_path("test_ch07_long", "grad_nan_noclip");
  auto m_noclip = fresh_model(*f, 1);
  const auto unclipped = run(m_noclip, noclip);
  REQUIRE(unclipped.size() == 3);
  CHECK(unclipped[0].grad_norm > 0.0);
  CHECK(unclipped[2].skipped == "non-finite gradient norm");
}

TEST_CASE("a learning rate of 1e8 without clipping: non-finite losses are skipped, the third in a row stops the run", "[ch07][long-runs]") {
  const auto* f = test::finetune_fixture();
  if (!f) return;
  auto cfg = test::tiny_finetune_config();
  cfg.steps = 10;
  cfg.lr = 1e8f;  // two updates throw the adapters so far that the third forward overflows
  cfg.warmup = 0;
  cfg.clip = 0;
  cfg.save_every = 1;
  cfg.save_total_limit = 1;  // the last good checkpoint is kept all the same
  cfg.out = test::temp_path("test_ch07_long", "diverged");
  auto m = fresh_model(*f, 1);
  CHECK_THROWS_WITH(finetune(m, f->data, cfg),
                    Catch::Contains("training diverged: step 5 had a non-finite loss") &&
                        Catch::Contains("3 non-finite steps in a row (--max-bad-steps 3)") &&
                        Catch::Contains("as after step 2") &&
                        Catch::Contains("Last good checkpoint: " + (cfg.out / "checkpoint-2").string()) &&
                        Catch::Contains("--lr (now 1e+08)") && Catch::Contains("--clip (now 0: off)"));
  const auto lines = log_lines(cfg.out / "log.jsonl");
  REQUIRE(lines.size() == 5);
  CHECK_FALSE(lines[1].contains("skipped"));
  for (std::size_t i = 2; i < 5; ++i) {
    INFO("step " << i + 1);
    CHECK(lines[i].at("skipped") == "non-finite loss");
  }
  // Three skipped steps left the adapters and the optimizer state as step 2 did.
  CHECK(complete_checkpoints(cfg.out) == std::vector<fs::path>{cfg.out / "checkpoint-5", cfg.out / "checkpoint-2"});
  check_same_checkpoint(cfg.out / "checkpoint-2", cfg.out / "checkpoint-5");

  // --max-bad-steps 1 stops at the first one; a larger one lets the run go on skipping.
  cfg.max_bad_steps = 1;
  auto m1 = fresh_model(*f, 1);
  CHECK_THROWS_WITH(finetune(m1, f->data, cfg), Catch::Contains("step 3 had a non-finite loss"));
  cfg.max_bad_steps = 0;
  auto m0 = fresh_model(*f, 1);
  CHECK_THROWS_WITH(finetune(m0, f->data, cfg), Catch::Contains("--max-bad-steps must be >= 1"));
}

TEST_CASE("a NaN loss from one micro-batch skips the step: the next steps train on", "[ch07][long-runs]") {
  const auto* f = test::finetune_fixture();
  if (!f) return;
  auto cfg = test::tiny_finetune_config();
  cfg.steps = 4;
  cfg.grad_accum = 2;  // one bad micro-batch spoils its whole step
  cfg.save_every = 1;
  cfg.save_total_limit = 0;
  cfg.out = test::temp_path("test_ch07_long", "loss_nan");
  auto m = fresh_model(*f, 1);
  CpuTrainer cpu(m, cfg.optim, cfg.weight_decay);
  TamperedTrainer tr(cpu, [](int n, float loss) { return n == 3 ? kNaN : loss; });  // step 2's first micro-batch
  const auto recs = finetune(tr, f->data, cfg);
  REQUIRE(recs.size() == 4);
  CHECK(recs[1].skipped == "non-finite loss");
  CHECK(recs[2].skipped.empty());
  CHECK(recs[3].skipped.empty());
  CHECK(cpu.optimizer_steps() == 3);
  check_same_checkpoint(cfg.out / "checkpoint-1", cfg.out / "checkpoint-2");
  CHECK_FALSE(same_bytes(cfg.out / "checkpoint-2" / "adapter_model.safetensors",
                         cfg.out / "checkpoint-3" / "adapter_model.safetensors"));
}

TEST_CASE("a stop request finishes the step, checkpoints it, and --resume of the output folder continues bit for bit",
          "[ch07][long-runs]") {
  const auto* f = test::finetune_fixture();
  if (!f) return;
  auto cfg = test::tiny_finetune_config();
  cfg.steps = 4;
  cfg.out = test::temp_path("test_ch07_long", "stopped");
  std::atomic<int> stop{0};
  cfg.stop = &stop;
  auto m = fresh_model(*f, 1);
  CpuTrainer cpu(m, cfg.optim, cfg.weight_decay);
  TamperedTrainer tr(cpu, [&](int n, float loss) {
    if (n == 2) stop = SIGTERM;  // arrives during step 2
    return loss;
  });
  bool interrupted = false;
  try {
    finetune(tr, f->data, cfg);
  } catch (const TrainingInterrupted& e) {
    interrupted = true;
    CHECK(e.signal == SIGTERM);
    CHECK(e.step == 2);
    CHECK(e.checkpoint == cfg.out / "checkpoint-2");
    CHECK(std::string(e.what()).find("SIGTERM after step 2") != std::string::npos);
  }
  REQUIRE(interrupted);
  CHECK(checkpoint_complete(cfg.out / "checkpoint-2"));
  CHECK(log_lines(cfg.out / "log.jsonl").size() == 2);

  auto full_cfg = cfg;
  full_cfg.stop = nullptr;
  full_cfg.out = test::temp_path("test_ch07_long", "not_stopped");
  auto m_full = fresh_model(*f, 1);
  const auto full = finetune(m_full, f->data, full_cfg);
  auto resumed_cfg = full_cfg;
  resumed_cfg.out = cfg.out;
  resumed_cfg.resume = cfg.out;  // the output folder: its newest complete checkpoint
  auto m_resumed = fresh_model(*f, 99);
  const auto resumed = finetune(m_resumed, f->data, resumed_cfg);
  REQUIRE(resumed.size() == 2);
  for (std::size_t i = 0; i < 2; ++i) check_same_step(resumed[i], full[i + 2]);
}

TEST_CASE("checkpoint retention: --save-total-limit keeps the newest, never the one resumed from", "[ch07][long-runs]") {
  const auto* f = test::finetune_fixture();
  if (!f) return;
  auto cfg = test::tiny_finetune_config();
  cfg.steps = 5;
  cfg.save_every = 1;
  cfg.save_total_limit = 2;
  cfg.out = test::temp_path("test_ch07_long", "limit");
  auto m = fresh_model(*f, 1);
  finetune(m, f->data, cfg);
  CHECK(complete_checkpoints(cfg.out) == std::vector<fs::path>{cfg.out / "checkpoint-5", cfg.out / "checkpoint-4"});
  CHECK_FALSE(fs::exists(cfg.out / "checkpoint-3"));

  // A folder cut short (a crash while writing) is neither resumed from nor pruned.
  fs::create_directories(cfg.out / "checkpoint-99");
  std::ofstream(cfg.out / "checkpoint-99" / "adapter_config.json") << "{}";
  CHECK(resolve_resume(cfg.out) == cfg.out / "checkpoint-5");

  auto resumed_cfg = cfg;
  resumed_cfg.steps = 8;
  resumed_cfg.resume = cfg.out / "checkpoint-4";
  auto m2 = fresh_model(*f, 1);
  finetune(m2, f->data, resumed_cfg);
  CHECK(complete_checkpoints(cfg.out) == std::vector<fs::path>{cfg.out / "checkpoint-8", cfg.out / "checkpoint-7",
                                                               cfg.out / "checkpoint-4"});
  CHECK(fs::exists(cfg.out / "checkpoint-99" / "adapter_config.json"));

  auto all_cfg = cfg;
  all_cfg.steps = 4;
  all_cfg.save_total_limit = 0;
  all_cfg.out = test::temp_path("test_ch07_long", "limit_none");
  auto m3 = fresh_model(*f, 1);
  finetune(m3, f->data, all_cfg);
  CHECK(complete_checkpoints(all_cfg.out).size() == 4);

  const auto empty = test::temp_path("test_ch07_long", "no_checkpoints");
  fs::create_directories(empty);
  CHECK_THROWS_WITH(resolve_resume(empty), Catch::Contains("--resume " + empty.string()) &&
                                               Catch::Contains("complete checkpoint-N"));
  CHECK_THROWS_WITH(resolve_resume(empty / "absent"), Catch::Contains("no such folder"));
}

TEST_CASE("qlora finetune on SIGINT checkpoints, prints the --resume command, and that command continues bit for bit",
          "[ch07][long-runs][cli]") {
  if (!test::finetune_fixture()) return;
  const std::vector<std::string> tiny = {"--steps",       "20", "--batch",      "2", "--seq-len",    "32",
                                         "--rank",        "4",  "--val-windows", "2", "--eval-every", "0",
                                         "--save-every",  "0",  "--sample-tokens", "1", "--dropout",  "0.1"};
  const auto out = test::temp_path("test_ch07_long", "cli_sigint");
  const auto output = test::temp_path("test_ch07_long", "cli_sigint.txt");
  auto args = tiny;
  args.insert(args.end(), {"--out", out.string()});
  const pid_t pid = spawn_finetune(args, output);
  wait_for_first_step(out / "log.jsonl", pid);
  REQUIRE(kill(pid, SIGINT) == 0);
  const int rc = exit_status(pid);
  const std::string text = text_of(output);
  INFO(text);
  REQUIRE(rc == 130);
  CHECK(text.find("training interrupted by SIGINT after step") != std::string::npos);
  const auto stopped = log_lines(out / "log.jsonl");
  REQUIRE(!stopped.empty());
  const int step = stopped.back().at("step").get<int>();
  REQUIRE(step < 20);
  CHECK(checkpoint_complete(out / ("checkpoint-" + std::to_string(step))));

  // The command it printed, run as printed.
  const std::string marker = "continue with:\n  ";
  const auto at = text.find(marker);
  REQUIRE(at != std::string::npos);
  const std::string command = text.substr(at + marker.size(), text.find('\n', at + marker.size()) - at - marker.size());
  CHECK(command.find("--resume " + (out / ("checkpoint-" + std::to_string(step))).string()) != std::string::npos);
  const auto [rc2, text2] = test::run_shell(command);
  INFO(text2);
  REQUIRE(rc2 == 0);

  const auto ref = test::temp_path("test_ch07_long", "cli_uninterrupted");
  std::string ref_args;
  for (const auto& w : tiny) ref_args += " " + w;
  const auto [rc3, text3] = test::run_qlora("finetune" + ref_args + " --out '" + ref.string() + "'");
  INFO(text3);
  REQUIRE(rc3 == 0);
  const auto a = log_lines(out / "log.jsonl"), b = log_lines(ref / "log.jsonl");
  REQUIRE(a.size() == 20);
  REQUIRE(b.size() == 20);
  for (std::size_t i = 0; i < a.size(); ++i) {
    INFO("step " << i + 1);
    CHECK(a[i].at("step") == b[i].at("step"));
    CHECK(a[i].at("loss").get<double>() == b[i].at("loss").get<double>());  // nlohmann's doubles parse back exactly
    CHECK(a[i].at("grad_norm").get<double>() == b[i].at("grad_norm").get<double>());
  }
  CHECK(same_bytes(out / "adapter" / "adapter_model.safetensors", ref / "adapter" / "adapter_model.safetensors"));
}

TEST_CASE("a second signal ends qlora finetune at once, without a checkpoint", "[ch07][long-runs][cli]") {
  if (!test::finetune_fixture()) return;
  const auto out = test::temp_path("test_ch07_long", "cli_twice");
  const auto output = test::temp_path("test_ch07_long", "cli_twice.txt");
  const pid_t pid = spawn_finetune({"--steps", "50", "--batch", "2", "--seq-len", "32", "--rank", "4", "--val-windows",
                                    "2", "--eval-every", "0", "--save-every", "0", "--sample-tokens", "1", "--out",
                                    out.string()},
                                   output);
  wait_for_first_step(out / "log.jsonl", pid);
  // Two different signals: two of the same kind may merge into one while pending.
  REQUIRE(kill(pid, SIGINT) == 0);
  REQUIRE(kill(pid, SIGTERM) == 0);
  const int rc = exit_status(pid);
  const std::string text = text_of(output);
  INFO(text);
  CHECK((rc == 130 || rc == 143));
  CHECK(text.find("continue with") == std::string::npos);
  CHECK(complete_checkpoints(out).empty());
}

TEST_CASE("qlora finetune --lr 1e8 --clip 0 logs skipped steps and stops with the cures", "[ch07][long-runs][cli]") {
  if (!test::finetune_fixture()) return;
  const auto out = test::temp_path("test_ch07_long", "cli_diverged");
  const auto [rc, text] = test::run_qlora(
      "finetune --lr 1e8 --clip 0 --warmup 0 --steps 10 --batch 2 --seq-len 32 --rank 4 --val-windows 2"
      " --eval-every 0 --save-every 0 --sample-tokens 1 --max-bad-steps 2 --out '" + out.string() + "'");
  INFO(text);
  CHECK(rc == 1);
  CHECK(text.find("qlora: error: training diverged: step 4 had a non-finite loss, 2 non-finite steps in a row "
                  "(--max-bad-steps 2)") != std::string::npos);
  CHECK(text.find("No checkpoint was written before") != std::string::npos);
  CHECK(text.find("skipped: non-finite loss") != std::string::npos);  // the progress line
  const auto lines = log_lines(out / "log.jsonl");
  REQUIRE(lines.size() == 4);
  CHECK_FALSE(lines[1].contains("skipped"));
  CHECK(lines[3].at("skipped") == "non-finite loss");

  const auto [rc_bad, bad_text] = test::run_qlora("finetune --max-bad-steps 0 --out '" + out.string() + "'");
  CHECK(rc_bad != 0);
  CHECK(bad_text.find("--max-bad-steps") != std::string::npos);
  const auto [rc_lim, lim_text] = test::run_qlora("finetune --save-total-limit -1 --out '" + out.string() + "'");
  CHECK(rc_lim != 0);
  CHECK(lim_text.find("--save-total-limit") != std::string::npos);
}
