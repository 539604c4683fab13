// Chapter 9: data-parallel fine-tuning on the CPU. In one process: a rank's rows of a
// batch, with the dropout masks of those rows, give its share of the batch's loss and
// gradient. Under mpirun (Open MPI, two ranks on this machine's cores): two ranks give one
// process's loss curve and adapter format, checkpoints resume with the other rank count, a
// signal to one rank stops both after the same step, ranks with different flags are
// refused by name, an error or a hang on one rank ends the job naming the rank.
#include "counter_hash.hpp"
#include "data_parallel.hpp"
#include "file_helpers.hpp"
#include "finetune.hpp"
#include "finetune_helpers.hpp"
#include "lora.hpp"
#include "lora_helpers.hpp"
#include "memory_plan.hpp"
#include "safetensors.hpp"

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdint>
#include <fstream>
#include <map>
#include <string>
#include <thread>
#include <vector>

using namespace qlora;
namespace fs = std::filesystem;

TEST_CASE("rank_rows: contiguous blocks, the first ranks one row longer, and a slice recounts its targets", "[ch09][dp]") {
  CHECK(rank_rows(5, 0, 2) == std::pair{0, 3});
  CHECK(rank_rows(5, 1, 2) == std::pair{3, 5});
  CHECK(rank_rows(8, 3, 4) == std::pair{6, 8});
  CHECK_THROWS(rank_rows(4, 2, 2));
  MicroBatch mb;
  mb.B = 3;
  mb.T = 2;
  mb.x = {1, 2, 3, 4, 5, 6};
  mb.y = {2, kIgnoreIndex, 4, 5, kIgnoreIndex, kIgnoreIndex};
  mb.counted = 3;
  const MicroBatch s = rank_slice(mb, 1, 2);
  CHECK(s.B == 1);
  CHECK(s.first_row == 2);
  CHECK(s.x == std::vector<int>{5, 6});
  CHECK(s.counted == 0);
  CHECK(rank_slice(mb, 0, 2).counted == 3);
}

TEST_CASE("counter_skip: a mask made from the skipped seed is the later part of the whole mask", "[ch09][dp]") {
  const std::uint64_t seed = 0x1234567887654321ull;
  const auto whole = lora_dropout_mask_hashed(1000, 0.3f, seed);
  const auto tail = lora_dropout_mask_hashed(400, 0.3f, counter_skip(seed, 600));
  CHECK(std::equal(tail.begin(), tail.end(), whole.begin() + 600));
  CHECK_FALSE(std::equal(tail.begin(), tail.end(), whole.begin()));
}

namespace {

// The gradients of every adapter, flattened, after accumulate_gradients over `micro`.
std::vector<float> step_grads(LlamaModel& m, const std::vector<MicroBatch>& micro, std::int64_t counted,
                              std::uint64_t dropout_seed, double& loss) {
  CpuTrainer tr(m, OptimKind::adamw, 0.0f);
  std::mt19937_64 rng(dropout_seed);
  loss = accumulate_gradients(tr, micro, counted, rng);
  return test::host_grads(m);
}

}  // namespace

//! [rank-share-test]
TEST_CASE("Two ranks' shares of a step, with dropout, add up to the step of one process", "[ch09][dp]") {
  const test::FinetuneFixture* f = test::finetune_fixture();
  if (!f) return;
  // A global micro-batch of 4 windows, twice (gradient accumulation), dropout 0.05 on.
  std::vector<MicroBatch> global(2);
  std::int64_t counted = 0;
  for (std::size_t m = 0; m < global.size(); ++m) {
    MicroBatch& mb = global[m];
    mb.B = 4;
    mb.T = 32;
    for (int b = 0; b < mb.B; ++b)
      for (int t = 0; t < mb.T; ++t) {
        const std::size_t at = 1000 * (m * 4 + static_cast<std::size_t>(b)) + static_cast<std::size_t>(t);
        mb.x.push_back(f->data.train[at]);
        mb.y.push_back(f->data.train[at + 1]);
      }
    mb.counted = mb.B * mb.T;
    counted += mb.counted;
  }
  LlamaModel one = test::fresh_model(*f, 3), r0 = test::fresh_model(*f, 3), r1 = test::fresh_model(*f, 3);
  double loss_one = 0, loss_r0 = 0, loss_r1 = 0;
  const auto g_one = step_grads(one, global, counted, 11, loss_one);
  std::vector<MicroBatch> share0, share1;
  for (const MicroBatch& mb : global) {
    share0.push_back(rank_slice(mb, 0, 2));
    share1.push_back(rank_slice(mb, 1, 2));
  }
  const auto g_r0 = step_grads(r0, share0, counted, 11, loss_r0);
  const auto g_r1 = step_grads(r1, share1, counted, 11, loss_r1);
  auto g_sum = g_r0;
  for (std::size_t i = 0; i < g_sum.size(); ++i) g_sum[i] += g_r1[i];
  // Only the order of float32 sums differs (over 64 rows instead of 128).
  CHECK(loss_r0 + loss_r1 == Approx(loss_one).epsilon(1e-6));
  CHECK(test::rel_frobenius(g_sum, g_one) < 1e-5);
  // Without the row offset, rank 1 would drop the elements of rank 0's rows: a different step.
  for (MicroBatch& mb : share1) mb.first_row = 0;
  LlamaModel wrong = test::fresh_model(*f, 3);
  double loss_wrong = 0;
  const auto g_w1 = step_grads(wrong, share1, counted, 11, loss_wrong);
  auto g_wrong = g_r0;
  for (std::size_t i = 0; i < g_wrong.size(); ++i) g_wrong[i] += g_w1[i];
  CHECK(test::rel_frobenius(g_wrong, g_one) > 1e-3);
}
//! [rank-share-test]

