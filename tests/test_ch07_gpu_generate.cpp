// Chapter 7 on the GPU: generation with the device KV cache (kernels/generate_gpu.cuh)
// against the CPU model's decode_step, its reference.
//
// Tolerance. As in test_ch07_gpu_model.cpp: the GPU multiplies the frozen projections and
// the classifier on BF16 operands with float32 sums, so the reference is the CPU model in
// BF16-compute mode, which rounds the same operands; what remains is summation order,
// operands it pushes across a BF16 rounding boundary (one BF16 ulp, 2⁻⁸ relative, each),
// and TF32 in the LoRA products. The decoder's attention (attention_cached_v2) sums in
// float32 in its own order where the CPU sums in double: about 1e-6 relative (its test in
// test_ch07_gpu_ops.cpp), the same kind of difference as version 1's and far below one BF16
// ulp, so it adds nothing of its own. That file bounds the logits by 3% of the largest logit
// (about 3× the worst case measured over random tokens); decoding runs the same
// arithmetic on real text, one position at a time, so the same bound applies at every
// step. A wrong position, head group, cache slot or dropped adapter is an error of order 1.
//
// Greedy ids must agree except at a near tie: when the CPU's two best logits are closer
// than that bound, the GPU may pick the other one. From there on the ids are not compared,
// but both models keep being fed the CPU's token (teacher forcing), so the logits still
// are, at every one of the 32 steps.
#include "file_helpers.hpp"
#include "lora_helpers.hpp"
#include "finetune.hpp"
#include "generate.hpp"
#include "generate_gpu.cuh"
#include "hf_llama.hpp"
#include "llama_model.hpp"
#include "tokenizer.hpp"

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <cstdio>
#include <functional>
#include <random>
#include <string>

using namespace qlora;
using qlora::test::model_or_fail;
using qlora::test::add_random_lora;
using qlora::test::max_abs;

namespace {

constexpr double kLogitTol = 3e-2;  // of the largest |logit|: test_ch07_gpu_model.cpp's bound, argued above
constexpr int kSteps = 32;

// Largest |gpu − cpu| over one row of logits, as a fraction of the CPU's largest |logit|.
double logit_err(const float* gpu, const std::vector<float>& cpu) {
  double m = 0;
  for (std::size_t i = 0; i < cpu.size(); ++i) {
    REQUIRE(std::isfinite(gpu[i]));  // a NaN is a poisoned value the GPU never wrote
    m = std::max(m, std::fabs(static_cast<double>(gpu[i]) - cpu[i]));
  }
  return m / max_abs(cpu);
}

// Whether the two largest logits are closer than the tolerance: the GPU may take either.
bool near_tie(const std::vector<float>& l) {
  std::vector<float> s = l;
  std::partial_sort(s.begin(), s.begin() + 2, s.end(), std::greater<>());
  return s[0] - s[1] < kLogitTol * max_abs(l);
}

int argmax(const std::vector<float>& l) {
  return static_cast<int>(std::max_element(l.begin(), l.end()) - l.begin());
}

}  // namespace

