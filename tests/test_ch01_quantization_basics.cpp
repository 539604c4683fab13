// Chapter 1: BF16 rounding, absmax and zero-point integer quantization, the error
// metrics, bitsandbytes' FP4, and the outlier problem that motivates blocks.
#include "bf16.hpp"
#include "fp4.hpp"
#include "quant_basics.hpp"
#include "quant_experiments.hpp"

#include <catch2/catch.hpp>

#include <bit>
#include <cmath>
#include <limits>
#include <random>

using namespace qlora;

namespace {

std::uint32_t fresh_seed() { return std::random_device{}(); }

std::vector<float> uniform_values(std::size_t n, std::uint32_t seed, float lo, float hi) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(lo, hi);
  std::vector<float> v(n);
  for (auto& x : v) x = u(rng);
  return v;
}

}  // namespace

TEST_CASE("bf16 rounds to nearest even and keeps NaN and infinities", "[ch01][bf16]") {
  CHECK(f32_to_bf16(1.0f) == 0x3f80);
  // 1 + 2^-8 is exactly halfway between bf16 1.0 and 1.0078125: ties go to the even one (1.0).
  CHECK(f32_to_bf16(std::bit_cast<float>(0x3f808000u)) == 0x3f80);
  // 1.0078125 + half an ulp: tie, the even neighbour is 1.015625 (0x3f82).
  CHECK(f32_to_bf16(std::bit_cast<float>(0x3f818000u)) == 0x3f82);
  CHECK(f32_to_bf16(std::bit_cast<float>(0x3f808001u)) == 0x3f81);  // just above the tie: up
  CHECK(f32_to_bf16(std::numeric_limits<float>::infinity()) == 0x7f80);
  CHECK(f32_to_bf16(-std::numeric_limits<float>::infinity()) == 0xff80);
  CHECK(std::isnan(bf16_to_f32(f32_to_bf16(std::numeric_limits<float>::quiet_NaN()))));
  // A NaN whose payload sits only in the low bits must not become an infinity.
  CHECK(std::isnan(bf16_to_f32(f32_to_bf16(std::bit_cast<float>(0x7f800001u)))));
  CHECK(f32_to_bf16(std::bit_cast<float>(0x7f7fffffu)) == 0x7f80);  // FLT_MAX rounds to +inf

  const auto seed = fresh_seed();
  INFO("seed " << seed);
  const auto x = uniform_values(10000, seed, -1000.0f, 1000.0f);
  for (float v : x) {
    const float r = round_to_bf16(v);
    // At most half a bf16 ulp: 8 significant bits, so |r - v| <= 2^-8 |v|.
    REQUIRE(std::fabs(r - v) <= std::ldexp(std::fabs(v), -8));
  }
}

TEST_CASE("error metrics", "[ch01][metrics]") {
  const std::vector<float> ref = {1.0f, -2.0f, 2.0f, 0.0f};
  const std::vector<float> approx = {1.0f, -1.0f, 2.0f, 1.0f};
  const auto s = compare(ref, approx);
  CHECK(s.max_abs == 1.0);
  CHECK(s.rmse == Approx(std::sqrt(2.0 / 4.0)));
  CHECK(s.rel_frobenius == Approx(std::sqrt(2.0 / 9.0)));
  CHECK(s.count == 4);
  const std::vector<float> shorter = {1.0f};
  CHECK_THROWS_WITH(compare(ref, shorter), Catch::Contains("4 values") && Catch::Contains("1"));
}

TEST_CASE("absmax int8 and int4: codes, round trip bound, zeros, bad input", "[ch01][absmax]") {
  const auto seed = fresh_seed();
  INFO("seed " << seed);
  const auto x = uniform_values(4097, seed, -3.0f, 3.0f);
  for (int bits : {8, 4}) {
    INFO("bits " << bits);
    const int qmax = (1 << (bits - 1)) - 1;
    const auto a = quantize_absmax(x, bits);
    float m = 0.0f;
    for (float v : x) m = std::max(m, std::fabs(v));
    CHECK(a.absmax == m);
    bool hits_max = false;
    for (auto q : a.q) {
      REQUIRE(std::abs(int{q}) <= qmax);
      hits_max |= std::abs(int{q}) == qmax;
    }
    CHECK(hits_max);  // the absmax element maps onto ±qmax
    const auto d = dequantize(a);
    const double half_step = 0.5 * m / qmax;
    for (std::size_t i = 0; i < x.size(); ++i) REQUIRE(std::fabs(d[i] - x[i]) <= half_step * (1 + 1e-5));
  }
  const std::vector<float> zeros(10, 0.0f);
  const auto z = quantize_absmax(zeros, 8);
  CHECK(z.absmax == 0.0f);
  for (float v : dequantize(z)) CHECK(v == 0.0f);

  CHECK_THROWS_WITH(quantize_absmax(x, 9), Catch::Contains("bits"));
  auto bad = x;
  bad[17] = std::numeric_limits<float>::quiet_NaN();
  CHECK_THROWS_WITH(quantize_absmax(bad, 8), Catch::Contains("index 17") && Catch::Contains("NaN"));
  bad[17] = -std::numeric_limits<float>::infinity();
  CHECK_THROWS_WITH(quantize_absmax(bad, 8), Catch::Contains("infinite"));
}

