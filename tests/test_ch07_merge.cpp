// Chapter 7, "Merging and exporting": a PEFT adapter folded into its base
// (model_merge.hpp, `qlora merge`) computes what base + adapter computes.
//
// Tolerances, from the arithmetic:
//  - float32 merge: the merged model multiplies x by fl(W + s·B·A) instead of adding
//    x·Wᵀ and s·(x·Aᵀ)·Bᵀ. Both are float32 with a different rounding order: a few
//    ulps (~1e-7 relative) per dot product, carried through two layers and softmax
//    attention. Relative Frobenius error of the logits ≤ 1e-5 leaves a wide margin
//    and still catches any wrong row order (those errors are O(1)).
//  - BF16 export: every merged weight is rounded to 8 significant bits, relative error
//    ≤ 2⁻⁹ ≈ 2e-3 each (about 1e-3 rms). A token's logits pass about seven rounded
//    matmuls in sequence (q/k/v, o, gate/up, down in each of 2 layers, the classifier),
//    so their errors add to ~√7·1e-3 ≈ 3e-3 relative, more where attention or SwiGLU
//    amplify (measured: 5.3e-3 on this model). We allow 1e-2, still far below the
//    adapter's own effect (checked to be > 0.1 relative).
#include "file_helpers.hpp"
#include "finetune.hpp"
#include "hf_llama.hpp"
#include "lora_merge.hpp"
#include "model_helpers.hpp"
#include "model_merge.hpp"
#include "safetensors.hpp"

#include <catch2/catch.hpp>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>

using namespace qlora;
using qlora::test::tiny_config;
namespace fs = std::filesystem;

namespace {

// A trained-looking adapter on all seven projections: A and B both random and non-zero,
// B rows in PEFT's (rotate-half) order, the model's own. s·B·A has rms ≈ 0.3 of the weights'.
PeftAdapter random_adapter(const LlamaWeights& w, std::uint64_t seed) {
  PeftAdapter a;
  a.config.r = 4;
  a.config.alpha = 8.0f;
  a.target_modules = llama_linear_modules();
  std::mt19937_64 rng(seed);
  for (int l = 0; l < w.config.n_layers; ++l)
    for (Proj p : kAllProj) {
      const auto [out, in] = w.proj_shape(p);
      LoraAdapter ad(in, out, a.config.r);
      ad.A = normal_weights(ad.A.size(), 1.0 / std::sqrt(in), rng);
      ad.B = normal_weights(ad.B.size(), 0.15 / std::sqrt(a.config.r), rng);
      a.modules.emplace(hf_module_name(l, p), std::move(ad));
    }
  return a;
}

std::vector<float> logits_of(LlamaModel m, const std::vector<int>& tokens) {
  std::mt19937_64 rng(0);
  m.forward(tokens.data(), nullptr, 1, static_cast<int>(tokens.size()), false, rng);
  return m.logits();
}

double rel_frobenius(const std::vector<float>& x, const std::vector<float>& ref) {
  REQUIRE(x.size() == ref.size());
  double num = 0, den = 0;
  for (std::size_t i = 0; i < x.size(); ++i) {
    num += (double(x[i]) - ref[i]) * (double(x[i]) - ref[i]);
    den += double(ref[i]) * ref[i];
  }
  return std::sqrt(num / den);
}

const std::vector<int> kTokens = {1, 5, 9, 30, 2, 17, 4, 11};

}  // namespace

TEST_CASE("float32 merge: merged weights give the logits of base + adapter", "[ch07][merge]") {
  for (int kv : {4, 2})
    for (bool shared : {true, false}) {
      INFO("n_kv_heads " << kv << ", shared classifier " << shared);
      const LlamaWeights base = random_llama_weights(tiny_config(kv, shared), 11);
      const PeftAdapter peft = random_adapter(base, 12);

      LlamaModel with_adapter(base, BaseStorage::float32);
      adapter_from_peft(with_adapter, peft);
      const auto ref = logits_of(std::move(with_adapter), kTokens);

      LlamaWeights merged = base;
      CHECK(merge_peft_adapter(merged, peft, "test adapter") == 2 * kNumProj);
      const double err = rel_frobenius(logits_of(LlamaModel(merged, BaseStorage::float32), kTokens), ref);
      const double effect = rel_frobenius(logits_of(LlamaModel(base, BaseStorage::float32), kTokens), ref);
      CAPTURE(err, effect);
      CHECK(err < 1e-5);
      CHECK(effect > 0.1);  // the adapter matters, so the check above means something
    }
}