//! [allreduce-bytes]
TEST_CASE("What a data-parallel step all-reduces: the float32 LoRA gradients, 640 MB for 7B at r 64", "[ch09][dp]") {
  // r·(in + out) per projection, all seven projections of all 32 layers (memory_plan.hpp).
  const std::int64_t params = lora_param_count(llama_shape("7B"), 64);
  CHECK(params == 159907840);
  CHECK(params * static_cast<std::int64_t>(sizeof(float)) == 639631360);
  CHECK(lora_param_count(llama_shape("7B"), 16) * 4 == 159907840);
  CHECK(lora_param_count(llama_shape("65B"), 64) * 4 == 3198156800);
}
//! [allreduce-bytes]

TEST_CASE("A run identity passes in a world of one, and a fingerprint sees one byte changed", "[ch09][dp]") {
  SingleProcess alone;
  RunIdentity id;
  id.add("--lr", "0.001");
  CHECK_NOTHROW(check_same_run(alone, id));
  const auto model = test::model_or_fail("kjv15M.bin");
  if (!model) return;
  const std::string fp = file_fingerprint(*model);
  CHECK(fp.rfind(std::to_string(fs::file_size(*model)) + ":", 0) == 0);
  CHECK(file_fingerprint(*model) == fp);
  // One byte changed at the end of a copy changes the fingerprint.
  const auto copy = test::temp_path("test_ch09_dp", "copy.bin");
  auto bytes = test::read_bytes(*model);
  bytes.back() ^= 1;
  test::write_bytes(copy, bytes);
  CHECK(file_fingerprint(copy) != fp);
}

#ifdef QLORA_HAVE_MPI
namespace {

// `mpirun -np N qlora ARGS` as one shell word list (the same launcher line --nproc uses).
std::string mpirun(int np, const std::string& args) {
  INFO("mpirun (" << QLORA_MPIEXEC << ") is missing: this build was configured with MPI (scripts/setup.sh installs it)");
  REQUIRE(fs::exists(QLORA_MPIEXEC));
  std::string cmd;
  for (const std::string& w : mpirun_command(np, test::qlora_bin(), {})) cmd.append("'").append(w).append("' ");
  return cmd + args;
}

struct Logged {
  double loss, grad_norm;
};

std::map<int, Logged> logged(const fs::path& log) {
  std::ifstream in(log);
  INFO(log);
  REQUIRE(in);
  std::map<int, Logged> steps;
  for (std::string line; std::getline(in, line);) {
    const auto j = nlohmann::json::parse(line);
    steps[j.at("step").get<int>()] = {j.at("loss").get<double>(), j.at("grad_norm").get<double>()};
  }
  return steps;
}

//! [curve-tolerance]
// Two ranks sum their shares of every float32 reduction (the loss over a batch's targets,
// each gradient over its rows) in another order than one process: each step's loss and
// gradient differ by a few float32 roundings, relative 1e-7 to 1e-6 (the test above).
// AdamW divides by the root of the second moment, which keeps relative differences of the
// gradients relative differences of the update, so over a few steps they stay far below
// 1e-4: the tolerance, relative, of the loss and the gradient norm of every step.
constexpr double kCurveTolerance = 1e-4;
//! [curve-tolerance]

void same_curve(const std::map<int, Logged>& a, const std::map<int, Logged>& b) {
  for (const auto& [step, v] : b) {
    INFO("step " << step);
    REQUIRE(a.count(step) == 1);
    CHECK(v.loss == Approx(a.at(step).loss).epsilon(kCurveTolerance));
    CHECK(v.grad_norm == Approx(a.at(step).grad_norm).epsilon(kCurveTolerance));
  }
}

// The safetensors header (its length and JSON: names, dtypes, shapes, offsets).
std::vector<std::uint8_t> header_bytes(const fs::path& file) {
  const auto bytes = test::read_bytes(file);
  REQUIRE(bytes.size() >= 8);
  std::uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = n << 8 | bytes[static_cast<std::size_t>(i)];
  REQUIRE(bytes.size() >= 8 + n);
  return {bytes.begin(), bytes.begin() + static_cast<std::ptrdiff_t>(8 + n)};
}

// Dropout on, two micro-batches a step, a checkpoint at step 3.
const std::string kTiny = " --steps 6 --batch 4 --grad-accum 2 --seq-len 32 --rank 4 --val-windows 2 --eval-every 0"
                          " --save-every 3 --sample-tokens 1 --dropout 0.05";

}  // namespace

