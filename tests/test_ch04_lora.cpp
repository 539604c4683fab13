// Chapter 4 tests: the LoRA layer (forward by hand, PEFT init, a finite-difference
// gradient check in FP64, BLAS vs reference, merge/unmerge, rsLoRA, dropout),
// PEFT adapter files (round trip and bad files) and the `qlora plan` numbers.
#include "bf16.hpp"
#include "lora.hpp"
#include "lora_merge.hpp"
#include "matmul.hpp"
#include "memory_plan.hpp"
#include "model_shapes.hpp"
#include "model_helpers.hpp"
#include "peft_adapter.hpp"
#include "quant4.hpp"
#include "safetensors.hpp"

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <random>
#include <vector>

using namespace qlora;
using qlora::test::random_vec;

namespace {

LoraAdapter random_adapter(int in, int out, int r, std::mt19937_64& rng) {
  LoraAdapter ad(in, out, r);
  ad.A = random_vec(ad.A.size(), rng);
  ad.B = random_vec(ad.B.size(), rng);  // nonzero B, so every gradient is nonzero
  return ad;
}

double max_abs(const std::vector<float>& v) {
  double m = 0.0;
  for (float x : v) m = std::max(m, (double)std::fabs(x));
  return m;
}

double max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
  REQUIRE(a.size() == b.size());
  double m = 0.0;
  for (std::size_t k = 0; k < a.size(); ++k) m = std::max(m, std::fabs((double)a[k] - b[k]));
  return m;
}

// Runs `$QLORA_BIN args` through the shell, collecting stdout; returns the exit status.
int run_cli(const std::string& args, std::string& out) {
  const char* bin = std::getenv("QLORA_BIN");
  if (!bin) FAIL("QLORA_BIN is not set (run through ctest)");
  FILE* pipe = ::popen((std::string(bin) + " " + args).c_str(), "r");
  REQUIRE(pipe);
  char buf[4096];
  out.clear();
  while (std::size_t n = std::fread(buf, 1, sizeof buf, pipe)) out.append(buf, n);
  return ::pclose(pipe);
}

}  // namespace

TEST_CASE("LoRA forward matches a hand computation", "[ch04][lora]") {
  // in=2, out=2, r=1, alpha=2 → s = 2. x = [1, 2], A = [[3, -1]], B = [[0.5], [-2]].
  // xa = 1·3 + 2·(−1) = 1; y += s·xa·B = [1, −4].
  LoraAdapter ad(2, 2, 1);
  ad.A = {3.0f, -1.0f};
  ad.B = {0.5f, -2.0f};
  LoraConfig cfg;
  cfg.r = 1;
  cfg.alpha = 2.0f;
  cfg.dropout = 0.1f;  // off: training = false
  const std::vector<float> x = {1.0f, 2.0f};
  std::mt19937_64 rng(1);
  for (bool blas : {false, true}) {
    std::vector<float> y = {10.0f, 20.0f};  // the base output x·Wᵀ, already there
    LoraCache cache;
    if (blas)
      lora_forward(ad, cfg, x.data(), y.data(), 1, false, rng, cache);
    else
      lora_forward_ref(ad, cfg, x.data(), y.data(), 1, false, rng, cache);
    CHECK(y[0] == 11.0f);
    CHECK(y[1] == 16.0f);
    CHECK(cache.mask.empty());
    REQUIRE(cache.xa.size() == 1);
    CHECK(cache.xa[0] == 1.0f);
  }
}

TEST_CASE("rsLoRA scale is alpha/sqrt(r)", "[ch04][lora]") {
  LoraConfig cfg;
  cfg.r = 16;
  cfg.alpha = 32.0f;
  CHECK(cfg.scale() == 2.0f);
  cfg.use_rslora = true;
  CHECK(cfg.scale() == 8.0f);
  // The LoRA term scales with s: rsLoRA's term is 4× the plain one at r = 16.
  std::mt19937_64 rng(7);
  LoraAdapter ad = random_adapter(8, 5, 16, rng);
  const std::vector<float> x = random_vec(3 * 8, rng);
  std::vector<float> y_plain(15, 0.0f), y_rs(15, 0.0f);
  LoraCache cache;
  cfg.use_rslora = false;
  lora_forward_ref(ad, cfg, x.data(), y_plain.data(), 3, false, rng, cache);
  cfg.use_rslora = true;
  lora_forward_ref(ad, cfg, x.data(), y_rs.data(), 3, false, rng, cache);
  for (std::size_t k = 0; k < y_plain.size(); ++k) CHECK(y_rs[k] == Approx(4.0 * y_plain[k]).epsilon(1e-6));
}

TEST_CASE("PEFT init: A uniform within 1/sqrt(in), B zero, output unchanged", "[ch04][lora]") {
  const int in = 256, out = 96, r = 16, T = 4;
  std::mt19937_64 rng(123);
  LoraAdapter ad(in, out, r);
  ad.init_peft(rng);
  const double bound = 1.0 / std::sqrt((double)in);
  double sum = 0.0, sq = 0.0;
  for (float a : ad.A) {
    REQUIRE(std::fabs(a) <= bound);
    sum += a;
    sq += (double)a * a;
  }
  const double n = (double)ad.A.size();
  // U(−b, b): mean 0 (σ of the sample mean = b/√(3n)), variance b²/3.
  CHECK(std::fabs(sum / n) < 5.0 * bound / std::sqrt(3.0 * n));
  CHECK(sq / n == Approx(bound * bound / 3.0).epsilon(0.05));
  CHECK(max_abs(ad.A) > 0.99 * bound);
  CHECK(max_abs(ad.B) == 0.0);

  LoraConfig cfg;
  cfg.r = r;
  const std::vector<float> x = random_vec((std::size_t)T * in, rng);
  const std::vector<float> base = random_vec((std::size_t)T * out, rng);
  std::vector<float> y = base;
  LoraCache cache;
  lora_forward_ref(ad, cfg, x.data(), y.data(), T, true, rng, cache);
  CHECK(y == base);
}

