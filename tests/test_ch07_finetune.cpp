// Chapter 7: a short CPU fine-tune of kjv15M (NF4 + double quant) on tinyshakespeare:
// validation loss drops by a stated margin, --resume reproduces the loss curve bit for
// bit (in one process, and through the CLI in a new one), and the trained adapter
// round-trips through a PEFT folder with identical logits.
// Also the sampler of `qlora generate`: greedy is argmax, top-p keeps the nucleus.
#include "file_helpers.hpp"
#include "finetune.hpp"
#include "finetune_helpers.hpp"
#include "generate.hpp"

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>

using namespace qlora;
namespace fs = std::filesystem;

using Fixture = test::FinetuneFixture;
using test::fresh_model;

TEST_CASE("data: BOS first, last 10% held out contiguously", "[ch07][finetune]") {
  const Fixture* f = test::finetune_fixture();
  if (!f) return;
  REQUIRE(f->data.train.front() == 1);
  const double n = static_cast<double>(f->data.train.size() + f->data.val.size());
  CHECK(static_cast<double>(f->data.val.size()) == Approx(0.1 * n).margin(1.0));
}

TEST_CASE("learning rate: linear warmup then constant", "[ch07][finetune]") {
  FinetuneConfig c;
  c.lr = 1e-3f;
  c.warmup = 4;
  CHECK(learning_rate(c, 1) == Approx(2.5e-4));
  CHECK(learning_rate(c, 4) == Approx(1e-3));
  CHECK(learning_rate(c, 100) == Approx(1e-3));
}

TEST_CASE("fine-tuning kjv15M on Shakespeare lowers validation loss", "[ch07][finetune]") {
  const Fixture* f = test::finetune_fixture();
  if (!f) return;
  auto cfg = test::tiny_finetune_config();
  auto model = fresh_model(*f, 1);
  const double before = validation_loss(model, f->data.val, cfg.seq_len, cfg.batch, cfg.val_windows);
  auto recs = finetune(model, f->data, cfg);
  REQUIRE(recs.size() == 30);
  const double after = validation_loss(model, f->data.val, cfg.seq_len, cfg.batch, cfg.val_windows);
  INFO("validation loss " << before << " -> " << after);
  // Stated margin: 30 tiny steps must take at least 0.5 nats/token off the biblical base.
  CHECK(after < before - 0.5);
}

TEST_CASE("resume from a checkpoint reproduces the loss curve exactly", "[ch07][finetune]") {
  const Fixture* f = test::finetune_fixture();
  if (!f) return;
  auto cfg = test::tiny_finetune_config();
  cfg.steps = 10;
  cfg.save_every = 5;
  cfg.out = test::temp_path("test_ch07_ft", "full");
  auto m1 = fresh_model(*f, 1);
  const auto full = finetune(m1, f->data, cfg);
  REQUIRE(full.size() == 10);
  REQUIRE(fs::exists(cfg.out / "checkpoint-5" / "trainer_state.json"));

  auto m2 = fresh_model(*f, 99);  // a different init: everything must come from the checkpoint
  auto rcfg = cfg;
  rcfg.out = test::temp_path("test_ch07_ft", "resumed");
  rcfg.resume = cfg.out / "checkpoint-5";
  const auto resumed = finetune(m2, f->data, rcfg);
  REQUIRE(resumed.size() == 5);
  for (std::size_t i = 0; i < 5; ++i) {
    INFO("step " << resumed[i].step);
    CHECK(resumed[i].step == full[i + 5].step);
    CHECK(std::memcmp(&resumed[i].loss, &full[i + 5].loss, sizeof(float)) == 0);
    CHECK(resumed[i].grad_norm == full[i + 5].grad_norm);
  }
  // The final adapters agree too.
  const auto a1 = adapter_to_peft(m1), a2 = adapter_to_peft(m2);
  for (const auto& [name, ad] : a1.modules) {
    CHECK(ad.A == a2.modules.at(name).A);
    CHECK(ad.B == a2.modules.at(name).B);
  }
}

