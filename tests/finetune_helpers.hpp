// Inputs shared by the fine-tuning tests: kjv15M, its tokenizer and tinyshakespeare
// loaded once, a fresh model with small adapters, a tiny run's configuration, and a
// Trainer that lets a test tamper with one micro-batch (a NaN loss, a poisoned
// gradient, a signal arriving mid-run) while everything else runs for real.
#pragma once

#include "file_helpers.hpp"
#include "finetune.hpp"

#include <catch2/catch.hpp>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <utility>

namespace qlora::test {

struct FinetuneFixture {
  LlamaWeights weights;
  FinetuneData data;
};

/// Loaded once per model: the model (kjv15M.bin, or the same weights as the folder
/// kjv15M-hf, which the GPU machine carries), the tokenizer and the data; nullptr (and the
/// test fails) when absent.
inline const FinetuneFixture* finetune_fixture(const std::string& model_name = "kjv15M.bin") {
  static std::map<std::string, std::unique_ptr<FinetuneFixture>> loaded;
  auto& f = loaded[model_name];
  if (!f) {
    auto model = find_model(model_name);
    auto text = find_data("tinyshakespeare.txt");
    if (!model || !text) {
      FAIL_CHECK(model_name << " or tinyshakespeare.txt not found in the model/data search path");
      return nullptr;
    }
    f = std::make_unique<FinetuneFixture>();
    f->weights = load_llama_weights(*model);
    SentencePieceTokenizer tok(find_tokenizer_for(*model));
    f->data = load_finetune_data(*text, tok);
  }
  return f.get();
}

/// The fixture's model in NF4 + DQ with r 4, alpha 8, dropout 0.05 adapters drawn from `seed`.
inline LlamaModel fresh_model(const FinetuneFixture& f, std::uint64_t seed) {
  LlamaModel m(f.weights, BaseStorage::nf4_dq);
  LoraSetup setup;
  setup.config.r = 4;
  setup.config.alpha = 8.0f;
  setup.config.dropout = 0.05f;
  std::mt19937_64 rng(seed);
  m.add_lora(setup, rng);
  return m;
}

/// 30 steps of batch 2 × seq_len 32, lr 3e-3 after 3 warmup steps, no progress line.
inline FinetuneConfig tiny_finetune_config() {
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

/// A Trainer that passes everything on to `inner`, except that after its n-th forward and
/// backward (1-based, counted over its life) the loop sees `after_micro_batch(n, loss)`.
class TamperedTrainer final : public Trainer {
 public:
  TamperedTrainer(Trainer& inner, std::function<float(int, float)> after_micro_batch)
      : inner_(inner), after_(std::move(after_micro_batch)) {}
  LlamaModel& model() override { return inner_.model(); }
  const LlamaConfig& config() const override { return inner_.config(); }
  PeftAdapter adapter() override { return inner_.adapter(); }
  void load_adapter(const PeftAdapter& a, const std::string& where) override { inner_.load_adapter(a, where); }
  std::int64_t lora_parameter_count() const override { return inner_.lora_parameter_count(); }
  void zero_grad() override { inner_.zero_grad(); }
  float train_micro_batch(const int* x, const int* y, int B, int T, std::mt19937_64& dropout_rng,
                          int first_sequence) override {
    const float loss = inner_.train_micro_batch(x, y, B, T, dropout_rng, first_sequence);
    return after_(++calls_, loss);
  }
  float eval_batch(const int* x, const int* y, int B, int T) override { return inner_.eval_batch(x, y, B, T); }
  void scale_grads(float s) override { inner_.scale_grads(s); }
  void reduce_grads(Communicator& world) override { inner_.reduce_grads(world); }
  double clip_grad_norm(double max_norm) override { return inner_.clip_grad_norm(max_norm); }
  void optimizer_step(float lr) override { inner_.optimizer_step(lr); }
  std::int64_t optimizer_steps() const override { return inner_.optimizer_steps(); }
  void save_optimizer(const std::filesystem::path& file) const override { inner_.save_optimizer(file); }
  void load_optimizer(const std::filesystem::path& file) override { inner_.load_optimizer(file); }
  void sync_to_host() override { inner_.sync_to_host(); }
  void sync_from_host() override { inner_.sync_from_host(); }
  double peak_memory_mb() const override { return inner_.peak_memory_mb(); }
  std::string device() const override { return inner_.device(); }

 private:
  Trainer& inner_;
  std::function<float(int, float)> after_;
  int calls_ = 0;
};

/// True when the two files hold the same bytes (and both exist).
inline bool same_bytes(const std::filesystem::path& a, const std::filesystem::path& b) {
  return std::filesystem::exists(a) && std::filesystem::exists(b) && read_bytes(a) == read_bytes(b);
}

}  // namespace qlora::test