TEST_CASE("LoRA gradients match finite differences of an FP64 loss", "[ch04][lora]") {
  // Loss L = Σ y ⊙ G with y = x·Wᵀ + s·(m⊙x)·Aᵀ·Bᵀ, so dL/dy = G. The loss is
  // evaluated here in double from scratch (not with the code under test) and
  // differentiated by central differences; the backward pass must agree.
  const int in = 7, out = 5, r = 3, T = 4;
  std::mt19937_64 rng(2024);
  LoraAdapter ad = random_adapter(in, out, r, rng);
  const std::vector<float> W = random_vec((std::size_t)out * in, rng);
  const std::vector<float> x = random_vec((std::size_t)T * in, rng);
  const std::vector<float> G = random_vec((std::size_t)T * out, rng);
  LoraConfig cfg;
  cfg.r = r;
  cfg.alpha = 6.0f;
  cfg.dropout = 0.3f;
  auto use_rslora = GENERATE(false, true);
  cfg.use_rslora = use_rslora;

  std::vector<float> y((std::size_t)T * out, 0.0f);
  matmul_xwt_ref(x.data(), W.data(), y.data(), T, in, out, false);
  LoraCache cache;
  lora_forward_ref(ad, cfg, x.data(), y.data(), T, true, rng, cache);
  REQUIRE(cache.mask.size() == (std::size_t)T * in);
  ad.zero_grad();
  std::vector<float> dx((std::size_t)T * in, 0.0f);
  matmul_dyw_ref(G.data(), W.data(), dx.data(), T, in, out, false);  // the frozen base's share
  lora_backward_ref(ad, cfg, x.data(), G.data(), dx.data(), T, cache);

  std::vector<double> xd(x.begin(), x.end()), Ad(ad.A.begin(), ad.A.end()), Bd(ad.B.begin(), ad.B.end());
  const double s = cfg.use_rslora ? cfg.alpha / std::sqrt((double)r) : (double)cfg.alpha / r;
  //! [fd-check]
  auto loss = [&]() {
    double L = 0.0;
    for (int t = 0; t < T; ++t)
      for (int o = 0; o < out; ++o) {
        double base = 0.0, lora = 0.0;
        for (int i = 0; i < in; ++i) base += xd[t * in + i] * W[o * in + i];
        for (int k = 0; k < r; ++k) {
          double xa = 0.0;
          for (int i = 0; i < in; ++i) xa += cache.mask[t * in + i] * xd[t * in + i] * Ad[k * in + i];
          lora += xa * Bd[o * r + k];
        }
        L += (base + s * lora) * G[t * out + o];
      }
    return L;
  };
  const double h = 1e-6;
  auto fd = [&](std::vector<double>& p, std::size_t k) {
    const double keep = p[k];
    p[k] = keep + h;
    const double up = loss();
    p[k] = keep - h;
    const double down = loss();
    p[k] = keep;
    return (up - down) / (2.0 * h);
  };
  //! [fd-check]
  // The loss is linear in each parameter, so central differences are exact up to
  // rounding (~1e-16·|L|/h ≈ 1e-9); the analytic side is stored in float32 (~6e-8
  // relative). 1e-5 absolute on gradients of size ~1 leaves room for both.
  for (std::size_t k = 0; k < Ad.size(); ++k) CHECK(ad.dA[k] == Approx(fd(Ad, k)).margin(1e-5));
  for (std::size_t k = 0; k < Bd.size(); ++k) CHECK(ad.dB[k] == Approx(fd(Bd, k)).margin(1e-5));
  for (std::size_t k = 0; k < xd.size(); ++k) CHECK(dx[k] == Approx(fd(xd, k)).margin(1e-5));
  // Dropped inputs get no LoRA gradient: where the mask is 0, dx is the base part only.
  std::vector<float> dx_base((std::size_t)T * in, 0.0f);
  matmul_dyw_ref(G.data(), W.data(), dx_base.data(), T, in, out, false);
  int dropped = 0;
  for (std::size_t k = 0; k < dx.size(); ++k)
    if (cache.mask[k] == 0.0f) {
      ++dropped;
      CHECK(dx[k] == dx_base[k]);
    }
  CHECK(dropped > 0);
}

TEST_CASE("Backward accumulates into dA and dB", "[ch04][lora]") {
  const int in = 6, out = 4, r = 2, T = 3;
  std::mt19937_64 rng(5);
  LoraAdapter ad = random_adapter(in, out, r, rng);
  LoraConfig cfg;
  cfg.r = r;
  const std::vector<float> x = random_vec((std::size_t)T * in, rng);
  const std::vector<float> dy = random_vec((std::size_t)T * out, rng);
  std::vector<float> y((std::size_t)T * out, 0.0f), dx((std::size_t)T * in, 0.0f);
  LoraCache cache;
  lora_forward_ref(ad, cfg, x.data(), y.data(), T, false, rng, cache);
  ad.zero_grad();
  lora_backward_ref(ad, cfg, x.data(), dy.data(), dx.data(), T, cache);
  const std::vector<float> dA1 = ad.dA, dB1 = ad.dB;
  lora_backward_ref(ad, cfg, x.data(), dy.data(), dx.data(), T, cache);
  for (std::size_t k = 0; k < dA1.size(); ++k) CHECK(ad.dA[k] == Approx(2.0 * dA1[k]).epsilon(1e-6));
  for (std::size_t k = 0; k < dB1.size(); ++k) CHECK(ad.dB[k] == Approx(2.0 * dB1[k]).epsilon(1e-6));
}

