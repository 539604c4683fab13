// Chapter 8 on the GPU: a masked, right-padded batch of instruction examples (prompt
// labels −100, pads −100) through LlamaModelGpu against the CPU model computing in BF16,
// with both classifier heads (version 1, the whole batch's logits; version 2, chunked),
// at two lengths T below seq_len one after the other; and GpuTrainer against CpuTrainer
// over the first steps of an instruction fine-tune with gradient accumulation.
// Tolerances as in test_ch07_gpu_model.cpp (BF16 operands on both sides; what remains is
// summation order and a few BF16 rounding flips): loss 1e-2, gradients 5% relative.
#include "example_batches.hpp"
#include "file_helpers.hpp"
#include "finetune.hpp"
#include "gpu_trainer.cuh"
#include "instruct_helpers.hpp"
#include "llama2c.hpp"
#include "llama_model.hpp"
#include "llama_model_gpu.cuh"
#include "lora_helpers.hpp"
#include "model_helpers.hpp"

#include <catch2/catch.hpp>

#include <cmath>
#include <random>
#include <vector>

using namespace qlora;
using qlora::test::host_grads;
using qlora::test::rel_frobenius;

namespace {

// Examples of the given lengths from the model's vocabulary; the first 60% of each is
// its prompt (label −100), the rest its answer.
std::vector<Example> masked_examples(const std::vector<int>& lengths, int vocab, std::uint64_t seed) {
  return test::labelled_examples(lengths, vocab, seed, 0.6);
}

}  // namespace

TEST_CASE("GPU heads 1 and 2 on a masked, right-padded batch match the CPU model, at two lengths in turn",
          "[ch08][gpu]") {
  const auto path = test::model_or_fail("kjv15M-hf");
  if (!path) return;
  const LlamaWeights w = load_llama_weights(*path);
  LlamaModel cpu(w, BaseStorage::nf4_dq);
  cpu.set_bf16_compute(true);
  test::add_random_lora(cpu, 0.0f, 3);
  const auto examples = masked_examples({70, 23, 41, 9, 56}, w.config.vocab_size, 8);
  // Two batches of different longest lengths (69 and 40 inputs), run one after the other
  // on the same GPU model: its buffers are sized for the first, the second is shorter.
  const std::vector<std::vector<int>> batches = {{0, 1, 2}, {2, 3, 1}};
  for (int head : {1, 2}) {
    cuda::LlamaModelGpu gpu(cpu);
    gpu.set_head_version(head, head == 2 ? 50 : 0);
    for (const auto& idx : batches) {
      const MicroBatch mb = pad_batch(examples, idx, 0);
      CAPTURE(head, mb.T);
      REQUIRE(mb.T < w.config.seq_len);
      std::mt19937_64 rng_cpu(1), rng_gpu(1);
      cpu.zero_grad();
      const float loss_cpu = cpu.forward(mb.x.data(), mb.y.data(), mb.B, mb.T, true, rng_cpu);
      cpu.backward();
      const auto g_cpu = host_grads(cpu);
      gpu.zero_grad();
      const float loss_gpu = gpu.forward(mb.x.data(), mb.y.data(), mb.B, mb.T, true, rng_gpu);
      gpu.backward();
      LlamaModel back(w, BaseStorage::bfloat16);
      test::add_random_lora(back, 0.0f, 3);
      gpu.download_adapters(back);
      INFO("loss cpu " << loss_cpu << " gpu " << loss_gpu);
      CHECK(std::fabs(loss_gpu - loss_cpu) < 1e-2);
      CHECK(rel_frobenius(host_grads(back), g_cpu) < 0.05);
      // The same batch with its labels on every real token: a different loss, so the
      // masked comparison above did test the mask.
      std::vector<int> y_all = mb.y;
      for (int b = 0; b < mb.B; ++b) {
        const Example& e = examples[static_cast<std::size_t>(idx[static_cast<std::size_t>(b)])];
        for (std::size_t t = 0; t + 1 < e.ids.size(); ++t) y_all[static_cast<std::size_t>(b * mb.T) + t] = e.ids[t + 1];
      }
      std::mt19937_64 rng_eval(1);
      CHECK(std::fabs(gpu.forward(mb.x.data(), y_all.data(), mb.B, mb.T, false, rng_eval) - loss_gpu) > 1e-2);
    }
  }
}

TEST_CASE("GpuTrainer follows CpuTrainer over an instruction fine-tune with gradient accumulation", "[ch08][gpu]") {
  const auto path = test::model_or_fail("kjv15M-hf");
  if (!path) return;
  const LlamaWeights w = load_llama_weights(*path);
  std::vector<int> lengths;
  for (int i = 0; i < 16; ++i) lengths.push_back(12 + (i * 11) % 50);
  FinetuneData data;
  data.train_examples = masked_examples(lengths, w.config.vocab_size, 40);
  data.val_examples = masked_examples({30, 45}, w.config.vocab_size, 90);
  FinetuneConfig cfg;
  cfg.steps = 4;
  cfg.batch = 3;
  cfg.grad_accum = 2;
  cfg.seq_len = 64;
  cfg.lr = 3e-3f;
  cfg.eval_every = 4;
  cfg.seed = 2;
  cfg.progress = false;
  LlamaModel cpu_model(w, BaseStorage::nf4_dq);
  cpu_model.set_bf16_compute(true);
  test::add_random_lora(cpu_model, 0.0f, 5);
  const auto cpu = finetune(cpu_model, data, cfg);
  LlamaModel host(w, BaseStorage::nf4_dq);
  test::add_random_lora(host, 0.0f, 5);
  cuda::GpuTrainer gpu_tr(host, cfg.optim, cfg.weight_decay);
  const auto gpu = finetune(gpu_tr, data, cfg);
  REQUIRE(gpu.size() == cpu.size());
  for (std::size_t i = 0; i < cpu.size(); ++i) {
    CAPTURE(i, cpu[i].loss, gpu[i].loss);
    CHECK(gpu[i].positions == cpu[i].positions);  // the same batches, padded alike
    CHECK(std::fabs(gpu[i].loss - cpu[i].loss) < 2e-2);
  }
  CHECK(std::fabs(gpu.back().val_loss - cpu.back().val_loss) < 2e-2);
}
