// Chapter 6: AdamW (FP32 states), gradient clipping, 8-bit blockwise AdamW and the
// optimizer state files, on the CPU. The GPU versions are checked against these
// references in test_ch06_gpu_optim.cpp.
#include "adamw.hpp"
#include "adamw8bit.hpp"
#include "dynamic_map.hpp"
#include "safetensors.hpp"

#include <catch2/catch.hpp>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <unistd.h>
#include <random>
#include <span>
#include <string>
#include <vector>

using namespace qlora;
namespace fs = std::filesystem;

namespace {

fs::path temp_dir(const std::string& name) {
  fs::path d = fs::temp_directory_path() / ("qlora_ch06_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

/// A small quadratic problem: f(p) = ½ Σ a_i (p_i − c_i)², gradient a_i (p_i − c_i).
/// The curvatures a_i span four orders of magnitude, which is where Adam's per-coordinate
/// scaling matters.
struct Quadratic {
  std::vector<double> a, c;
  explicit Quadratic(std::size_t n, unsigned seed, double log10_range = 2.0) {
    std::mt19937 rng(seed);
    std::uniform_real_distribution<double> loga(-log10_range, log10_range), cc(-1.0, 1.0);
    for (std::size_t i = 0; i < n; ++i) {
      a.push_back(std::pow(10.0, loga(rng)));
      c.push_back(cc(rng));
    }
  }
  template <class T>
  void grad(const std::vector<T>& p, std::vector<T>& g) const {
    for (std::size_t i = 0; i < p.size(); ++i) g[i] = static_cast<T>(a[i] * (double(p[i]) - c[i]));
  }
  template <class T>
  double loss(const std::vector<T>& p) const {
    double f = 0;
    for (std::size_t i = 0; i < p.size(); ++i) f += 0.5 * a[i] * (double(p[i]) - c[i]) * (double(p[i]) - c[i]);
    return f;
  }
};

/// An independent AdamW in double, written the way the PyTorch documentation states the
/// algorithm (explicit m̂ and v̂), not the way adamw_update() arranges the arithmetic.
struct AdamWDouble {
  double lr, b1, b2, eps, wd;
  std::vector<double> m, v;
  int t = 0;
  void step(std::vector<double>& p, const std::vector<double>& g) {
    if (m.empty()) m.assign(p.size(), 0.0), v.assign(p.size(), 0.0);
    ++t;
    for (std::size_t i = 0; i < p.size(); ++i) {
      p[i] -= lr * wd * p[i];
      m[i] = b1 * m[i] + (1 - b1) * g[i];
      v[i] = b2 * v[i] + (1 - b2) * g[i] * g[i];
      const double mhat = m[i] / (1 - std::pow(b1, t));
      const double vhat = v[i] / (1 - std::pow(b2, t));
      p[i] -= lr * mhat / (std::sqrt(vhat) + eps);
    }
  }
};

}  // namespace

TEST_CASE("ch06: AdamW: one step matches the hand-computed update", "[ch06][adamw]") {
  // Step 1 with β1 = 0.9, β2 = 0.999: m = 0.1 g, v = 0.001 g², m̂ = g, v̂ = g², so
  // p ← p(1 − lr·λ) − lr · g / (|g| + ε).
  std::vector<float> p = {1.0f, -2.0f}, g = {0.5f, -0.1f};
  AdamW opt({{"w", p.data(), g.data(), p.size()}}, AdamWConfig{0.9f, 0.999f, 1e-8f, 0.01f});
  opt.step(0.1f);
  CHECK(p[0] == Approx(1.0 * (1 - 0.1 * 0.01) - 0.1 * 0.5 / (0.5 + 1e-8)).epsilon(1e-6));
  CHECK(p[1] == Approx(-2.0 * (1 - 0.1 * 0.01) + 0.1 * 0.1 / (0.1 + 1e-8)).epsilon(1e-6));
  CHECK(opt.exp_avg(0)[0] == Approx(0.05).epsilon(1e-6));
  // 1 − β2 in float is 1 − 0.999f = 0.00099998713 (0.999 is not a binary fraction): rel. 1.3e-5 off.
  CHECK(opt.exp_avg_sq(0)[1] == Approx(0.001 * 0.01).epsilon(2e-5));
  CHECK(opt.steps() == 1);
}

TEST_CASE("ch06: AdamW: bias correction makes every step of a constant gradient move by lr", "[ch06][adamw]") {
  // With a constant gradient g, m_t = (1 − β1ᵗ) g and v_t = (1 − β2ᵗ) g², so the corrected
  // m̂ = g and v̂ = g² at every t and each step moves p by lr·g/(|g| + ε) ≈ lr, whatever |g| is.
  // Without the correction the first step would move by lr·(1 − β1)/√(1 − β2) ≈ 3.16·lr.
  for (float gv : {1e-3f, 1.0f, 1e3f}) {
    std::vector<float> p = {0.0f}, g = {gv};
    AdamW opt({{"w", p.data(), g.data(), 1}}, AdamWConfig{0.9f, 0.999f, 1e-8f, 0.0f});
    for (int t = 1; t <= 20; ++t) {
      const float before = p[0];
      opt.step(0.01f);
      INFO("g = " << gv << ", step " << t);
      CHECK(before - p[0] == Approx(0.01).epsilon(1e-4));
    }
  }
}

TEST_CASE("ch06: AdamW: weight decay is decoupled from the gradient", "[ch06][adamw]") {
  // A zero gradient leaves m = v = 0 and the Adam term 0/(0 + ε) = 0, so only the decay acts:
  // p_k = p_0 (1 − lr·λ)^k exactly as AdamW (not Adam with L2, which would scale it by 1/ε).
  std::vector<float> p = {2.0f, -0.5f}, g = {0.0f, 0.0f};
  AdamW opt({{"w", p.data(), g.data(), 2}}, AdamWConfig{0.9f, 0.999f, 1e-8f, 0.1f});
  for (int k = 0; k < 10; ++k) opt.step(0.05f);
  CHECK(p[0] == Approx(2.0 * std::pow(1 - 0.05 * 0.1, 10)).epsilon(1e-6));
  CHECK(p[1] == Approx(-0.5 * std::pow(1 - 0.05 * 0.1, 10)).epsilon(1e-6));
}

TEST_CASE("ch06: AdamW: 300-step trajectory on a quadratic matches an independent FP64 AdamW", "[ch06][adamw]") {
  const Quadratic q(64, 7);
  const AdamWConfig cfg{0.9f, 0.999f, 1e-8f, 0.01f};
  std::vector<float> p(64), g(64);
  std::vector<double> pd(64), gd(64);
  for (std::size_t i = 0; i < 64; ++i) p[i] = static_cast<float>(pd[i] = 0.5 * std::sin(double(i)));
  // Two tensors, to exercise the per-tensor loop: the first 40 and the last 24 elements.
  AdamW opt({{"a", p.data(), g.data(), 40}, {"b", p.data() + 40, g.data() + 40, 24}}, cfg);
  AdamWDouble ref{1e-2, 0.9, 0.999, 1e-8, 0.01, {}, {}};
  const double loss0 = q.loss(pd);
  double max_err = 0;
  for (int t = 0; t < 300; ++t) {
    q.grad(p, g);
    q.grad(pd, gd);
    opt.step(1e-2f);
    ref.step(pd, gd);
    for (std::size_t i = 0; i < 64; ++i) max_err = std::max(max_err, std::abs(double(p[i]) - pd[i]));
  }
  // Each step changes p by at most ~lr = 1e-2; float rounding of that change is ~1e-9 and of
  // the O(1) parameter ~6e-8 per step, so 300 steps stay far below 1e-5 even if every
  // rounding error added up. A wrong formula (missing correction, ε inside the root, coupled
  // decay) is off by ≥ 1e-3 within the first steps.
  INFO("max |p_float − p_double| over 300 steps = " << max_err);
  CHECK(max_err < 1e-5);
  CHECK(q.loss(pd) < 0.05 * loss0);  // the trajectory actually optimizes
}

TEST_CASE("ch06: clip_grad_norm: torch semantics over all tensors", "[ch06][clip]") {
  std::vector<float> g1 = {3.0f, 4.0f}, g2 = {12.0f};  // global norm 13
  std::vector<std::span<float>> gs = {g1, g2};
  const double norm = clip_grad_norm(gs, 0.3);
  CHECK(norm == Approx(13.0));
  const double s = 0.3 / (13.0 + 1e-6);
  CHECK(g1[0] == Approx(3.0 * s).epsilon(1e-6));
  CHECK(g1[1] == Approx(4.0 * s).epsilon(1e-6));
  CHECK(g2[0] == Approx(12.0 * s).epsilon(1e-6));
  std::vector<std::span<const float>> cg = {g1, g2};
  CHECK(global_grad_norm(cg) == Approx(0.3).epsilon(1e-6));

  // Below the threshold nothing changes.
  std::vector<float> h = {0.1f, 0.2f};
  std::vector<std::span<float>> hs = {h};
  CHECK(clip_grad_norm(hs, 1.0) == Approx(std::sqrt(0.05)));
  CHECK(h[0] == 0.1f);
  CHECK(h[1] == 0.2f);
  CHECK_THROWS_AS(clip_grad_norm(hs, 0.0), std::invalid_argument);
}

TEST_CASE("ch06: AdamW: state save/load round trip continues bit-identically", "[ch06][adamw][state]") {
  const auto dir = temp_dir("state");
  const Quadratic q(300, 3);
  std::vector<float> p(300, 0.25f), g(300), p2, g2(300);
  AdamW a({{"x", p.data(), g.data(), 200}, {"y", p.data() + 200, g.data() + 200, 100}});
  for (int t = 0; t < 5; ++t) {
    q.grad(p, g);
    a.step(1e-3f);
  }
  a.save_state(dir / "optimizer.safetensors");
  CHECK_FALSE(fs::exists(dir / "optimizer.safetensors.tmp"));
  p2 = p;
  AdamW b({{"x", p2.data(), g2.data(), 200}, {"y", p2.data() + 200, g2.data() + 200, 100}});
  b.load_state(dir / "optimizer.safetensors");
  CHECK(b.steps() == 5);
  for (int t = 0; t < 5; ++t) {
    q.grad(p, g);
    q.grad(p2, g2);
    a.step(1e-3f);
    b.step(1e-3f);
  }
  CHECK(p == p2);
  fs::remove_all(dir);
}

TEST_CASE("ch06: AdamW: bad state files give clear errors and leave the optimizer unchanged", "[ch06][adamw][state]") {
  const auto dir = temp_dir("badstate");
  std::vector<float> p(10, 1.0f), g(10, 0.5f);
  AdamW a({{"w", p.data(), g.data(), 10}});
  a.step(1e-3f);
  const fs::path good = dir / "good.safetensors";
  a.save_state(good);

  // Truncated file: the safetensors reader names the file.
  const fs::path cut = dir / "cut.safetensors";
  fs::copy_file(good, cut);
  fs::resize_file(cut, fs::file_size(good) - 7);
  CHECK_THROWS_WITH(a.load_state(cut), Catch::Contains("cut.safetensors"));

  // A state for a parameter of another size: names the tensor and both sizes.
  std::vector<float> q(12, 1.0f), gq(12, 0.0f);
  AdamW other({{"w", q.data(), gq.data(), 12}});
  CHECK_THROWS_WITH(other.load_state(good), Catch::Contains("w.exp_avg") && Catch::Contains("12"));

  // A state for another parameter name.
  AdamW renamed({{"v", p.data(), g.data(), 10}});
  CHECK_THROWS_WITH(renamed.load_state(good), Catch::Contains("v.exp_avg"));

  // A file with a non-numeric step.
  SafeTensors st = read_safetensors(good);
  st.metadata["step"] = "seven";
  write_safetensors(dir / "step.safetensors", st);
  CHECK_THROWS_WITH(a.load_state(dir / "step.safetensors"), Catch::Contains("step") && Catch::Contains("seven"));

  // Not an optimizer state at all.
  st.metadata.erase("optimizer");
  write_safetensors(dir / "noopt.safetensors", st);
  CHECK_THROWS_WITH(a.load_state(dir / "noopt.safetensors"), Catch::Contains("optimizer"));

  CHECK_THROWS_WITH(a.load_state(dir / "missing.safetensors"), Catch::Contains("missing.safetensors"));
  CHECK(a.steps() == 1);  // failed loads changed nothing
  fs::remove_all(dir);
}

TEST_CASE("ch06: AdamW: invalid parameter lists are rejected", "[ch06][adamw]") {
  std::vector<float> p(4), g(4);
  CHECK_THROWS_AS(AdamW({{"", p.data(), g.data(), 4}}), std::invalid_argument);
  CHECK_THROWS_AS(AdamW({{"w", nullptr, g.data(), 4}}), std::invalid_argument);
  CHECK_THROWS_WITH(AdamW({{"w", p.data(), g.data(), 2}, {"w", p.data() + 2, g.data() + 2, 2}}),
                    Catch::Contains("'w'"));
}

// ---------------------------------------------------------------------------------------
// 8-bit blockwise AdamW
// ---------------------------------------------------------------------------------------

TEST_CASE("ch06: 8-bit states: blockwise round trip rounds to the nearest code", "[ch06][adamw8bit]") {
  // States of a realistic shape: m ~ N(0, σ²) with σ varying per block, v = m²-like positive.
  std::mt19937 rng(11);
  std::normal_distribution<float> nd;
  const std::size_t n = 64 * kOptimBlock;
  std::vector<float> m(n), v(n);
  for (std::size_t i = 0; i < n; ++i) {
    const float scale = std::pow(10.0f, -3.0f + 0.1f * static_cast<float>(i / kOptimBlock));
    m[i] = scale * nd(rng);
    v[i] = scale * scale * nd(rng) * nd(rng);
    v[i] = std::abs(v[i]);
  }
  for (int which = 0; which < 2; ++which) {
    const auto& map = which == 0 ? adam8bit_map1() : adam8bit_map2();
    const auto& x = which == 0 ? m : v;
    double worst_rel_to_absmax = 0;
    int not_nearest = 0;
    for (std::size_t base = 0; base < n; base += kOptimBlock) {
      float absmax = 0;
      for (std::size_t j = 0; j < kOptimBlock; ++j) absmax = std::max(absmax, std::abs(x[base + j]));
      for (std::size_t j = 0; j < kOptimBlock; ++j) {
        const float xi = x[base + j];
        const std::uint8_t c = requantize_state(xi, absmax, map, which == 0);
        const float back = map[c] * absmax;
        // Nearest code: no other code is closer (up to float rounding of the normalisation).
        const float r = xi / absmax;
        for (int k = 0; k < 256; ++k) {
          if (which == 0 && std::signbit(map[k]) != std::signbit(xi)) continue;  // sign fix excludes them
          if (std::abs(map[c] - r) > std::abs(map[k] - r) + 1e-7f) {
            ++not_nearest;
            UNSCOPED_INFO("state " << which << ": x/absmax = " << r << " got code " << int(c) << " ("
                                   << map[c] << "), code " << k << " (" << map[k] << ") is nearer");
          }
        }
        worst_rel_to_absmax = std::max(worst_rel_to_absmax, double(std::abs(back - xi)) / absmax);
        if (which == 0 && std::signbit(back) != std::signbit(xi)) ++not_nearest;
      }
    }
    CHECK(not_nearest == 0);
    // The widest gap of either map is between its top codes (0.9/64 ≈ 0.0141 for the signed
    // map, half of that for the unsigned one), so no value is off by more than 0.00704·absmax.
    INFO("state " << which << ": max |x − deq(q(x))| / absmax = " << worst_rel_to_absmax);
    CHECK(worst_rel_to_absmax <= 0.00704);
  }
}

TEST_CASE("ch06: 8-bit states: the sign fix keeps tiny negative momenta negative", "[ch06][adamw8bit]") {
  const auto& map = adam8bit_map1();
  const std::uint8_t plain = quantize_dynamic(-1e-9f, map);
  CHECK(map[plain] == 0.0f);  // nearest code is zero ...
  const std::uint8_t fixed = requantize_state(-1e-9f, 1.0f, map, true);
  CHECK(map[fixed] < 0.0f);   // ... but the optimizer keeps the direction
  CHECK(fixed == plain - 1);
  CHECK(map[requantize_state(0.0f, 0.0f, map, true)] == 0.0f);  // an all-zero block
}

TEST_CASE("ch06: 8-bit AdamW: the first step equals FP32 AdamW (updates use the unquantized states)",
          "[ch06][adamw8bit]") {
  // At step 1 the dequantized old states are exactly 0, so the float states of the step are
  // exactly FP32 AdamW's; the parameter update uses them before requantization, so the two
  // optimizers agree up to the rearranged arithmetic (a few float roundings: 1e-6 relative
  // of the update, far below the 8-bit quantization error of ~1e-2 that a wrong order shows).
  const std::size_t n = 5000;
  std::mt19937 rng(5);
  std::normal_distribution<float> nd;
  std::vector<float> p8(n), p32(n), g(n);
  for (std::size_t i = 0; i < n; ++i) {
    p8[i] = p32[i] = nd(rng);
    g[i] = 1e-2f * nd(rng);
  }
  const AdamWConfig cfg{0.9f, 0.999f, 1e-8f, 0.0f};
  AdamW8bit a8({{"w", p8.data(), g.data(), n}}, cfg);
  AdamW a32({{"w", p32.data(), g.data(), n}}, cfg);
  REQUIRE(a8.is_8bit(0));
  const std::vector<float> p0 = p32;
  a8.step(1e-3f);
  a32.step(1e-3f);
  // p ≈ 1 and the update ≈ 1e-3; a float ulp of p is 1.2e-7, the quantization error of the
  // states (if the update used them) would be ~0.7 % of 1e-3 = 7e-6.
  double worst = 0;
  for (std::size_t i = 0; i < n; ++i) worst = std::max(worst, double(std::abs(p8[i] - p32[i])) / std::abs(p0[i]));
  INFO("max |p8 − p32| / |p| after one step = " << worst);
  CHECK(worst <= 3e-7);
  CHECK(p8 != p0);
  // The stored states are the quantized FP32 states: within half the widest code gap.
  const auto m8 = a8.exp_avg(0);
  const auto m32 = a32.exp_avg(0);
  const auto& ab = a8.state(0).absmax1;
  for (std::size_t i = 0; i < n; ++i) CHECK(std::abs(m8[i] - m32[i]) <= 0.00704f * ab[i / kOptimBlock]);
}

TEST_CASE("ch06: 8-bit AdamW: trajectory stays close to FP32 AdamW on a noisy quadratic", "[ch06][adamw8bit]") {
  // Stochastic gradients, as in training: g = a(p − c) + 0.1·ξ with the same noise ξ for both
  // optimizers; curvatures a in [0.1, 10].
  const std::size_t n = 3 * kMin8bitSize + 77;  // a partial last block too
  const Quadratic q(n, 21, 1.0);
  const AdamWConfig cfg{0.9f, 0.999f, 1e-8f, 0.0f};
  std::vector<float> p8(n), p32(n), g8(n), g32(n);
  for (std::size_t i = 0; i < n; ++i) p8[i] = p32[i] = static_cast<float>(std::cos(0.37 * double(i)));
  AdamW8bit a8({{"w", p8.data(), g8.data(), n}}, cfg);
  AdamW a32({{"w", p32.data(), g32.data(), n}}, cfg);
  std::mt19937 rng(4);
  std::normal_distribution<double> noise(0.0, 0.1);
  const double loss0 = q.loss(p32);
  double worst_dist = 0;
  for (int t = 0; t < 300; ++t) {
    q.grad(p8, g8);
    q.grad(p32, g32);
    for (std::size_t i = 0; i < n; ++i) {
      const auto z = static_cast<float>(noise(rng));
      g8[i] += z;
      g32[i] += z;
    }
    a8.step(1e-2f);
    a32.step(1e-2f);
    double dist = 0, norm = 0;
    for (std::size_t i = 0; i < n; ++i) {
      dist += (double(p8[i]) - p32[i]) * (double(p8[i]) - p32[i]);
      norm += double(p32[i]) * double(p32[i]);
    }
    worst_dist = std::max(worst_dist, std::sqrt(dist / norm));
  }
  const double l8 = q.loss(p8), l32 = q.loss(p32);
  INFO("loss: start " << loss0 << ", FP32 " << l32 << ", 8-bit " << l8
                      << "; max over steps of ‖p8 − p32‖/‖p32‖ = " << worst_dist);
  CHECK(l32 < 0.01 * loss0);
  // Tolerance (measured: losses 13.6 vs 14.2, distance ≤ 0.06): both optimizers reach the same
  // loss within 10 % and never drift apart by more than 10 % of the parameter norm.
  CHECK(std::abs(l8 - l32) <= 0.1 * l32);
  CHECK(worst_dist < 0.1);
}

TEST_CASE("ch06: 8-bit AdamW: second moments below 1e-7 of the block absmax quantize to zero", "[ch06][adamw8bit]") {
  // The limit of blockwise 8-bit states: the unsigned dynamic map spans seven decades, so a
  // coordinate whose g² is 1e-8 of its block's largest is stored as v = 0 and its next update
  // is m/(0 + ε)-sized: the step of that coordinate is no longer bounded by ≈ lr.
  std::vector<float> p(kMin8bitSize, 0.0f), g(kMin8bitSize, 1e-4f);
  g[0] = 1.0f;
  AdamW8bit opt({{"w", p.data(), g.data(), p.size()}}, AdamWConfig{0.9f, 0.999f, 1e-8f, 0.0f});
  opt.step(1e-3f);
  const auto v = opt.exp_avg_sq(0);
  CHECK(v[0] == Approx(1e-3).epsilon(2e-5));  // (1 − 0.999f) is 1.3e-5 below 1e-3
  CHECK(v[1] == 0.0f);                     // 1e-11 / 1e-3 = 1e-8: below the map
  CHECK(v[kOptimBlock] == Approx(1e-11).epsilon(0.01));  // the next block has its own absmax
}

TEST_CASE("ch06: 8-bit AdamW: memory is 2.03 bytes per parameter instead of 8", "[ch06][adamw8bit]") {
  const std::size_t n = std::size_t{1} << 20;
  CHECK(adam8bit_state_bytes(n) == 2 * n + 2 * (n / 256) * 4);
  CHECK(double(adam8bit_state_bytes(n)) / double(n) == 2.03125);
  CHECK(adam8bit_state_bytes(kMin8bitSize - 1) == 8 * (kMin8bitSize - 1));  // small: FP32
  std::vector<float> p(kMin8bitSize + 1000), g(p.size()), s(100), gs(100);
  AdamW8bit opt({{"big", p.data(), g.data(), p.size()}, {"small", s.data(), gs.data(), s.size()}});
  CHECK(opt.is_8bit(0));
  CHECK_FALSE(opt.is_8bit(1));
  CHECK(opt.state_bytes() == adam8bit_state_bytes(p.size()) + 800);
}

TEST_CASE("ch06: 8-bit AdamW: state save/load round trip and bad files", "[ch06][adamw8bit][state]") {
  const auto dir = temp_dir("state8");
  const std::size_t n = kMin8bitSize + 300;
  const Quadratic q(n + 50, 9);
  std::vector<float> p(n + 50, 0.5f), g(n + 50), p2, g2(n + 50);
  auto params = [n](std::vector<float>& pv, std::vector<float>& gv) {
    return std::vector<OptimParam>{{"big", pv.data(), gv.data(), n}, {"small", pv.data() + n, gv.data() + n, 50}};
  };
  AdamW8bit a(params(p, g));
  for (int t = 0; t < 4; ++t) {
    q.grad(p, g);
    a.step(1e-3f);
  }
  a.save_state(dir / "opt8.safetensors");
  p2 = p;
  AdamW8bit b(params(p2, g2));
  b.load_state(dir / "opt8.safetensors");
  CHECK(b.steps() == 4);
  for (int t = 0; t < 4; ++t) {
    q.grad(p, g);
    q.grad(p2, g2);
    a.step(1e-3f);
    b.step(1e-3f);
  }
  CHECK(p == p2);

  // A 32-bit AdamW state is not an 8-bit one, and vice versa.
  AdamW a32(params(p, g));
  a32.save_state(dir / "opt32.safetensors");
  CHECK_THROWS_WITH(b.load_state(dir / "opt32.safetensors"), Catch::Contains("'adamw'"));
  CHECK_THROWS_WITH(a32.load_state(dir / "opt8.safetensors"), Catch::Contains("'adamw8bit'"));

  // Codes stored as the wrong dtype, and a negative absmax.
  SafeTensors st = read_safetensors(dir / "opt8.safetensors");
  SafeTensors bad = st;
  bad.tensors["big.state1"] = Tensor::from_f32(std::vector<float>(n, 0.0f), {std::int64_t(n)});
  write_safetensors(dir / "dtype.safetensors", bad);
  CHECK_THROWS_WITH(b.load_state(dir / "dtype.safetensors"), Catch::Contains("big.state1") && Catch::Contains("U8"));
  bad = st;
  std::vector<float> am = bad.tensors["big.absmax2"].to_f32();
  am[3] = -1.0f;
  bad.tensors["big.absmax2"] = Tensor::from_f32(am, {std::int64_t(am.size())});
  write_safetensors(dir / "neg.safetensors", bad);
  CHECK_THROWS_WITH(b.load_state(dir / "neg.safetensors"), Catch::Contains("big.absmax2"));
  CHECK(b.steps() == 8);
  fs::remove_all(dir);
}
