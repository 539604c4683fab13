// Chapter 7: a short CPU fine-tune of kjv15M (NF4 + double quant) on tinyshakespeare:
// validation loss drops by a stated margin, --resume reproduces the loss curve bit for
// bit, and the trained adapter round-trips through a PEFT folder with identical logits.
#include "file_helpers.hpp"
#include "finetune.hpp"

#include <catch2/catch.hpp>

#include <cstring>
#include <memory>

using namespace qlora;
namespace fs = std::filesystem;

namespace {

struct Fixture {
  LlamaWeights weights;
  FinetuneData data;
};

// Loaded once: the model, the tokenizer and the data; nullptr (with a warning) when absent.
const Fixture* fixture() {
  static std::unique_ptr<Fixture> f = []() -> std::unique_ptr<Fixture> {
    auto model = find_model("kjv15M.bin");
    auto text = find_data("tinyshakespeare.txt");
    if (!model || !text) {
      WARN("kjv15M.bin or tinyshakespeare.txt not found: fine-tune tests skipped");
      return nullptr;
    }
    auto out = std::make_unique<Fixture>();
    out->weights = load_llama_weights(*model);
    SentencePieceTokenizer tok(find_tokenizer_for(*model));
    out->data = load_finetune_data(*text, tok);
    return out;
  }();
  return f.get();
}

LlamaModel fresh_model(const Fixture& f, std::uint64_t seed) {
  LlamaModel m(f.weights, BaseStorage::nf4_dq);
  LoraSetup setup;
  setup.config.r = 4;
  setup.config.alpha = 8.0f;
  setup.config.dropout = 0.05f;
  std::mt19937_64 rng(seed);
  m.add_lora(setup, rng);
  return m;
}

FinetuneConfig tiny_config() {
  FinetuneConfig c;
  c.steps = 30;
  c.batch = 2;
  c.seq_len = 32;
  c.lr = 3e-3f;
  c.warmup = 3;
  c.val_windows = 16;
  c.seed = 7;
  c.progress = false;
  return c;
}

}  // namespace

TEST_CASE("data: BOS first, last 10% held out contiguously", "[ch07][finetune]") {
  const Fixture* f = fixture();
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
  const Fixture* f = fixture();
  if (!f) return;
  auto cfg = tiny_config();
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
  const Fixture* f = fixture();
  if (!f) return;
  auto cfg = tiny_config();
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
  const Fixture* f = fixture();
  if (!f) return;
  auto cfg = tiny_config();
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