TEST_CASE("a trained adapter round-trips through a PEFT folder", "[ch07][finetune]") {
  const Fixture* f = test::finetune_fixture();
  if (!f) return;
  auto cfg = test::tiny_finetune_config();
  cfg.steps = 3;
  auto trained = fresh_model(*f, 1);
  finetune(trained, f->data, cfg);
  const auto dir = test::temp_path("test_ch07_ft", "adapter");
  write_peft_adapter(dir, adapter_to_peft(trained));

  LlamaModel loaded(f->weights, BaseStorage::nf4_dq);
  adapter_from_peft(loaded, read_peft_adapter(dir));
  REQUIRE(loaded.lora_setup().config.r == 4);
  const std::vector<int> toks(f->data.val.begin(), f->data.val.begin() + 16);
  std::mt19937_64 rng(0);
  trained.forward(toks.data(), nullptr, 1, 16, false, rng);
  loaded.forward(toks.data(), nullptr, 1, 16, false, rng);
  // Same values, same arithmetic: the logits are bit-identical, and B is non-zero after training.
  CHECK(trained.logits() == loaded.logits());
  bool nonzero = false;
  for (auto& [name, a] : trained.named_adapters())
    for (float b : a->B) nonzero = nonzero || b != 0.0f;
  CHECK(nonzero);
}

TEST_CASE("sample_token: greedy is argmax, top-p keeps the nucleus, temperature 1 samples softmax",
          "[ch07][generate]") {
  const std::vector<float> logits = {0.0f, 3.0f, 1.0f, 2.0f};
  std::mt19937_64 rng(5);
  CHECK(sample_token(logits, 0.0f, 1.0f, rng) == 1);
  for (int i = 0; i < 50; ++i) CHECK(sample_token(logits, 1.0f, 1e-6f, rng) == 1);
  // Full softmax: p = e^l / sum; count 20000 draws and compare each frequency.
  std::vector<int> count(4, 0);
  const int n = 20000;
  for (int i = 0; i < n; ++i) ++count[static_cast<std::size_t>(sample_token(logits, 1.0f, 1.0f, rng))];
  double z = 0;
  for (float l : logits) z += std::exp(static_cast<double>(l));
  for (std::size_t i = 0; i < 4; ++i)
    CHECK(static_cast<double>(count[i]) / n == Approx(std::exp(static_cast<double>(logits[i])) / z).margin(0.015));
  // top_p 0.9: tokens 1 (0.644) and 3 (0.237) reach 0.88 < 0.9, so token 2 (0.087) joins; token 0 never appears.
  std::fill(count.begin(), count.end(), 0);
  for (int i = 0; i < n; ++i) ++count[static_cast<std::size_t>(sample_token(logits, 1.0f, 0.9f, rng))];
  CHECK(count[0] == 0);
  CHECK(count[2] > 0);
}