TEST_CASE("Greedy decoding on the GPU follows the CPU model's decode_step for 32 tokens, with and without an adapter",
          "[ch07][gpu][generate]") {
  const auto path = model_or_fail("kjv15M-hf");
  if (!path) return;
  const LlamaWeights w = load_llama_weights(*path);
  const auto tok = load_tokenizer(find_tokenizer_for(*path));
  const std::vector<int> prompt = prompt_ids(*tok, "And God said");
  for (const bool adapter : {false, true}) {
    CAPTURE(adapter);
    LlamaModel cpu(w, BaseStorage::nf4_dq);
    cpu.set_bf16_compute(true);
    if (adapter) add_random_lora(cpu, LoraConfig{}.dropout, 3);  // B random: PEFT's zero B would add nothing
    cuda::LlamaModelGpu gpu(cpu);
    const int P = static_cast<int>(prompt.size());
    cuda::GpuDecoder dec(gpu, 1, P + kSteps);
    dec.poison();

    cpu.reset_kv();
    std::vector<float> ref;
    for (int i = 0; i < P; ++i) ref = cpu.decode_step(prompt[static_cast<std::size_t>(i)], i);
    dec.prefill(0, prompt);
    bool flipped = false;
    double worst = 0;
    for (int step = 0; step <= kSteps; ++step) {
      CAPTURE(step);
      const std::vector<float> got = dec.logits(1);
      const double err = logit_err(got.data(), ref);
      worst = std::max(worst, err);
      CHECK(err < kLogitTol);
      if (step == kSteps) break;
      dec.sample(1, 0.0f, 1.0f, 0);
      const int cpu_id = argmax(ref), gpu_id = dec.ids(1)[0];
      if (!flipped && gpu_id != cpu_id) {
        INFO("the GPU picked " << gpu_id << ", the CPU " << cpu_id);
        CHECK(near_tie(ref));
        flipped = true;
      }
      // Teacher forcing: both models read the CPU's token next.
      dec.set_ids({cpu_id});
      dec.step({P + step});
      ref = cpu.decode_step(cpu_id, P + step);
    }
    std::printf("kjv15M nf4-dq%s: greedy decode, %d steps: largest logit error %.2e of the largest logit%s\n",
                adapter ? " + random LoRA" : "", kSteps, worst, flipped ? " (ids flipped at a near tie)" : "");
  }
}

TEST_CASE("Decode steps replayed from a CUDA graph give the eager steps' logits, bit for bit", "[ch07][gpu][generate]") {
  const auto path = model_or_fail("kjv15M-hf");
  if (!path) return;
  const LlamaWeights w = load_llama_weights(*path);
  const auto tok = load_tokenizer(find_tokenizer_for(*path));
  LlamaModel host(w, BaseStorage::nf4_dq);
  add_random_lora(host, LoraConfig{}.dropout, 7);
  cuda::LlamaModelGpu gpu(host);
  const std::vector<std::vector<int>> prompts = {prompt_ids(*tok, "And God said"), prompt_ids(*tok, "Jesus wept.")};
  constexpr int kGraphSteps = 12;
  // Both decoders read the same token sequence (teacher forcing with fixed ids), so every
  // step's logits must agree exactly: the graph replays the very kernels the eager step runs.
  auto run = [&](bool graphs) {
    cuda::GpuDecoder dec(gpu, 2, 16 + kGraphSteps, graphs);
    dec.poison();
    for (int b = 0; b < 2; ++b) dec.prefill(b, prompts[static_cast<std::size_t>(b)]);
    std::vector<std::vector<float>> logits{dec.logits(2)};
    for (int step = 0; step < kGraphSteps; ++step) {
      dec.set_ids({100 + 7 * step, 200 + 11 * step});
      dec.step({static_cast<int>(prompts[0].size()) + step, static_cast<int>(prompts[1].size()) + step});
      logits.push_back(dec.logits(2));
    }
    return logits;
  };
  const auto eager = run(false), graphed = run(true);
  REQUIRE(eager.size() == graphed.size());
  for (std::size_t i = 0; i < eager.size(); ++i) {
    CAPTURE(i);
    for (float v : graphed[i]) REQUIRE(std::isfinite(v));
    CHECK(std::memcmp(eager[i].data(), graphed[i].data(), eager[i].size() * sizeof(float)) == 0);
  }
}