TEST_CASE("BLAS LoRA forward/backward match the plain-loop reference", "[ch04][lora]") {
  struct Shape {
    int in, out, r, T;
    float p;
  };
  auto sh = GENERATE(Shape{64, 48, 8, 5, 0.0f}, Shape{96, 160, 16, 9, 0.1f}, Shape{33, 17, 3, 1, 0.5f});
  std::mt19937_64 init(99);
  LoraAdapter a1 = random_adapter(sh.in, sh.out, sh.r, init);
  LoraAdapter a2 = a1;
  LoraConfig cfg;
  cfg.r = sh.r;
  cfg.alpha = 16.0f;
  cfg.dropout = sh.p;
  const std::vector<float> x = random_vec((std::size_t)sh.T * sh.in, init);
  const std::vector<float> base = random_vec((std::size_t)sh.T * sh.out, init);
  const std::vector<float> dy = random_vec((std::size_t)sh.T * sh.out, init);
  std::mt19937_64 rng1(3), rng2(3);
  std::vector<float> y1 = base, y2 = base;
  LoraCache c1, c2;
  lora_forward_ref(a1, cfg, x.data(), y1.data(), sh.T, true, rng1, c1);
  lora_forward(a2, cfg, x.data(), y2.data(), sh.T, true, rng2, c2);
  CHECK(c1.mask == c2.mask);  // same rng, same draws, same mask
  std::vector<float> dx1 = random_vec(x.size(), init), dx2 = dx1;  // backward adds into dx
  a1.zero_grad();
  a2.zero_grad();
  lora_backward_ref(a1, cfg, x.data(), dy.data(), dx1.data(), sh.T, c1);
  lora_backward(a2, cfg, x.data(), dy.data(), dx2.data(), sh.T, c2);
  // sgemm accumulates in float32: error ≲ n·ε·Σ|terms| with n ≤ 160 and ε = 6e-8,
  // about 1e-5 of the largest value; 1e-4 of it is the bound.
  CHECK(max_abs_diff(y1, y2) <= 1e-4 * max_abs(y1));
  CHECK(max_abs_diff(c1.xa, c2.xa) <= 1e-4 * max_abs(c1.xa));
  CHECK(max_abs_diff(a1.dA, a2.dA) <= 1e-4 * max_abs(a1.dA));
  CHECK(max_abs_diff(a1.dB, a2.dB) <= 1e-4 * max_abs(a1.dB));
  CHECK(max_abs_diff(dx1, dx2) <= 1e-4 * max_abs(dx1));
}

TEST_CASE("Merge folds the adapter into W, unmerge takes it out", "[ch04][lora]") {
  const int in = 40, out = 24, r = 4, T = 6;
  std::mt19937_64 rng(77);
  LoraAdapter ad = random_adapter(in, out, r, rng);
  LoraConfig cfg;
  cfg.r = r;
  cfg.alpha = 8.0f;
  const std::vector<float> W0 = random_vec((std::size_t)out * in, rng);
  const std::vector<float> x = random_vec((std::size_t)T * in, rng);
  // Unmerged: base + LoRA term (eval mode, no dropout).
  std::vector<float> y_sep((std::size_t)T * out);
  matmul_xwt_ref(x.data(), W0.data(), y_sep.data(), T, in, out, false);
  LoraCache cache;
  lora_forward_ref(ad, cfg, x.data(), y_sep.data(), T, false, rng, cache);
  // Merged: one matmul with W + s·B·A.
  std::vector<float> W = W0;
  lora_merge(ad, cfg, W.data());
  std::vector<float> y_merged((std::size_t)T * out);
  matmul_xwt_ref(x.data(), W.data(), y_merged.data(), T, in, out, false);
  // Rounding W' to float32 costs ≤ ε/2·|W'| per weight: ~1e-6 of the output scale.
  CHECK(max_abs_diff(y_sep, y_merged) <= 1e-5 * max_abs(y_sep));
  lora_unmerge(ad, cfg, W.data());
  // Unmerge restores W up to the two float32 roundings of W+Δ and W+Δ−Δ.
  CHECK(max_abs_diff(W, W0) <= 2.0 * 0x1.0p-23 * (max_abs(W0) + 2.0 * cfg.scale() * r));
  CHECK(max_abs_diff(W, W0) > 0.0);  // not bit-exact: a reason to keep the base unmerged while training
}

TEST_CASE("Dropout mask: statistics, scaling and determinism", "[ch04][lora]") {
  const float p = 0.1f;
  const std::int64_t n = 1'000'000;
  std::mt19937_64 rng(42);
  const std::vector<float> mask = lora_dropout_mask(n, p, rng);
  std::int64_t kept = 0, other_values = 0;
  for (float m : mask) {
    kept += m != 0.0f;
    other_values += m != 0.0f && m != 1.0f / (1.0f - p);
  }
  CHECK(other_values == 0);  // every value is 0 or exactly 1/(1−p)
  // Kept fraction: Binomial(n, 1−p)/n with σ = √(p(1−p)/n) = 3e-4; allow 5σ.
  CHECK(std::fabs((double)kept / n - (1.0 - p)) < 5.0 * std::sqrt(p * (1.0 - p) / n));
  // One rng draw is the seed of the hashed mask; the rng moves on by exactly one draw.
  std::mt19937_64 replay(42);
  CHECK(lora_dropout_mask_hashed(n, p, replay()) == mask);
  std::mt19937_64 after(42);
  after.discard(1);
  CHECK(replay() == after());
  std::mt19937_64 again(42), other(43);
  CHECK(lora_dropout_mask(n, p, again) == mask);
  CHECK(lora_dropout_mask(n, p, other) != mask);
  // Eval mode or p = 0 draws nothing from the rng and keeps no mask.
  LoraAdapter ad(4, 3, 2);
  LoraConfig cfg;
  cfg.r = 2;
  std::vector<float> x(8, 1.0f), y(6, 0.0f);
  LoraCache cache;
  std::mt19937_64 r1(9), r2(9);
  lora_forward_ref(ad, cfg, x.data(), y.data(), 2, false, r1, cache);
  CHECK(cache.mask.empty());
  cfg.dropout = 0.0f;
  lora_forward_ref(ad, cfg, x.data(), y.data(), 2, true, r1, cache);
  CHECK(cache.mask.empty());
  CHECK(r1() == r2());
  CHECK_THROWS_AS(lora_dropout_mask(10, 1.0f, rng), std::invalid_argument);
  CHECK_THROWS_AS(lora_dropout_mask(10, -0.1f, rng), std::invalid_argument);
}