TEST_CASE("mpirun -np 2 trains the loss curve of one process, and writes the same adapter format", "[ch09][dp][mpi]") {
  if (!test::finetune_fixture()) return;
  const auto one = test::temp_path("test_ch09_dp", "one");
  const auto two = test::temp_path("test_ch09_dp", "two");
  const auto [rc1, text1] = test::run_qlora("finetune" + kTiny + " --out '" + one.string() + "'");
  INFO(text1);
  REQUIRE(rc1 == 0);
  const auto [rc2, text2] = test::run_shell(mpirun(2, "finetune" + kTiny + " --out '" + two.string() + "'"));
  INFO(text2);
  REQUIRE(rc2 == 0);
  CHECK(text2.find("2 data-parallel ranks") != std::string::npos);
  // Only rank 0 prints and writes: one summary line, one log of six steps.
  CHECK(text2.find("after: validation loss") == text2.rfind("after: validation loss"));
  const auto a = logged(one / "log.jsonl"), b = logged(two / "log.jsonl");
  REQUIRE(a.size() == 6);
  REQUIRE(b.size() == 6);
  same_curve(a, b);
  for (const char* f : {"adapter_model.safetensors", "optimizer.safetensors"})
    CHECK(header_bytes(one / "checkpoint-3" / f) == header_bytes(two / "checkpoint-3" / f));
  CHECK(header_bytes(one / "adapter" / "adapter_model.safetensors") ==
        header_bytes(two / "adapter" / "adapter_model.safetensors"));
  CHECK(test::read_bytes(one / "adapter" / "adapter_config.json") == test::read_bytes(two / "adapter" / "adapter_config.json"));
  const auto w1 = read_safetensors(one / "adapter" / "adapter_model.safetensors");
  const auto w2 = read_safetensors(two / "adapter" / "adapter_model.safetensors");
  for (const auto& [name, t] : w1.tensors) {
    INFO(name);
    CHECK(test::rel_frobenius(w2.tensors.at(name).to_f32(), t.to_f32()) < kCurveTolerance);
  }
}

TEST_CASE("Instruction data on 3 ranks, 5 padded rows a micro-batch, trains one process's loss curve", "[ch09][dp][mpi]") {
  if (!test::finetune_fixture()) return;
  // Alpaca records of varied lengths: batches padded to their longest, split 2, 2 and 1 rows.
  const auto data = test::temp_path("test_ch09_dp", "records.jsonl");
  {
    std::ofstream f(data);
    std::mt19937_64 rng(3);
    const std::vector<std::string> words = {"the", "lord", "said", "unto", "moses", "and", "speak", "to", "israel"};
    auto phrase = [&](int most) {
      std::string p;
      for (int n = 1 + static_cast<int>(rng() % static_cast<std::uint64_t>(most)); n > 0; --n)
        p.append(p.empty() ? "" : " ").append(words[rng() % words.size()]);
      return p;
    };
    for (int i = 0; i < 200; ++i)
      f << nlohmann::json{{"instruction", "Repeat: " + phrase(8)}, {"input", ""}, {"output", phrase(12)}}.dump() << "\n";
  }
  const std::string args = "finetune --data '" + data.string() + "' --steps 4 --batch 5 --grad-accum 2 --seq-len 64"
                           " --rank 4 --val-windows 4 --eval-every 0 --save-every 0 --sample-tokens 1";
  const auto one = test::temp_path("test_ch09_dp", "instruct_one");
  const auto three = test::temp_path("test_ch09_dp", "instruct_three");
  const auto [rc1, text1] = test::run_qlora(args + " --out '" + one.string() + "'");
  INFO(text1);
  REQUIRE(rc1 == 0);
  const auto [rc3, text3] = test::run_shell(mpirun(3, args + " --out '" + three.string() + "'"));
  INFO(text3);
  REQUIRE(rc3 == 0);
  const auto a = logged(one / "log.jsonl"), b = logged(three / "log.jsonl");
  REQUIRE(a.size() == 4);
  REQUIRE(b.size() == 4);
  same_curve(a, b);
}

