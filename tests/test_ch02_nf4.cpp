// Chapter 2: the NF4 table from normal quantiles (Boost.Math), bitsandbytes' decision
// tree, and why NF4 beats FP4 and Int4 on normally distributed blocks.
#include "fp4.hpp"
#include "nf4.hpp"
#include "quant_experiments.hpp"

#include <catch2/catch.hpp>

#include <cmath>
#include <limits>
#include <random>

using namespace qlora;

TEST_CASE("NF4 from Boost.Math normal quantiles matches bitsandbytes' table", "[ch02][nf4]") {
  // In bitsandbytes' own float32 arithmetic the construction gives the table bit for bit.
  const auto recipe = nf4_levels_bitsandbytes_recipe();
  for (int c = 0; c < 16; ++c) {
    INFO("code " << c);
    CHECK(recipe[c] == nf4_table[c]);
  }
  // The textbook construction in double precision agrees to 1e-7 on all but the levels
  // most sensitive to bitsandbytes' float32 probabilities (max 1.08e-7, see chapter 2).
  const auto exact = nf4_levels_exact();
  double max_diff = 0.0;
  int within_1e7 = 0;
  for (int c = 0; c < 16; ++c) {
    const double d = std::fabs(exact[c].value - nf4_table[c]);
    max_diff = std::max(max_diff, d);
    within_1e7 += d <= 1e-7;
  }
  CHECK(max_diff < 1.1e-7);
  CHECK(within_1e7 >= 15);
  // δ is ½(1 − 1/32 + 1 − 1/30) to seven digits.
  CHECK(std::fabs(nf4_offset - 0.5 * (1.0 - 1.0 / 32 + 1.0 - 1.0 / 30)) < 5e-8);
}

TEST_CASE("NF4 is asymmetric: 8 positive levels, 7 negative, an exact zero", "[ch02][nf4]") {
  int pos = 0, neg = 0, zero = 0;
  for (int c = 0; c < 16; ++c) {
    if (c > 0) CHECK(nf4_table[c - 1] < nf4_table[c]);
    pos += nf4_table[c] > 0.0f;
    neg += nf4_table[c] < 0.0f;
    zero += nf4_table[c] == 0.0f;
  }
  CHECK(pos == 8);
  CHECK(neg == 7);
  CHECK(zero == 1);
  CHECK(nf4_table[7] == 0.0f);
  CHECK(nf4_table[0] == -1.0f);
  CHECK(nf4_table[15] == 1.0f);
  const auto exact = nf4_levels_exact();
  CHECK(exact[7].probability == 0.5);
  CHECK(exact[15].probability == nf4_offset);
  CHECK(exact[0].probability == nf4_offset);  // the mirrored outermost negative level
}

TEST_CASE("NF4 thresholds are the midpoints of neighbouring values", "[ch02][nf4]") {
  for (int k = 0; k < 15; ++k) {
    INFO("threshold " << k);
    const double mid = 0.5 * (double{nf4_table[k]} + double{nf4_table[k + 1]});
    // The float literal is the double midpoint rounded: within one float32 ulp.
    CHECK(std::fabs(nf4_thresholds[k] - mid) <= std::ldexp(1.0, -24));
    // On the threshold itself: down; one ulp above: up.
    CHECK(nf4_encode(nf4_thresholds[k]) == k);
    CHECK(nf4_encode(std::nextafter(nf4_thresholds[k], 2.0f)) == k + 1);
  }
  for (int c = 0; c < 16; ++c) CHECK(nf4_encode(nf4_table[c]) == c);
  CHECK(nf4_encode(std::numeric_limits<float>::quiet_NaN()) == 0);
  CHECK(nf4_encode(-0.0f) == 7);
  CHECK(nf4_encode(5.0f) == 15);
  CHECK(nf4_encode(-5.0f) == 0);
}

TEST_CASE("NF4 encode picks the nearest value for random inputs", "[ch02][nf4]") {
  const auto seed = std::random_device{}();
  INFO("seed " << seed);
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  for (int i = 0; i < 200000; ++i) {
    const float x = u(rng);
    const int c = nf4_encode(x);
    // Reference: linear scan, "strictly greater than the threshold goes up".
    int ref = 0;
    while (ref < 15 && x > nf4_thresholds[ref]) ++ref;
    REQUIRE(c == ref);
    double best = 1e9;
    for (float v : nf4_table) best = std::min(best, std::fabs(double{x} - v));
    REQUIRE(std::fabs(double{x} - nf4_table[c]) <= best + 1e-7);
  }
}

TEST_CASE("on normal blocks NF4 has lower error than FP4 and Int4", "[ch02][error]") {
  const auto seed = std::random_device{}();
  INFO("seed " << seed);
  const auto x = normal_samples(64 * 2048, seed);
  const auto nf4 = compare(x, roundtrip_4bit(x, "nf4", 64));
  const auto fp4 = compare(x, roundtrip_4bit(x, "fp4", 64));
  const auto int4 = compare(x, roundtrip_4bit(x, "int4", 64));
  INFO("rmse nf4 " << nf4.rmse << " fp4 " << fp4.rmse << " int4 " << int4.rmse);
  CHECK(nf4.rmse < fp4.rmse);
  CHECK(nf4.rmse < int4.rmse);
  CHECK(nf4.rel_frobenius < fp4.rel_frobenius);
  CHECK(nf4.rel_frobenius < int4.rel_frobenius);
  CHECK_THROWS_WITH(roundtrip_4bit(x, "int3", 64), Catch::Contains("int3"));
}