TEST_CASE("A batch of prompts of different lengths decodes as each prompt alone", "[ch07][gpu][generate]") {
  const auto path = model_or_fail("kjv15M-hf");
  if (!path) return;
  const LlamaWeights w = load_llama_weights(*path);
  const auto tok = load_tokenizer(find_tokenizer_for(*path));
  LlamaModel host(w, BaseStorage::nf4_dq);
  add_random_lora(host, LoraConfig{}.dropout, 5);
  cuda::LlamaModelGpu gpu(host);
  const std::vector<std::vector<int>> prompts = {prompt_ids(*tok, "In the beginning God created the heaven"),
                                                 prompt_ids(*tok, "Jesus wept."),
                                                 prompt_ids(*tok, "And the LORD spake unto Moses, saying,")};
  const int B = static_cast<int>(prompts.size()), V = w.config.vocab_size, steps = 16;
  int longest = 0;
  for (const auto& p : prompts) longest = std::max(longest, static_cast<int>(p.size()));
  REQUIRE(prompts[0].size() != prompts[1].size());

  // The batch: greedy, ids sampled on the device, all logits kept.
  cuda::GpuDecoder batch(gpu, B, longest + steps);
  batch.poison();
  for (int b = 0; b < B; ++b) batch.prefill(b, prompts[static_cast<std::size_t>(b)]);
  std::vector<std::vector<float>> batch_logits{batch.logits(B)};
  std::vector<std::vector<int>> batch_ids;
  for (int step = 0; step < steps; ++step) {
    batch.sample(B, 0.0f, 1.0f, 0);
    batch_ids.push_back(batch.ids(B));
    std::vector<int> pos;
    for (int b = 0; b < B; ++b) pos.push_back(static_cast<int>(prompts[static_cast<std::size_t>(b)].size()) + step);
    batch.step(pos);
    batch_logits.push_back(batch.logits(B));
  }
  // Each prompt alone, fed the batch's ids: the same logits at every step.
  double worst = 0;
  for (int b = 0; b < B; ++b) {
    CAPTURE(b);
    const auto& p = prompts[static_cast<std::size_t>(b)];
    cuda::GpuDecoder alone(gpu, 1, static_cast<int>(p.size()) + steps);
    alone.poison();
    alone.prefill(0, p);
    for (int step = 0; step <= steps; ++step) {
      CAPTURE(step);
      const std::vector<float> got = alone.logits(1);
      const std::vector<float> ref(batch_logits[static_cast<std::size_t>(step)].begin() + static_cast<std::ptrdiff_t>(b) * V,
                                   batch_logits[static_cast<std::size_t>(step)].begin() + static_cast<std::ptrdiff_t>(b + 1) * V);
      const double err = logit_err(got.data(), ref);
      worst = std::max(worst, err);
      CHECK(err < kLogitTol);
      if (step == steps) break;
      alone.set_ids({batch_ids[static_cast<std::size_t>(step)][static_cast<std::size_t>(b)]});
      alone.step({static_cast<int>(p.size()) + step});
    }
  }
  std::printf("kjv15M nf4-dq + random LoRA: 3 prompts batched vs alone, %d steps: largest logit difference %.2e of the "
              "largest logit\n", steps, worst);
}