TEST_CASE("A checkpoint of 2 ranks resumes with 1, and one of 1 rank with 2 (--nproc)", "[ch09][dp][mpi]") {
  if (!test::finetune_fixture()) return;
  const auto one = test::temp_path("test_ch09_dp", "resume_one");
  const auto two = test::temp_path("test_ch09_dp", "resume_two");
  const auto two_to_one = test::temp_path("test_ch09_dp", "resume_2to1");
  const auto one_to_two = test::temp_path("test_ch09_dp", "resume_1to2");
  const auto [rc1, text1] = test::run_qlora("finetune" + kTiny + " --out '" + one.string() + "'");
  INFO(text1);
  REQUIRE(rc1 == 0);
  const auto [rc2, text2] = test::run_shell(mpirun(2, "finetune" + kTiny + " --out '" + two.string() + "'"));
  INFO(text2);
  REQUIRE(rc2 == 0);
  const auto [rc3, text3] = test::run_qlora("finetune" + kTiny + " --out '" + two_to_one.string() + "' --resume '" +
                                            (two / "checkpoint-3").string() + "'");
  INFO(text3);
  REQUIRE(rc3 == 0);
  const auto [rc4, text4] = test::run_qlora("finetune" + kTiny + " --nproc 2 --out '" + one_to_two.string() +
                                            "' --resume '" + (one / "checkpoint-3").string() + "'");
  INFO(text4);
  REQUIRE(rc4 == 0);
  CHECK(text4.find("2 data-parallel ranks") != std::string::npos);
  const auto uninterrupted = logged(one / "log.jsonl");
  const auto resumed_by_one = logged(two_to_one / "log.jsonl"), resumed_by_two = logged(one_to_two / "log.jsonl");
  REQUIRE(resumed_by_one.size() == 3);
  REQUIRE(resumed_by_two.size() == 3);
  same_curve(uninterrupted, resumed_by_one);
  same_curve(uninterrupted, resumed_by_two);
}

// The pids of a process's children (Linux's /proc/PID/task/PID/children).
std::vector<int> children(int pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/task/" + std::to_string(pid) + "/children");
  std::vector<int> pids;
  for (int c; in >> c;) pids.push_back(c);
  return pids;
}

std::string text_of(const fs::path& file) {
  const auto bytes = test::read_bytes(file);
  return {bytes.begin(), bytes.end()};
}

