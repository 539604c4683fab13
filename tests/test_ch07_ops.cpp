// Chapter 7 CPU tests of the LLaMA building blocks (src/llama_ops.cpp), the
// references the GPU kernels are held to: each backward against central finite
// differences of its forward, grouped-query attention against multi-head
// attention with the kv heads repeated, and the cross-entropy formula against
// log-softmax computed in long double.
#include "llama_ops.hpp"
#include "lora.hpp"
#include "model_helpers.hpp"

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <functional>
#include <random>
#include <vector>

using namespace qlora;
using qlora::test::random_vec;

namespace {

// Largest |analytic − central difference| over every element of `param`, for the scalar
// loss(); the step is h. Returns it relative to the largest |analytic| value.
double fd_error(std::vector<float>& param, const std::vector<float>& analytic, const std::function<double()>& loss,
                float h) {
  double worst = 0.0, scale = 0.0;
  for (std::size_t i = 0; i < param.size(); ++i) {
    const float keep = param[i];
    param[i] = keep + h;
    const double up = loss();
    param[i] = keep - h;
    const double down = loss();
    param[i] = keep;
    // The step actually taken is (keep+h) − (keep−h) in float, not exactly 2h.
    const double step = static_cast<double>(keep + h) - static_cast<double>(keep - h);
    worst = std::max(worst, std::fabs((up - down) / step - analytic[i]));
    scale = std::max(scale, std::fabs(static_cast<double>(analytic[i])));
  }
  REQUIRE(scale > 0.0);
  return worst / scale;
}

double dot(const std::vector<float>& a, const std::vector<float>& b) {
  double s = 0.0;
  for (std::size_t i = 0; i < a.size(); ++i) s += static_cast<double>(a[i]) * b[i];
  return s;
}

}  // namespace

// Finite-difference tolerance, for all the checks below: the forward values are float32
// (relative rounding u ≈ 6e-8), so the loss Σ out·R of a few hundred terms carries noise
// ≈ 1e-6; divided by the step 2h = 2e-2 that is ≈ 5e-5 of a gradient of size 1. The
// truncation error of a central difference is h²/6·|f'''| ≈ 2e-5 for O(1) derivatives.
// Bound: 1e-3 of the largest gradient, an order of magnitude above both; a wrong term
// in a backward (a missing factor, a wrong head) is off by far more than that. Observed:
// ≤ 6e-5 (attention dk the largest).
constexpr float kStep = 1e-2f;
constexpr double kFdTol = 1e-3;

TEST_CASE("RMSNorm backward matches finite differences", "[ch07][ops]") {
  std::mt19937_64 rng(11);
  const int N = 3, D = 10;
  auto x = random_vec(static_cast<std::size_t>(N) * D, rng, -2.0, 2.0);
  const auto w = random_vec(static_cast<std::size_t>(D), rng, 0.5, 1.5);
  const auto R = random_vec(x.size(), rng);
  std::vector<float> y(x.size()), inv(static_cast<std::size_t>(N));
  auto loss = [&] {
    rmsnorm_forward(x.data(), w.data(), y.data(), inv.data(), N, D, 1e-5f);
    return dot(y, R);
  };
  loss();
  std::vector<float> dx(x.size(), 0.0f);
  rmsnorm_backward(x.data(), w.data(), inv.data(), R.data(), dx.data(), N, D);
  // It ADDS into dx.
  std::vector<float> dx2(x.size(), 1.0f);
  rmsnorm_backward(x.data(), w.data(), inv.data(), R.data(), dx2.data(), N, D);
  CHECK(fd_error(x, dx, loss, kStep) < kFdTol);
  for (std::size_t i = 0; i < dx.size(); ++i) CHECK(dx2[i] == Approx(1.0f + dx[i]).epsilon(1e-6));
}