TEST_CASE("Hashed dropout mask follows the published splitmix64 sequence", "[ch04][lora]") {
  // Element i's uniform number is the (i+1)-th output of the splitmix64 generator seeded
  // with `seed`, top 24 bits. The reference outputs for seed 1234567 are the published
  // test vector of splitmix64 (Vigna's splitmix64.c, as used by its Java/JS ports).
  const std::uint64_t seed = 1234567;
  const std::uint64_t expected[5] = {6457827717110365317ull, 3203168211198807973ull, 9817491932198370423ull,
                                     4593380528125082431ull, 16408922859458223821ull};
  for (float p : {0.05f, 0.3f, 0.5f, 0.7f, 0.95f}) {
    const std::vector<float> mask = lora_dropout_mask_hashed(5, p, seed);
    for (int i = 0; i < 5; ++i) {
      const float u = static_cast<float>(expected[i] >> 40) * 0x1.0p-24f;
      INFO("p = " << p << ", element " << i << ", u = " << u);
      CHECK(mask[static_cast<std::size_t>(i)] == (u >= p ? 1.0f / (1.0f - p) : 0.0f));
    }
  }
  // Counter-based: a prefix of a longer mask is the shorter mask, element for element.
  const std::vector<float> long_mask = lora_dropout_mask_hashed(1000, 0.4f, 99);
  const std::vector<float> short_mask = lora_dropout_mask_hashed(10, 0.4f, 99);
  CHECK(std::equal(short_mask.begin(), short_mask.end(), long_mask.begin()));
  CHECK(lora_dropout_mask_hashed(0, 0.4f, 99).empty());
  CHECK_THROWS_AS(lora_dropout_mask_hashed(10, 1.0f, 99), std::invalid_argument);
}

TEST_CASE("LoRA rejects inconsistent shapes", "[ch04][lora]") {
  CHECK_THROWS_AS(LoraAdapter(0, 4, 2), std::invalid_argument);
  LoraAdapter ad(4, 3, 2);
  LoraConfig cfg;
  cfg.r = 8;
  std::vector<float> x(4, 1.0f), y(3, 0.0f);
  LoraCache cache;
  std::mt19937_64 rng(1);
  CHECK_THROWS_WITH(lora_forward_ref(ad, cfg, x.data(), y.data(), 1, false, rng, cache),
                    Catch::Contains("rank 2") && Catch::Contains("r 8"));
  cfg.r = 2;
  lora_forward(ad, cfg, x.data(), y.data(), 1, false, rng, cache);
  std::vector<float> dx(4, 0.0f);
  CHECK_THROWS_WITH(lora_backward(ad, cfg, x.data(), y.data(), dx.data(), 2, cache), Catch::Contains("cache"));
}

// ---------------------------------------------------------------- PEFT adapter files

namespace {

std::filesystem::path fresh_dir(const std::string& name) {
  const auto dir = std::filesystem::temp_directory_path() / ("qlora_ch04_" + name + "_" + std::to_string(::getpid()));
  std::filesystem::remove_all(dir);
  return dir;
}

// Two layers of a tiny LLaMA (dim 8, hidden 12), all seven projections, random A and B.
PeftAdapter tiny_adapter() {
  PeftAdapter a;
  a.config.r = 4;
  a.config.alpha = 8.0f;
  a.config.dropout = 0.05f;
  a.config.use_rslora = true;
  a.target_modules = llama_linear_modules();
  a.base_model_name_or_path = "tiny-llama";
  std::mt19937_64 rng(11);
  const int dim = 8, hidden = 12;
  for (int layer = 0; layer < 2; ++layer)
    for (const std::string& m : a.target_modules) {
      const bool mlp = m == "gate_proj" || m == "up_proj" || m == "down_proj";
      const int in = m == "down_proj" ? hidden : dim, out = (m == "gate_proj" || m == "up_proj") ? hidden : dim;
      const std::string name =
          "model.layers." + std::to_string(layer) + (mlp ? ".mlp." : ".self_attn.") + m;
      a.modules.emplace(name, random_adapter(in, out, a.config.r, rng));
    }
  return a;
}

nlohmann::json read_json(const std::filesystem::path& p) {
  std::ifstream in(p);
  return nlohmann::json::parse(in);
}

void write_json(const std::filesystem::path& p, const nlohmann::json& j) {
  std::ofstream(p) << j.dump(2);
}

}  // namespace