TEST_CASE("qlora merge: HF base + adapter folder → BF16 HF folder with the same logits", "[ch07][merge][cli]") {
  // The base goes through a BF16 HF folder first, so the reference uses exactly the
  // weights the merge reads; the only new error is the BF16 rounding of the export.
  const auto base_dir = test::temp_path("test_ch07_merge", "base");
  const auto adapter_dir = test::temp_path("test_ch07_merge", "adapter");
  const auto out_dir = test::temp_path("test_ch07_merge", "merged");
  write_hf_llama(base_dir, checkpoint_from_weights(random_llama_weights(tiny_config(2, false), 21)));
  const LlamaWeights base = load_llama_weights(base_dir);
  write_peft_adapter(adapter_dir, random_adapter(base, 22));

  LlamaModel with_adapter(base, BaseStorage::float32);
  adapter_from_peft(with_adapter, read_peft_adapter(adapter_dir));
  const auto ref = logits_of(std::move(with_adapter), kTokens);

  auto [rc, text] = test::run_qlora("merge --model '" + base_dir.string() + "' --adapter '" + adapter_dir.string() +
                              "' --out '" + out_dir.string() + "'");
  INFO(text);
  REQUIRE(rc == 0);
  CHECK(text.find("merged 14 adapted projections") != std::string::npos);
  CHECK(!fs::exists(out_dir / "tokenizer.model"));  // none next to the base
  const double err = rel_frobenius(logits_of(LlamaModel(load_llama_weights(out_dir), BaseStorage::float32), kTokens), ref);
  const double effect = rel_frobenius(logits_of(LlamaModel(base, BaseStorage::float32), kTokens), ref);
  CAPTURE(err, effect);
  CHECK(err < 1e-2);
  CHECK(err > 0);  // BF16 rounding did happen (the file is BF16, not F32)
  CHECK(effect > 0.1);
}

TEST_CASE("merge: an adapter of another model is refused naming the module", "[ch07][merge]") {
  const LlamaWeights base = random_llama_weights(tiny_config(2, true), 31);

  LlamaConfig wider = tiny_config(2, true);
  wider.hidden_dim = 32;
  LlamaWeights w = base;
  CHECK_THROWS_WITH(merge_peft_adapter(w, random_adapter(random_llama_weights(wider, 32), 33), "adapter X"),
                    Catch::Contains("adapter X") && Catch::Contains("model.layers.0.mlp.gate_proj") &&
                        Catch::Contains("24×16"));

  LlamaConfig deeper = tiny_config(2, true);
  deeper.n_layers = 3;
  CHECK_THROWS_WITH(merge_peft_adapter(w, random_adapter(random_llama_weights(deeper, 34), 35), "adapter Y"),
                    Catch::Contains("adapter Y") && Catch::Contains("model.layers.2.") &&
                        Catch::Contains("not a projection of this model"));

  // CLI: a missing adapter folder is named, and nothing is written.
  const auto base_dir = test::temp_path("test_ch07_merge", "base2");
  write_hf_llama(base_dir, checkpoint_from_weights(base));
  const auto out_dir = test::temp_path("test_ch07_merge", "never");
  fs::remove_all(out_dir);
  auto [rc, text] = test::run_qlora("merge --model '" + base_dir.string() + "' --adapter /nonexistent/adapter --out '" +
                              out_dir.string() + "'");
  CHECK(rc != 0);
  CHECK(text.find("/nonexistent/adapter") != std::string::npos);
  CHECK(!fs::exists(out_dir / "model.safetensors"));

  // Writing over the base is refused.
  auto [rc_self, text_self] = test::run_qlora("merge --model '" + base_dir.string() + "' --adapter /nonexistent/adapter --out '" +
                                        base_dir.string() + "'");
  CHECK(rc_self != 0);
  CHECK(text_self.find("is the base model itself") != std::string::npos);
}

TEST_CASE("qlora eval --dump-logits writes the first window's tokens and logits", "[ch07][merge][cli]") {
  const auto model = test::model_or_fail("kjv15M.bin");
  if (!model) return;
  const auto file = test::temp_path("test_ch07_merge", "logits.safetensors");
  auto [rc, text] = test::run_qlora("eval --model '" + model->string() + "' --storage f32 --held-out --windows 1 --seq-len 16 "
                              "--dump-logits '" + file.string() + "'");
  INFO(text);
  REQUIRE(rc == 0);
  const SafeTensors st = read_safetensors(file);
  const Tensor& tokens = st.at("tokens");
  const Tensor& logits = st.at("logits");
  REQUIRE(tokens.dtype == DType::I32);
  REQUIRE(tokens.shape == std::vector<std::int64_t>{16});
  LlamaModel m(load_llama_weights(*model), BaseStorage::float32);
  REQUIRE(logits.dtype == DType::F32);
  REQUIRE(logits.shape == std::vector<std::int64_t>{16, m.config().vocab_size});
  std::vector<int> ids(16);
  std::memcpy(ids.data(), tokens.data.data(), tokens.data.size());
  // Same weights, same code: the file holds what this process computes for those tokens.
  CHECK(rel_frobenius(logits.to_f32(), logits_of(std::move(m), ids)) < 1e-6);
}