TEST_CASE("SIGTERM to one rank stops both after the same step, with one checkpoint", "[ch09][dp][mpi]") {
  if (!test::finetune_fixture()) return;
  const auto out = test::temp_path("test_ch09_dp", "signal");
  fs::remove_all(out);
  const auto pid_file = test::temp_path("test_ch09_dp", "signal.pid");
  const auto done = test::temp_path("test_ch09_dp", "signal.out");
  // mpirun in a background shell that appends mpirun's exit status to its output; the
  // shell's pid, to find mpirun and the ranks (its children) by.
  const std::string args = "finetune --steps 400 --batch 2 --seq-len 32 --rank 4 --eval-every 0 --save-every 0"
                           " --sample-tokens 1 --out '" + out.string() + "'";
  std::string background = "(";  // append: GCC 12 misfires -Wrestrict on operator+
  background.append(mpirun(2, args)).append(" > '").append(done.string()).append("' 2>&1; echo \"mpirun status $?\" >> '");
  background.append(done.string()).append("') > /dev/null 2>&1 & echo $! > '").append(pid_file.string()).append("'");
  REQUIRE(std::system(background.c_str()) == 0);
  // Wait for a logged step (both ranks are training), then signal the second rank only.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
  while (!(fs::exists(out / "log.jsonl") && fs::file_size(out / "log.jsonl") > 0)) {
    REQUIRE(std::chrono::steady_clock::now() < deadline);
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  int shell_pid = 0;
  std::ifstream(pid_file) >> shell_pid;
  const auto launcher = children(shell_pid);
  REQUIRE(launcher.size() == 1);
  const auto ranks = children(launcher[0]);
  REQUIRE(ranks.size() == 2);
  REQUIRE(kill(ranks[1], SIGTERM) == 0);
  while (text_of(done).find("mpirun status ") == std::string::npos) {
    REQUIRE(std::chrono::steady_clock::now() < deadline);
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  const std::string text = text_of(done);
  INFO(text);
  const auto steps = logged(out / "log.jsonl");
  REQUIRE(!steps.empty());
  const int last = steps.rbegin()->first;
  CHECK(last < 400);
  CHECK(text.find("training interrupted by SIGTERM after step " + std::to_string(last)) != std::string::npos);
  CHECK(text.find("--nproc 2 --resume") != std::string::npos);
  CHECK(fs::exists(out / ("checkpoint-" + std::to_string(last)) / "trainer_state.json"));
  CHECK(text.find("mpirun status 143") != std::string::npos);  // mpirun passes on the ranks' status for SIGTERM
}

TEST_CASE("Ranks with different flags or models are refused, naming the flag and the ranks", "[ch09][dp][mpi]") {
  if (!test::finetune_fixture()) return;
  const auto out = test::temp_path("test_ch09_dp", "mismatch");
  const std::string common = "finetune --steps 2 --batch 2 --seq-len 32 --rank 4 --out '" + out.string() + "'";
  const std::string second = " : -np 1 '" + test::qlora_bin() + "' " + common;
  const auto [rc, text] = test::run_shell(mpirun(1, common + " --lr 1e-3") + second + " --lr 2e-3");
  INFO(text);
  CHECK(rc != 0);
  CHECK(text.find("disagree on --lr: 0.001 on rank 0, 0.002 on rank 1") != std::string::npos);
  // The same value written two ways is the same value.
  const auto [rc_same, text_same] = test::run_shell(mpirun(1, common + " --lr 1e-3") + second + " --lr 0.001");
  INFO(text_same);
  CHECK(rc_same == 0);
  const auto copy = test::temp_path("test_ch09_dp", "kjv15M-copy.bin");
  auto bytes = test::read_bytes(*find_model("kjv15M.bin"));
  bytes.back() ^= 1;  // a model file that differs in its last byte
  test::write_bytes(copy, bytes);
  const auto [rc_m, text_m] = test::run_shell(mpirun(1, common) + second + " --model '" + copy.string() + "'" +
                                              " --tokenizer '" + find_tokenizer_for(*find_model("kjv15M.bin")).string() + "'");
  INFO(text_m);
  CHECK(rc_m != 0);
  CHECK(text_m.find("disagree on --model: kjv15M.bin") != std::string::npos);
  CHECK(text_m.find("on rank 1") != std::string::npos);
}

TEST_CASE("An error on one rank ends the job at once, naming the rank", "[ch09][dp][mpi]") {
  if (!test::finetune_fixture()) return;
  const auto out = test::temp_path("test_ch09_dp", "error");
  const std::string common = "finetune --steps 2 --batch 2 --seq-len 32 --rank 4 --collective-timeout 100 --out '" +
                             out.string() + "'";
  const auto t0 = std::chrono::steady_clock::now();
  const auto [rc, text] = test::run_shell(mpirun(1, common) + " : -np 1 '" + test::qlora_bin() + "' " + common +
                                          " --data no-such-file.txt");
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  INFO(text);
  CHECK(rc != 0);
  CHECK(text.find("error on rank 1 of 2") != std::string::npos);
  CHECK(text.find("no-such-file.txt") != std::string::npos);
  CHECK(seconds < 60);  // not rank 0's collective timeout
}

TEST_CASE("A rank that waits in a collective longer than --collective-timeout aborts the job, naming it",
          "[ch09][dp][mpi]") {
  if (!test::finetune_fixture()) return;
  // Rank 0 measures the held-out loss of every window before training (seconds on the
  // CPU) while rank 1 goes straight to the first gradient all-reduce: with a 1-second
  // deadline there, rank 1 gives up. (The deadline is not part of the identity check.)
  const auto out = test::temp_path("test_ch09_dp", "timeout");
  const std::string common = "finetune --steps 2 --batch 8 --seq-len 64 --rank 4 --val-windows 0 --out '" +
                             out.string() + "'";
  const auto [rc, text] = test::run_shell(mpirun(1, common) + " : -np 1 '" + test::qlora_bin() + "' " + common +
                                          " --collective-timeout 1");
  INFO(text);
  CHECK(rc != 0);
  CHECK(text.find("error on rank 1 of 2: the gradient all-reduce did not complete in 1 s (--collective-timeout)") !=
        std::string::npos);
  CHECK(text.find("after: validation loss") == std::string::npos);
}
#endif