TEST_CASE("PEFT adapter folder round trip", "[ch04][peft]") {
  const PeftAdapter a = tiny_adapter();
  const auto dir = fresh_dir("roundtrip");
  write_peft_adapter(dir, a);
  CHECK(std::filesystem::exists(dir / "adapter_model.safetensors"));
  CHECK_FALSE(std::filesystem::exists(dir / "adapter_model.safetensors.tmp"));
  CHECK_FALSE(std::filesystem::exists(dir / "adapter_config.json.tmp"));

  // The tensor names and shapes PEFT expects.
  const SafeTensors st = read_safetensors(dir / "adapter_model.safetensors");
  CHECK(st.tensors.size() == 28);
  const Tensor& qa = st.at("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight");
  CHECK(qa.dtype == DType::F32);
  CHECK(qa.shape == std::vector<std::int64_t>{4, 8});
  CHECK(st.at("base_model.model.model.layers.1.mlp.down_proj.lora_B.weight").shape == std::vector<std::int64_t>{8, 4});
  CHECK(st.at("base_model.model.model.layers.1.mlp.down_proj.lora_A.weight").shape ==
        std::vector<std::int64_t>{4, 12});
  CHECK(st.metadata.at("format") == "pt");

  // The config fields PEFT writes.
  const auto cfg = read_json(dir / "adapter_config.json");
  CHECK(cfg.at("peft_type") == "LORA");
  CHECK(cfg.at("task_type") == "CAUSAL_LM");
  CHECK(cfg.at("r") == 4);
  CHECK(cfg.at("lora_alpha") == 8);
  CHECK(cfg.at("lora_alpha").is_number_integer());
  CHECK(cfg.at("lora_dropout").get<double>() == Approx(0.05));
  CHECK(cfg.at("bias") == "none");
  CHECK(cfg.at("use_rslora") == true);
  CHECK(cfg.at("fan_in_fan_out") == false);
  CHECK(cfg.at("init_lora_weights") == true);
  CHECK(cfg.at("inference_mode") == true);
  CHECK(cfg.at("modules_to_save").is_null());
  CHECK(cfg.at("base_model_name_or_path") == "tiny-llama");
  CHECK(cfg.at("target_modules").get<std::vector<std::string>>() == llama_linear_modules());

  const PeftAdapter b = read_peft_adapter(dir);
  CHECK(b.config.r == 4);
  CHECK(b.config.alpha == 8.0f);
  CHECK(b.config.dropout == 0.05f);
  CHECK(b.config.use_rslora);
  CHECK(b.target_modules == a.target_modules);
  CHECK(b.base_model_name_or_path == "tiny-llama");
  REQUIRE(b.modules.size() == a.modules.size());
  for (const auto& [name, ad] : a.modules) {
    const LoraAdapter& bd = b.modules.at(name);
    CHECK(bd.in == ad.in);
    CHECK(bd.out == ad.out);
    CHECK(bd.A == ad.A);  // F32 on disk: bit-exact
    CHECK(bd.B == ad.B);
  }
  std::filesystem::remove_all(dir);
}

TEST_CASE("PEFT adapter reading reads BF16 weights too", "[ch04][peft]") {
  const PeftAdapter a = tiny_adapter();
  const auto dir = fresh_dir("bf16");
  write_peft_adapter(dir, a);
  SafeTensors st = read_safetensors(dir / "adapter_model.safetensors");
  for (auto& [key, t] : st.tensors) t = Tensor::from_bf16(to_bf16(t.to_f32()), t.shape);
  write_safetensors(dir / "adapter_model.safetensors", st);
  const PeftAdapter b = read_peft_adapter(dir);
  const LoraAdapter& q = b.modules.at("model.layers.0.self_attn.q_proj");
  const LoraAdapter& q0 = a.modules.at("model.layers.0.self_attn.q_proj");
  for (std::size_t k = 0; k < q.A.size(); ++k) CHECK(q.A[k] == round_to_bf16(q0.A[k]));
  std::filesystem::remove_all(dir);
}