TEST_CASE("zero-point int8 uses all 256 codes of a one-sided range", "[ch01][zeropoint]") {
  const auto seed = fresh_seed();
  INFO("seed " << seed);
  const auto x = uniform_values(5000, seed, 0.0f, 6.0f);  // like ReLU outputs: all >= 0
  const auto z = quantize_zero_point(x);
  CHECK(z.zero_point == 0);
  const auto d = dequantize(z);
  for (std::size_t i = 0; i < x.size(); ++i) REQUIRE(std::fabs(d[i] - x[i]) <= 0.5 * z.scale * (1 + 1e-4));
  // Absmax int8 spends half its codes on negatives that never occur: twice the step.
  const auto a = dequantize(quantize_absmax(x, 8));
  CHECK(compare(x, d).rmse < 0.6 * compare(x, a).rmse);

  const auto mixed = uniform_values(5000, seed + 1, -1.0f, 3.0f);
  const auto zm = quantize_zero_point(mixed);
  const auto dm = dequantize(zm);
  for (std::size_t i = 0; i < mixed.size(); ++i) REQUIRE(std::fabs(dm[i] - mixed[i]) <= 0.5 * zm.scale * (1 + 1e-3) + 1e-6);
  // 0.0 has an exact code.
  const std::vector<float> with_zero = {-1.0f, 0.0f, 3.0f};
  CHECK(dequantize(quantize_zero_point(with_zero))[1] == 0.0f);
  const std::vector<float> zeros(7, 0.0f);
  for (float v : dequantize(quantize_zero_point(zeros))) CHECK(v == 0.0f);
  auto bad = mixed;
  bad[3] = std::numeric_limits<float>::infinity();
  CHECK_THROWS_WITH(quantize_zero_point(bad), Catch::Contains("index 3"));
}

TEST_CASE("FP4 table is bitsandbytes' E2M1 / 12 with sign bit 8", "[ch01][fp4]") {
  const double e2m1[8] = {0, 0.0625, 8, 12, 4, 6, 2, 3};
  for (int c = 0; c < 8; ++c) {
    INFO("code " << c);
    CHECK(std::fabs(fp4_table[c] - e2m1[c] / 12.0) < 1e-7);
    CHECK(fp4_table[c + 8] == -fp4_table[c]);
    CHECK(std::signbit(fp4_table[c + 8]));
  }
  // Every value encodes to its own code (except -0, which compares equal to 0: code 0).
  for (int c = 0; c < 16; ++c) {
    if (c == 8) continue;
    CHECK(fp4_encode(fp4_table[c]) == c);
  }
  CHECK(fp4_encode(-0.0f) == 0);
  CHECK(fp4_encode(std::numeric_limits<float>::quiet_NaN()) == 0);
}

TEST_CASE("FP4 encode follows bitsandbytes' thresholds: nearest value, ties go down", "[ch01][fp4]") {
  // Sorted magnitudes and their codes; a magnitude above a threshold goes up.
  const int order[8] = {0, 1, 6, 7, 4, 5, 2, 3};
  const float thresholds[7] = {0.00260417f, 0.0859375f, 0.20833333f, 0.29166667f, 0.4166667f, 0.583333f, 0.8333333f};
  for (int k = 0; k < 7; ++k) {
    CHECK(fp4_encode(thresholds[k]) == order[k]);
    CHECK(fp4_encode(std::nextafter(thresholds[k], 2.0f)) == order[k + 1]);
    CHECK(fp4_encode(-thresholds[k]) == (order[k] | 8));
    // Each threshold is within 1e-6 of the midpoint of its neighbours.
    CHECK(std::fabs(thresholds[k] - 0.5 * (fp4_table[order[k]] + fp4_table[order[k + 1]])) < 1e-6);
  }
  const auto seed = fresh_seed();
  INFO("seed " << seed);
  const auto x = uniform_values(100000, seed, -1.0f, 1.0f);
  for (float v : x) {
    const auto c = fp4_encode(v);
    // The chosen value is the nearest one (up to the few-ulp offsets of the literals).
    double best = 1e9;
    for (int k = 0; k < 16; ++k) best = std::min(best, std::fabs(double{v} - fp4_table[k]));
    REQUIRE(std::fabs(double{v} - fp4_table[c]) <= best + 1e-6);
    REQUIRE(((c & 8) != 0) == (v < 0.0f));
  }
}

TEST_CASE("one outlier ruins a tensor-wide absmax, blocks contain the damage", "[ch01][outlier]") {
  const auto seed = fresh_seed();
  INFO("seed " << seed);
  const auto rows = outlier_experiment(4096, 50.0f, seed, 64);
  REQUIRE(rows.size() == 5);
  const auto& int8_tensor = rows[0];
  const auto& int4_tensor = rows[1];
  const auto& int8_block = rows[2];
  const auto& int4_block = rows[3];
  CHECK(int8_tensor.scheme == "int8 tensor-wide");
  // With the outlier the int8 step grows ~50/3.5x: the error on ordinary values grows alike.
  CHECK(int8_tensor.with.rmse > 5.0 * int8_tensor.without.rmse);
  // Int4's step becomes 50/7 ≈ 7: nearly every ordinary value rounds to 0, a relative
  // error close to 100 %.
  CHECK(int4_tensor.with.rel_frobenius > 0.9);
  // Blockwise, only the outlier's block (63 of 4095 ordinary values) is affected.
  CHECK(int8_block.with.rmse < 4.0 * int8_block.without.rmse);
  CHECK(int4_block.with.rel_frobenius < 0.5);
  CHECK(int8_block.with.rmse < 0.2 * int8_tensor.with.rmse);
}