TEST_CASE("RoPE's inverse undoes it, and it preserves every pair's length", "[ch07][ops]") {
  std::mt19937_64 rng(12);
  LlamaConfig c;
  c.dim = 32;
  c.n_heads = c.n_kv_heads = 4;
  c.seq_len = 16;
  std::vector<float> cos_t, sin_t;
  rope_tables(c, cos_t, sin_t);
  REQUIRE(cos_t.size() == 16u * 4u);
  const int N = 2 * 16, hs = 8;
  const auto v0 = random_vec(static_cast<std::size_t>(N) * c.dim, rng);
  auto v = v0;
  rope(v.data(), N, 16, 0, c.n_heads, hs, cos_t, sin_t, false);
  double moved = 0.0;
  // Rotate-half pairs: (x[i], x[i + hs/2]) of every head.
  const std::size_t half = hs / 2;
  for (std::size_t h = 0; h < v.size(); h += 2 * half)
    for (std::size_t i = h; i < h + half; ++i) {
      moved = std::max(moved, std::fabs(static_cast<double>(v[i]) - v0[i]));
      CHECK(std::hypot(v[i], v[i + half]) == Approx(std::hypot(v0[i], v0[i + half])).epsilon(1e-6));
    }
  CHECK(moved > 0.1);  // positions > 0 do rotate
  rope(v.data(), N, 16, 0, c.n_heads, hs, cos_t, sin_t, true);
  for (std::size_t i = 0; i < v.size(); ++i) CHECK(v[i] == Approx(v0[i]).margin(1e-6));
}

TEST_CASE("Attention backward matches finite differences, with grouped-query heads", "[ch07][ops]") {
  std::mt19937_64 rng(13);
  const int B = 2, T = 5, H = 4, KVH = 2, hs = 4;
  const int N = B * T, D = H * hs, KV = KVH * hs;
  auto q = random_vec(static_cast<std::size_t>(N) * D, rng), k = random_vec(static_cast<std::size_t>(N) * KV, rng);
  auto v = random_vec(static_cast<std::size_t>(N) * KV, rng);
  const auto R = random_vec(static_cast<std::size_t>(N) * D, rng);
  std::vector<float> att(static_cast<std::size_t>(B) * H * T * T), out(static_cast<std::size_t>(N) * D);
  auto loss = [&] {
    attention_forward(q.data(), k.data(), v.data(), att.data(), out.data(), B, T, H, KVH, hs);
    return dot(out, R);
  };
  loss();
  std::vector<float> dq(q.size(), 7.0f), dk(k.size(), 7.0f), dv(v.size(), 7.0f);  // overwritten, not added to
  attention_backward(q.data(), k.data(), v.data(), att.data(), R.data(), dq.data(), dk.data(), dv.data(), B, T, H, KVH,
                     hs);
  CHECK(fd_error(q, dq, loss, kStep) < kFdTol);
  CHECK(fd_error(k, dk, loss, kStep) < kFdTol);
  CHECK(fd_error(v, dv, loss, kStep) < kFdTol);
  // Causality: the weights above the diagonal are exact zeros and each row sums to 1.
  for (std::size_t r = 0; r < att.size() / T; ++r) {
    const int t = static_cast<int>(r % T);
    double sum = 0.0;
    for (int s = 0; s < T; ++s) {
      sum += att[r * T + s];
      if (s > t) CHECK(att[r * T + s] == 0.0f);
    }
    CHECK(sum == Approx(1.0).epsilon(1e-6));
  }
}