TEST_CASE("Bad PEFT adapter folders give clear errors", "[ch04][peft]") {
  const auto dir = fresh_dir("bad");
  const auto cfg_path = dir / "adapter_config.json", st_path = dir / "adapter_model.safetensors";
  auto reset = [&] {
    std::filesystem::remove_all(dir);
    write_peft_adapter(dir, tiny_adapter());
  };
  using Catch::Contains;

  CHECK_THROWS_WITH(read_peft_adapter(dir), Contains("not a directory"));

  SECTION("missing files") {
    reset();
    std::filesystem::remove(cfg_path);
    CHECK_THROWS_WITH(read_peft_adapter(dir), Contains("adapter_config.json") && Contains("cannot open"));
    reset();
    std::filesystem::remove(st_path);
    CHECK_THROWS_WITH(read_peft_adapter(dir), Contains("adapter_model.safetensors") && Contains("missing"));
  }
  SECTION("bad JSON") {
    reset();
    std::ofstream(cfg_path) << "{\"r\": 4,";
    CHECK_THROWS_WITH(read_peft_adapter(dir), Contains("adapter_config.json") && Contains("not valid JSON"));
  }
  SECTION("config keys") {
    struct Case {
      std::string key;
      nlohmann::json value;  // null = remove the key
      std::string message;
    };
    const std::vector<Case> cases = {
        {"r", nullptr, "key 'r': missing"},
        {"lora_alpha", nullptr, "key 'lora_alpha': missing"},
        {"target_modules", nullptr, "key 'target_modules': missing"},
        {"peft_type", "PREFIX_TUNING", "key 'peft_type'"},
        {"r", 0, "key 'r'"},
        {"r", "eight", "key 'r'"},
        {"lora_dropout", 1.5, "key 'lora_dropout'"},
        {"target_modules", nlohmann::json::array({"q_proj", "lm_head"}), "unknown module 'lm_head'"},
        {"target_modules", "all-linear", "key 'target_modules'"},
        {"bias", "all", "key 'bias'"},
        {"use_dora", true, "key 'use_dora'"},
        {"rank_pattern", nlohmann::json{{"q_proj", 8}}, "key 'rank_pattern'"},
    };
    for (const Case& c : cases) {
      reset();
      auto j = read_json(cfg_path);
      if (c.value.is_null())
        j.erase(c.key);
      else
        j[c.key] = c.value;
      write_json(cfg_path, j);
      INFO(c.key << " = " << c.value.dump());
      CHECK_THROWS_WITH(read_peft_adapter(dir), Contains("adapter_config.json") && Contains(c.message));
    }
  }
  SECTION("shape mismatch against r") {
    reset();
    auto j = read_json(cfg_path);
    j["r"] = 8;
    write_json(cfg_path, j);
    CHECK_THROWS_WITH(read_peft_adapter(dir), Contains("adapter_model.safetensors") && Contains("lora_A.weight") &&
                                                  Contains("shape must be [r=8, in]"));
  }
  SECTION("tensors") {
    const std::string ka = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
    const std::string kb = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";
    auto edit = [&](const std::function<void(SafeTensors&)>& f) {
      reset();
      SafeTensors st = read_safetensors(st_path);
      f(st);
      write_safetensors(st_path, st);
    };
    edit([&](SafeTensors& st) { st.tensors.erase(kb); });
    CHECK_THROWS_WITH(read_peft_adapter(dir), Contains(kb) && Contains("missing"));
    edit([&](SafeTensors& st) { st.tensors.erase(ka); });
    CHECK_THROWS_WITH(read_peft_adapter(dir), Contains(ka) && Contains("missing"));
    edit([&](SafeTensors& st) {
      const std::vector<float> b(8 * 3, 0.5f);
      st.tensors[kb] = Tensor::from_f32(b, {8, 3});
    });
    CHECK_THROWS_WITH(read_peft_adapter(dir), Contains(kb) && Contains("shape must be [out, r=4]"));
    edit([&](SafeTensors& st) {
      st.tensors["base_model.model.lm_head.lora_A.weight"] = st.at(ka);
      st.tensors["base_model.model.lm_head.lora_B.weight"] = st.at(kb);
    });
    CHECK_THROWS_WITH(read_peft_adapter(dir), Contains("lm_head") && Contains("unknown module"));
    edit([&](SafeTensors& st) { st.tensors["model.embed_tokens.weight"] = st.at(ka); });
    CHECK_THROWS_WITH(read_peft_adapter(dir), Contains("model.embed_tokens.weight") && Contains("not a LoRA weight"));
    edit([&](SafeTensors& st) {
      const std::vector<std::uint8_t> u(4 * 8, 1);
      st.tensors[ka] = Tensor::from_u8(u, {4, 8});
    });
    CHECK_THROWS_WITH(read_peft_adapter(dir), Contains(ka) && Contains("dtype U8"));
  }
  SECTION("truncated weights file") {
    reset();
    std::filesystem::resize_file(st_path, std::filesystem::file_size(st_path) - 16);
    CHECK_THROWS_WITH(read_peft_adapter(dir), Contains("adapter_model.safetensors"));
  }
  std::filesystem::remove_all(dir);
}

TEST_CASE("Writing refuses adapters that PEFT could not load", "[ch04][peft]") {
  PeftAdapter a = tiny_adapter();
  a.target_modules = {"q_proj", "v_proj"};
  CHECK_THROWS_WITH(write_peft_adapter(fresh_dir("refuse"), a), Catch::Contains("not covered by target_modules"));
  a = tiny_adapter();
  a.modules.at("model.layers.0.self_attn.q_proj") = LoraAdapter(8, 8, 2);
  CHECK_THROWS_WITH(write_peft_adapter(fresh_dir("refuse"), a), Catch::Contains("has rank 2 but r is 4"));
}

// ---------------------------------------------------------------- memory plan