TEST_CASE("Sampling on the GPU draws what sample_token draws from the same uniforms (ties of equal logits apart)", "[ch07][gpu][generate]") {
  const auto path = model_or_fail("kjv15M-hf");
  if (!path) return;
  const LlamaWeights w = load_llama_weights(*path);
  const auto tok = load_tokenizer(find_tokenizer_for(*path));
  LlamaModel host(w, BaseStorage::nf4_dq);
  cuda::LlamaModelGpu gpu(host);
  const std::vector<std::vector<int>> prompts = {prompt_ids(*tok, "And"), prompt_ids(*tok, "The LORD is my shepherd"),
                                                 prompt_ids(*tok, "ROMEO:"), prompt_ids(*tok, "Blessed are")};
  const int B = static_cast<int>(prompts.size()), V = w.config.vocab_size, draws = 24;
  cuda::GpuDecoder dec(gpu, B, 32);
  for (int b = 0; b < B; ++b) dec.prefill(b, prompts[static_cast<std::size_t>(b)]);
  const std::vector<float> logits = dec.logits(B);
  int same = 0, total = 0;
  for (const float temperature : {0.5f, 1.0f, 1.5f}) {
    for (const float top_p : {0.3f, 0.9f, 1.0f}) {
      // The CPU's generator, seeded as generate_text seeds it: draw n is uniform n.
      std::mt19937_64 rng(7);
      std::vector<double> u;
      std::mt19937_64 probe = rng;
      for (int n = 0; n < draws; ++n) u.push_back(uniform01(probe));
      dec.set_draws(u);
      for (int n = 0; n < draws; ++n) {
        dec.sample(B, temperature, top_p, n);
        const std::vector<int> got = dec.ids(B);
        std::mt19937_64 at_n = rng;  // sample_token draws one uniform
        for (int k = 0; k < n; ++k) uniform01(at_n);
        for (int b = 0; b < B; ++b) {
          const std::vector<float> row(logits.begin() + static_cast<std::ptrdiff_t>(b) * V,
                                       logits.begin() + static_cast<std::ptrdiff_t>(b + 1) * V);
          std::mt19937_64 r = at_n;
          const int want = sample_token(row, temperature, top_p, r);
          const int g = got[static_cast<std::size_t>(b)];
          CAPTURE(temperature, top_p, n, b, g, want);
          // Tokens of exactly equal logits may be drawn in either order: std::sort leaves
          // theirs unspecified, the GPU's stable sort keeps increasing ids.
          REQUIRE(g >= 0);
          REQUIRE(g < V);
          CHECK((g == want || row[static_cast<std::size_t>(g)] == row[static_cast<std::size_t>(want)]));
          same += g == want;
          ++total;
        }
      }
    }
  }
  std::printf("top-p sampling on the GPU: %d of %d draws equal to sample_token's\n", same, total);
}

TEST_CASE("qlora generate on the GPU: greedy text, a prompts file in order, tokens/s, errors by name",
          "[ch07][gpu][generate]") {
  const auto path = model_or_fail("kjv15M-hf");
  if (!path) return;
  const LlamaWeights w = load_llama_weights(*path);
  const auto tok = load_tokenizer(find_tokenizer_for(*path));
  LlamaModel host(w, BaseStorage::nf4_dq);
  cuda::LlamaModelGpu gpu(host);
  SampleConfig cfg;
  cfg.max_tokens = 24;
  // A batch's texts are the ones each prompt gives alone, in the prompts' order.
  const std::vector<std::string> prompts = {"And God said", "ROMEO:", "Thou shalt not"};
  cuda::GenerateStats st;
  const auto together = cuda::generate_text_gpu(gpu, *tok, prompts, cfg, &st);
  REQUIRE(together.size() == prompts.size());
  for (std::size_t i = 0; i < prompts.size(); ++i) {
    CHECK(together[i].rfind(prompts[i], 0) == 0);
    CHECK(together[i] == cuda::generate_text_gpu(gpu, *tok, {prompts[i]}, cfg)[0]);
  }
  CHECK(st.generated_tokens > 0);
  CHECK(st.seconds > st.prefill_seconds);
  CHECK(st.prefill_seconds > 0);
  cfg.max_tokens = w.config.seq_len;  // the prompt's tokens no longer fit beside them
  CHECK_THROWS_WITH(cuda::generate_text_gpu(gpu, *tok, {"ROMEO:"}, cfg), Catch::Contains("--max-tokens"));
  CHECK_THROWS_WITH(cuda::generate_text_gpu(gpu, *tok, {}, cfg), Catch::Contains("no prompts"));

  auto [rc, text] = test::run_qlora("generate --device cuda --model kjv15M-hf --prompt 'ROMEO:' --max-tokens 16");
  INFO(text);
  CHECK(rc == 0);
  CHECK(text.find("ROMEO:") != std::string::npos);
  CHECK(text.find("tokens/s on the GPU") != std::string::npos);
}