TEST_CASE("Grouped-query attention equals multi-head attention with repeated kv heads", "[ch07][ops]") {
  std::mt19937_64 rng(14);
  const int B = 2, T = 6, H = 6, KVH = 2, hs = 4, group = H / KVH;
  const int N = B * T, D = H * hs, KV = KVH * hs;
  const auto q = random_vec(static_cast<std::size_t>(N) * D, rng), k = random_vec(static_cast<std::size_t>(N) * KV, rng);
  const auto v = random_vec(static_cast<std::size_t>(N) * KV, rng), dout = random_vec(static_cast<std::size_t>(N) * D, rng);
  // Query head h reads kv head h / group: repeat each kv head `group` times.
  std::vector<float> k_rep(static_cast<std::size_t>(N) * D), v_rep(static_cast<std::size_t>(N) * D);
  for (int n = 0; n < N; ++n)
    for (int h = 0; h < H; ++h)
      for (int i = 0; i < hs; ++i) {
        k_rep[static_cast<std::size_t>(n) * D + h * hs + i] = k[static_cast<std::size_t>(n) * KV + (h / group) * hs + i];
        v_rep[static_cast<std::size_t>(n) * D + h * hs + i] = v[static_cast<std::size_t>(n) * KV + (h / group) * hs + i];
      }
  std::vector<float> att(static_cast<std::size_t>(B) * H * T * T), out(static_cast<std::size_t>(N) * D), att_rep(att.size()), out_rep(out.size());
  attention_forward(q.data(), k.data(), v.data(), att.data(), out.data(), B, T, H, KVH, hs);
  attention_forward(q.data(), k_rep.data(), v_rep.data(), att_rep.data(), out_rep.data(), B, T, H, H, hs);
  CHECK(att == att_rep);  // the same arithmetic in the same order: identical
  CHECK(out == out_rep);
  std::vector<float> dq(q.size()), dk(k.size()), dv(v.size()), dq_rep(q.size()), dk_rep(k_rep.size()),
      dv_rep(v_rep.size());
  attention_backward(q.data(), k.data(), v.data(), att.data(), dout.data(), dq.data(), dk.data(), dv.data(), B, T, H,
                     KVH, hs);
  attention_backward(q.data(), k_rep.data(), v_rep.data(), att.data(), dout.data(), dq_rep.data(), dk_rep.data(),
                     dv_rep.data(), B, T, H, H, hs);
  CHECK(dq == dq_rep);
  // A shared kv head's gradient is the sum over the query heads that read it (float sums
  // in another order: equal to a few ulp).
  for (int n = 0; n < N; ++n)
    for (int g = 0; g < KVH; ++g)
      for (int i = 0; i < hs; ++i) {
        double sk = 0.0, sv = 0.0;
        for (int h = g * group; h < (g + 1) * group; ++h) {
          sk += dk_rep[static_cast<std::size_t>(n) * D + h * hs + i];
          sv += dv_rep[static_cast<std::size_t>(n) * D + h * hs + i];
        }
        CHECK(dk[static_cast<std::size_t>(n) * KV + g * hs + i] == Approx(sk).margin(1e-6));
        CHECK(dv[static_cast<std::size_t>(n) * KV + g * hs + i] == Approx(sv).margin(1e-6));
      }
}

TEST_CASE("SwiGLU backward matches finite differences", "[ch07][ops]") {
  std::mt19937_64 rng(15);
  const std::int64_t n = 40;
  auto h1 = random_vec(static_cast<std::size_t>(n), rng, -5.0, 5.0), h3 = random_vec(static_cast<std::size_t>(n), rng, -2.0, 2.0);
  const auto R = random_vec(static_cast<std::size_t>(n), rng);
  std::vector<float> g(static_cast<std::size_t>(n));
  auto loss = [&] {
    swiglu_forward(h1.data(), h3.data(), g.data(), n);
    return dot(g, R);
  };
  std::vector<float> dh1(static_cast<std::size_t>(n)), dh3(static_cast<std::size_t>(n));
  swiglu_backward(h1.data(), h3.data(), R.data(), dh1.data(), dh3.data(), n);
  CHECK(fd_error(h1, dh1, loss, kStep) < kFdTol);
  CHECK(fd_error(h3, dh3, loss, kStep) < kFdTol);
  CHECK(silu(0.0f) == 0.0f);
  CHECK(silu(2.0f) == Approx(2.0 / (1.0 + std::exp(-2.0))).epsilon(1e-6));
}

TEST_CASE("Cross-entropy of a row: the log-softmax formula and its gradient", "[ch07][ops]") {
  std::mt19937_64 rng(16);
  const int V = 50, target = 17;
  auto logits = random_vec(static_cast<std::size_t>(V), rng, -6.0, 6.0);
  // −log softmax[target] in long double, the textbook way.
  long double z = 0.0L;
  for (float l : logits) z += std::exp(static_cast<long double>(l));
  const long double expected = std::log(z) - logits[target];
  CHECK(static_cast<double>(std::fabs(cross_entropy_loss_row(logits.data(), V, target) - expected)) < 1e-6);
  const float weight = 0.25f;
  std::vector<float> grad = logits;
  cross_entropy_backward_row(grad.data(), V, target, weight);
  double total = 0.0;
  for (float gv : grad) total += gv;
  CHECK(std::fabs(total) < 1e-6);  // softmax sums to 1, the one-hot too
  auto loss = [&] { return weight * cross_entropy_loss_row(logits.data(), V, target); };
  CHECK(fd_error(logits, grad, loss, kStep) < kFdTol);
}