TEST_CASE("Parameter counts of the LLaMA shapes", "[ch04][plan]") {
  // LLaMA-7B (= Llama-2-7B shapes): 6,738,415,616 parameters; PEFT's
  // print_trainable_parameters with r = 8 on all seven projections reports
  // "trainable params: 19,988,480 || all params: 6,758,404,096" (base + LoRA).
  const auto& s7 = llama_shape("7B");
  CHECK(count_params(s7).total() == 6'738'415'616LL);
  CHECK(lora_param_count(s7, 8) == 19'988'480LL);
  CHECK(count_params(s7).total() + lora_param_count(s7, 8) == 6'758'404'096LL);
  CHECK(lora_param_count(s7, 64) == 8 * lora_param_count(s7, 8));  // linear in r
  CHECK(count_params(llama_shape("13b")).total() == 13'015'864'320LL);
  CHECK(count_params(llama_shape("33B")).total() == 32'528'943'616LL);
  CHECK(count_params(llama_shape("65B")).total() == 65'285'660'672LL);
  CHECK(lora_param_count(llama_shape("65B"), 64) == 799'539'200LL);
  CHECK_THROWS_WITH(llama_shape("70B"), Catch::Contains("unknown model size '70B'"));
}

TEST_CASE("Memory plan: 780 GB for full fine-tuning of 65B, under 48 GB with QLoRA", "[ch04][plan]") {
  CHECK(quant4_bits_per_param(false) == 4.5);
  CHECK(quant4_bits_per_param(true) == 4.126953125);  // 4 + 8/64 + 32/(64·256)
  const MemoryPlan m = plan_memory(llama_shape("65B"), 64);
  CHECK(m.full_finetune == 12.0 * 65'285'660'672.0);
  CHECK(m.full_finetune > 780e9);  // the paper's ">780 GB"
  CHECK(m.full_finetune / 1e9 == Approx(783.43).margin(0.01));
  CHECK(m.base_bf16 / 1e9 == Approx(130.57).margin(0.01));
  CHECK(m.base_nf4_dq / 1e9 == Approx(34.46).margin(0.01));
  CHECK(m.lora_training / 1e9 == Approx(12.79).margin(0.01));
  CHECK(m.qlora_total < 48e9);  // the paper's "<48 GB"
  CHECK(m.qlora_total / 1e9 == Approx(47.25).margin(0.01));
  CHECK(m.lora_percent == Approx(1.225).margin(0.001));
  const MemoryPlan s = plan_memory(llama_shape("7B"), 8);
  CHECK(s.lora_percent == Approx(0.297).margin(0.001));
  CHECK(s.base_nf4 > s.base_nf4_dq);
  CHECK(s.base_bf16 / s.base_nf4_dq > 3.4);
}

TEST_CASE("qlora plan --json prints the same numbers", "[ch04][plan][cli]") {
  std::string out;
  REQUIRE(run_cli("plan --model 65B -r 64 --json", out) == 0);
  const auto j = nlohmann::json::parse(out);
  REQUIRE(j.at("plans").size() == 1);
  const auto& row = j.at("plans")[0];
  CHECK(row.at("model") == "65B");
  CHECK(row.at("base_params") == 65'285'660'672LL);
  CHECK(row.at("lora_params") == 799'539'200LL);
  CHECK(row.at("qlora_total_bytes").get<double>() == plan_memory(llama_shape("65B"), 64).qlora_total);
  CHECK(run_cli("plan --model 70B 2>&1", out) != 0);
  CHECK_THAT(out, Catch::Contains("unknown model size '70B'"));
}

// ---------------------------------------------------------------- merging into a 4-bit base

TEST_CASE("Requantizing a merge with a zero update gives back the base", "[ch04][merge]") {
  std::mt19937_64 rng(8);
  const int in = 96, out = 40;
  const auto W = normal_weights((std::size_t)in * out, 0.02, rng);
  const Quant4Tensor base = quantize_4bit(W, {out, in}, QuantType::nf4, 64, false);
  LoraConfig cfg;
  cfg.r = 4;
  LoraAdapter ad(in, out, cfg.r);
  ad.init_peft(rng);  // B = 0: s·B·A = 0
  // Each block's largest value sits exactly on the code ±1, so its absmax and all codes repeat.
  const Quant4Tensor again = merge_into_quant4(base, ad, cfg);
  CHECK(again.packed == base.packed);
  CHECK(again.absmax == base.absmax);
  const auto as_bf16 = merge_into_bf16(base, ad, cfg);
  const auto ref = dequantize_4bit_bf16(base);
  CHECK(as_bf16 == ref);
}

TEST_CASE("Merge error: requantizing loses a small update, BF16 keeps it", "[ch04][merge]") {
  std::mt19937_64 rng(2023);
  const int in = 256, out = 128;
  const auto W = normal_weights((std::size_t)in * out, 0.02, rng);
  LoraConfig cfg;
  cfg.r = 8;
  cfg.alpha = 16.0f;
  double weight_rms = 0.0;
  for (float w : W) weight_rms += (double)w * w;
  weight_rms = std::sqrt(weight_rms / (double)W.size());
  CHECK(weight_rms == Approx(0.02).epsilon(0.02));

  const LoraAdapter small = synthetic_adapter(in, out, cfg, 0.001 * weight_rms, rng);
  const MergeError s = measure_merge_error(W, small, cfg, QuantType::nf4, 64, true);
  CHECK(s.delta_rms == Approx(0.001 * weight_rms).epsilon(1e-3));  // the adapter has the asked-for size
  // NF4 steps are ~10% of the weights' scale: an update of 0.1% is rounded away,
  // so the requantized merge misses about all of it (error ≈ the update itself).
  CHECK(s.q4_delta_rel > 0.9);
  CHECK(s.base_quant_rms > 50.0 * s.delta_rms);

  const LoraAdapter big = synthetic_adapter(in, out, cfg, 0.1 * weight_rms, rng);
  const MergeError b = measure_merge_error(W, big, cfg, QuantType::nf4, 64, true);
  // BF16 rounding costs at most half an ulp, 2^-8 of each value's size; over many values
  // its RMS is about 2^-9 of theirs (0.85·2^-9 here), which is what is asserted.
  CHECK(b.bf16_rms <= 0x1.0p-9 * 1.01 * std::sqrt(weight_rms * weight_rms + b.delta_rms * b.delta_rms));
  CHECK(b.bf16_delta_rel < 0.05);
  // Requantizing costs about one more round of 4-bit quantization error.
  CHECK(b.q4_rms > 0.5 * b.base_quant_rms);
  CHECK(b.q4_rms < 1.5 * b.base_quant_rms);
  CHECK(b.q4_delta_rel > 10.0 * b.bf16_delta_rel);
}

TEST_CASE("qlora merge-error runs and names a missing model", "[ch04][merge][cli]") {
  std::string out;
  REQUIRE(run_cli("merge-error --in 128 --out 64 -r 4 --json", out) == 0);
  const auto j = nlohmann::json::parse(out);
  REQUIRE(j.at("rows").size() == 3);
  CHECK(j.at("rows")[0].at("q4_delta_rel").get<double>() > 0.9);
  CHECK(j.at("double_quant") == true);
  CHECK(run_cli(std::string("merge-error --model ") + QLORA_FIXTURES_DIR + "/no_such_model 2>&1", out) != 0);
  CHECK_THAT(out, Catch::Contains("no_such_model"));
  // alpha 0 would scale every adapter to zero and divide by it: refused, naming the flag.
  CHECK(run_cli("merge-error --alpha 0 2>&1", out) != 0);
  CHECK_THAT(out, Catch::Contains("--alpha") && Catch::Contains("must be > 0"));
}

// ---------------------------------------------------------------- one training step (chapter 7)

TEST_CASE("Memory plan of a training step: its parts, and what each setting changes", "[ch04][plan]") {
  const LlamaConfig c7 = model_shape("7b");
  TrainingSetup s;  // batch 4 × 512, r 64, NF4+DQ, paged AdamW, checkpointing
  const TrainingMemoryPlan p = plan_training_memory(c7, s);
  double sum = 0;
  for (const MemoryItem& i : p.items) sum += i.bytes;
  CHECK(p.total() == sum);
  for (const char* g : {"context", "frozen weights", "LoRA + gradients", "optimizer states", "activations kept", "workspaces"})
    CHECK(p.group(g) > 0);
  // Frozen weights: the stored bytes (4.127 bits per projection weight, BF16 embedding and
  // classifier) plus what allocation rounding adds, under 2% at 7B.
  const MemoryPlan stored = plan_memory(llama_shape("7B"), 64);
  CHECK(p.group("frozen weights") >= stored.base_nf4_dq);
  CHECK(p.group("frozen weights") < 1.02 * stored.base_nf4_dq);
  // LoRA: 8 bytes per parameter (A, B and their gradients) and AdamW's 8, rounded per tensor.
  const double lora = static_cast<double>(lora_param_count(llama_shape("7B"), 64));
  CHECK(p.group("optimizer states") == Approx(8 * lora).epsilon(1e-3));
  CHECK(p.group("LoRA + gradients") >= 8 * lora);
  CHECK(p.group("LoRA + gradients") < 1.25 * 8 * lora);
  // Checkpointing keeps one float32 input per layer: 32 × 2048 × 4096 × 4 bytes = 1 GiB.
  auto item = [](const TrainingMemoryPlan& t, const std::string& name) {
    for (const MemoryItem& i : t.items)
      if (i.name == name) return i.bytes;
    FAIL("no item " << name);
    return 0.0;
  };
  CHECK(item(p, "layer inputs") == 32.0 * 2048 * 4096 * 4);
  TrainingSetup off = s;
  off.offload_checkpoints = true;
  CHECK(item(plan_training_memory(c7, off), "layer inputs") == 2048.0 * 4096 * 4);  // one, staged back
  TrainingSetup all = s;
  all.checkpointing = false;
  CHECK(item(plan_training_memory(c7, all), "layer activations") == 32 * item(p, "layer activations"));
  TrainingSetup host = s;
  host.states_on_device = false;
  CHECK(plan_training_memory(c7, host).group("optimizer states") == 0);
  TrainingSetup eight = s;
  eight.optim = OptimKind::paged_adamw8bit;
  CHECK(plan_training_memory(c7, eight).group("optimizer states") < 0.3 * p.group("optimizer states"));
  TrainingSetup nodrop = s;
  nodrop.dropout = 0;
  CHECK(item(plan_training_memory(c7, nodrop), "LoRA scratch") < item(p, "LoRA scratch") / 100);
  // The chunked head holds 64 MiB of float32 logits, even for LLaMA-3's 128k words.
  const TrainingMemoryPlan l3 = plan_training_memory(model_shape("llama3-8b"), s);
  CHECK(item(l3, "logits and loss") < 65.0 * 1048576);
  s.batch = 0;
  CHECK_THROWS_WITH(plan_training_memory(c7, s), Catch::Contains("batch"));
}

TEST_CASE("cudaMalloc footprints as measured: 8 KiB granules up to 1 MiB, 2 MiB above", "[ch04][plan]") {
  const double MiB = 1048576;
  CHECK(cuda_malloc_footprint(4096) == 8192);
  CHECK(cuda_malloc_footprint(MiB) == MiB);
  CHECK(cuda_malloc_footprint(MiB + 4096) == 2 * MiB);
  CHECK(cuda_malloc_footprint(2.6875 * MiB) == 4 * MiB);
  CHECK(cuda_malloc_footprint(21 * MiB) == 22 * MiB);
  CHECK(cuda_malloc_footprint(0) == 0);
}

TEST_CASE("qlora plan --batch plans a training step, by name or config.json", "[ch04][plan][cli]") {
  std::string out;
  REQUIRE(run_cli("plan --model 7b 65b -r 64 --batch 1 --json", out) == 0);
  const auto j = nlohmann::json::parse(out);
  REQUIRE(j.at("training_plans").size() == 2);
  const auto& row = j.at("training_plans")[0];
  TrainingSetup s;
  s.batch = 1;
  CHECK(row.at("total_bytes").get<double>() == plan_training_memory(model_shape("7b"), s).total());
  CHECK(run_cli("plan --model 8b --batch 1 2>&1", out) != 0);
  CHECK_THAT(out, Catch::Contains("unknown model shape '8b'"));
}

TEST_CASE("After an out-of-memory error, the plan names the settings that fit", "[ch04][plan]") {
  constexpr double GiB = 1073741824.0;
  TrainingSetup s;  // batch 4 × 512, r 64, checkpointing, states on the device
  const std::string seven = fit_advice(model_shape("7b"), s, 9.0 * GiB);
  CHECK_THAT(seven, Catch::Contains("this run needs about 9.45 GiB") && Catch::Contains("the device has 9.00 GiB"));
  CHECK_THAT(seven, Catch::Contains("--batch 2") && Catch::Contains("--offload-checkpoints") &&
                        Catch::Contains("optimizer states in host memory"));
  s.batch = 1;
  const std::string sixty_five = fit_advice(model_shape("65b"), s, 42.0 * GiB);
  CHECK_THAT(sixty_five, Catch::Contains("optimizer states in host memory") && Catch::Contains("about 41.64 GiB"));
  CHECK_THAT(sixty_five, !Catch::Contains("--offload-checkpoints:"));  // 46.4 GiB: does not fit alone
  s.batch = 4;
  const std::string together = fit_advice(model_shape("65b"), s, 42.0 * GiB);
  CHECK_THAT(together, Catch::Contains("No single change fits; together, --batch 2") &&
                           Catch::Contains("--offload-checkpoints"));
  CHECK_THAT(fit_advice(model_shape("65b"), s, 30.0 * GiB), Catch::Contains("Nothing fits"));
}