TEST_CASE("qlora finetune / eval / generate run end to end and reject bad flags", "[ch07][finetune][cli]") {
  if (!test::finetune_fixture()) return;
  const auto out = test::temp_path("test_ch07_ft", "cli");
  const std::string tiny = " --steps 4 --batch 2 --seq-len 32 --rank 4 --val-windows 4 --eval-every 2"
                           " --save-every 2 --sample-tokens 4 --out '" + out.string() + "'";
  auto [rc, text] = test::run_qlora("finetune" + tiny);
  INFO(text);
  REQUIRE(rc == 0);
  CHECK(text.find("before: validation loss") != std::string::npos);
  CHECK(text.find("after: validation loss") != std::string::npos);
  CHECK(read_peft_adapter(out / "adapter").config.r == 4);
  CHECK(fs::exists(out / "checkpoint-2" / "optimizer.safetensors"));

  auto [rc_eval, eval_text] = test::run_qlora("eval --held-out --windows 2 --seq-len 32 --adapter '" +
                                        (out / "adapter").string() + "'");
  INFO(eval_text);
  CHECK(rc_eval == 0);
  CHECK(eval_text.find("perplexity") != std::string::npos);
  auto [rc_gen, gen_text] = test::run_qlora("generate --max-tokens 4 --adapter '" + (out / "adapter").string() + "'");
  INFO(gen_text);
  CHECK(rc_gen == 0);
  CHECK(gen_text.rfind("ROMEO:", 0) == 0);

  auto [rc_bad, bad_text] = test::run_qlora("finetune --storage nf5 --out '" + out.string() + "'");
  CHECK(rc_bad != 0);
  CHECK(bad_text.find("nf5") != std::string::npos);
  // Each refusal names the flag or the files, before anything is trained.
  const std::string ft = "finetune --out '" + out.string() + "_refused'";
  std::vector<std::pair<std::string, std::vector<std::string>>> refused = {
      {ft + " --lr -1", {"--lr", "must be > 0"}},
      {ft + " --seq-len 0", {"--seq-len", "0"}},
      {ft + " --clip -0.5", {"--clip", "must be >= 0"}},
      {ft + " --seq-len 300", {"--seq-len 300", "kjv15M.bin", "seq_len 256"}},
      {"eval --seq-len 300", {"--seq-len 300", "seq_len 256"}},
      {ft + " --stream --device cpu", {"--stream", "GPU"}},
      {ft + " --stream --device cpu --model kjv15M-hf", {"--stream", "GPU"}},
  };
  // Generation: a prompt and its tokens to come must fit in the context; a prompts file needs a prompt.
  const fs::path no_prompts = out / "no_prompts.txt";
  { std::ofstream(no_prompts) << "\n\n"; }
  refused.push_back({"generate --max-tokens 300", {"--max-tokens 300", "context of 256"}});
  refused.push_back({"generate --prompts '" + no_prompts.string() + "'", {"--prompts", "no_prompts.txt", "no prompts"}});
  refused.push_back({"generate --prompts '" + (out / "missing.txt").string() + "'", {"--prompts", "missing.txt"}});
  refused.push_back({"generate --device cpu --no-cuda-graphs", {"--no-cuda-graphs", "on the CPU"}});
  if (find_model("stories260K.bin"))  // its own 512-token tokenizer is not shipped: the LLaMA-2 one is refused
    refused.push_back({"generate --model stories260K.bin", {"tokenizer (32000 tokens)", "stories260K.bin", "512"}});
  for (const auto& [args, words] : refused) {
    auto [rc_r, text_r] = test::run_qlora(args);
    INFO(args << "\n" << text_r);
    CHECK(rc_r != 0);
    for (const auto& w : words) CHECK(text_r.find(w) != std::string::npos);
    CHECK(text_r.find("step 1/") == std::string::npos);
  }
  // --device cuda with no device to be seen (or no CUDA in this build) is refused by name.
  auto [rc_dev, dev_text] = test::run_shell("CUDA_VISIBLE_DEVICES=-1 '" + test::qlora_bin() + "' generate --device cuda");
  INFO(dev_text);
  CHECK(rc_dev != 0);
  CHECK(dev_text.find("--device cuda") != std::string::npos);
}

// The (loss, grad_norm) of every step in a finetune log.jsonl, by step.
static std::map<int, std::pair<double, double>> logged_steps(const fs::path& log) {
  std::ifstream in(log);
  REQUIRE(in);
  std::map<int, std::pair<double, double>> steps;
  for (std::string line; std::getline(in, line);) {
    const auto j = nlohmann::json::parse(line);
    steps[j.at("step").get<int>()] = {j.at("loss").get<double>(), j.at("grad_norm").get<double>()};
  }
  return steps;
}

TEST_CASE("qlora finetune --resume in a new process continues the loss curve bit for bit", "[ch07][finetune][cli]") {
  if (!test::finetune_fixture()) return;
  // Everything a new process must restore: LoRA weights, AdamW moments and step, the data
  // order's and the dropout's random streams. Dropout is on, so a wrong stream shows.
  const std::string tiny = " --steps 6 --batch 2 --seq-len 32 --rank 4 --val-windows 2 --eval-every 0"
                           " --save-every 3 --sample-tokens 1 --dropout 0.1";
  const auto full = test::temp_path("test_ch07_ft", "resume_full");
  const auto resumed = test::temp_path("test_ch07_ft", "resume_second");
  auto [rc, text] = test::run_qlora("finetune" + tiny + " --out '" + full.string() + "'");
  INFO(text);
  REQUIRE(rc == 0);
  auto [rc2, text2] = test::run_qlora("finetune" + tiny + " --out '" + resumed.string() + "' --resume '" +
                                      (full / "checkpoint-3").string() + "'");
  INFO(text2);
  REQUIRE(rc2 == 0);
  const auto a = logged_steps(full / "log.jsonl");
  const auto b = logged_steps(resumed / "log.jsonl");
  REQUIRE(a.size() == 6);
  REQUIRE(b.size() == 3);
  for (const auto& [step, values] : b) {
    INFO("step " << step);
    REQUIRE(a.count(step) == 1);
    CHECK(values.first == a.at(step).first);  // nlohmann writes doubles that parse back exactly
    CHECK(values.second == a.at(step).second);
  }
  CHECK(test::read_bytes(full / "adapter" / "adapter_model.safetensors") ==
        test::read_bytes(resumed / "adapter" / "adapter_model.safetensors"));
}
