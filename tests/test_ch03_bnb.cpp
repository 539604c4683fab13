// Chapter 3, "The same quantization? Against the real library": our CPU quantize_4bit
// and dequantize_4bit against bitsandbytes' own outputs (tests/fixtures/bnb/, made by
// tools/bnb_compare.py on a GPU machine). Without the fixtures every test here fails.
#include "bf16.hpp"
#include "bnb_fixtures.hpp"
#include "fast_math_reciprocal.hpp"
#include "fp4.hpp"
#include "nf4.hpp"
#include "quant4.hpp"
#include "quant_basics.hpp"

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>

using namespace qlora;
namespace fx = qlora::bnb_fixtures;

namespace {

// Chapter 3 states how many 4-bit codes of the F16 and F32 fixtures our CPU encodes
// differently from bitsandbytes (all on decision midpoints, see below), summed over the
// 14 configurations without double quantization of each dtype (with it the codes are the
// same). Measured with the fixtures of the H200 run of 2026-12-01. F16 has none: the
// absmax of its tie blocks, 384·s·2^e with 3·s < 256, is a BF16 value, so the CPU uses the
// measured table there; F32's tie blocks have absmax values of up to 21 significant bits.
constexpr long long kStatedDifferingCodesF16 = 0;
constexpr long long kStatedDifferingCodesF32 = 149;

/// Our dequantized float32 values in the dtype bitsandbytes wrote (round to nearest even,
/// as __float2bfloat16 / __float2half do), as raw bytes.
std::vector<std::uint8_t> as_dtype_bytes(const std::vector<float>& v, const std::string& dtype) {
  std::vector<std::uint8_t> out;
  auto append = [&out](const void* p, std::size_t n) {
    const auto* b = static_cast<const std::uint8_t*>(p);
    out.insert(out.end(), b, b + n);
  };
  for (float x : v) {
    if (dtype == "f32") {
      append(&x, 4);
    } else if (dtype == "bf16") {
      const bf16 b = f32_to_bf16(x);
      append(&b, 2);
    } else {
      const _Float16 h = static_cast<_Float16>(x);  // IEEE binary16, round to nearest even
      append(&h, 2);
    }
  }
  return out;
}

/// Is the code bnb_code of x what a reciprocal one ulp away from `inv` gives? Then the
/// difference is the fast-math reciprocal's, on a decision midpoint.
bool explained_by_one_ulp(QuantType type, float x, float inv, std::uint8_t bnb_code) {
  for (float other : {std::nextafter(inv, 0.0f), std::nextafter(inv, std::numeric_limits<float>::infinity())}) {
    const float scaled = flush_subnormal(flush_subnormal(x) * other);
    if ((type == QuantType::nf4 ? nf4_encode(scaled) : fp4_encode(scaled)) == bnb_code) return true;
  }
  return false;
}

std::int64_t ulps_apart(float a, float b) {
  return std::abs(static_cast<std::int64_t>(fx::bits(a)) - static_cast<std::int64_t>(fx::bits(b)));
}

}  // namespace

TEST_CASE("bnb: the committed reciprocal table is the measured one (fixture)", "[ch03][bnb]") {
  const auto st = fx::read("rcp_approx.safetensors");
  const auto measured = fx::values<std::int32_t>(st.at("rcp_bf16_mantissa"));
  REQUIRE(measured.size() == 128);
  for (std::size_t k = 0; k < 128; ++k) {
    INFO("mantissa 1 + " << k << "/128: src/fast_math_reciprocal_table.cpp is not the measured table "
                            "(copy the one tools/bnb_compare.py wrote)");
    REQUIRE(static_cast<std::uint32_t>(measured[k]) == rcp_approx_bf16_mantissa_bits[k]);
  }
}

TEST_CASE("bnb: CPU quantize of BF16 input is bitsandbytes' bytes, every configuration", "[ch03][bnb]") {
  std::size_t offsets_equal = 0, dq_cases = 0;
  for (const auto& c : fx::cases("bf16")) {
    INFO(c.name);
    const auto& want = c.bnb;
    const auto ours = quantize_4bit(c.input, want.shape, want.type, want.blocksize, false);
    REQUIRE(fx::differing_codes(ours.packed, want.packed) == 0);
    if (!want.double_quant) {
      REQUIRE(ours.absmax.size() == want.absmax.size());
      for (std::size_t b = 0; b < ours.absmax.size(); ++b) REQUIRE(fx::bits(ours.absmax[b]) == fx::bits(want.absmax[b]));
      continue;
    }
    // The second level from the same absmax and bitsandbytes' own offset: every byte equal.
    const auto nested = double_quantize(ours.absmax, want.nested.offset);
    REQUIRE(nested.codes == want.nested.codes);
    REQUIRE(nested.absmax.size() == want.nested.absmax.size());
    for (std::size_t k = 0; k < nested.absmax.size(); ++k) REQUIRE(fx::bits(nested.absmax[k]) == fx::bits(want.nested.absmax[k]));
    // Our own offset is the exactly rounded mean; torch's is a float32 tree sum times
    // float32(1/n) (chapter 3): at most an ulp apart.
    const float ours_offset = absmax_mean(ours.absmax);
    INFO("offset ours " << ours_offset << " bitsandbytes " << want.nested.offset);
    REQUIRE(ulps_apart(ours_offset, want.nested.offset) <= 1);
    ++dq_cases;
    offsets_equal += ours_offset == want.nested.offset;
  }
  std::printf("bnb bf16: our DQ offset equals torch's in %zu of %zu configurations\n", offsets_equal, dq_cases);
}

TEST_CASE("bnb: dequantize of bitsandbytes' state is its dequantize_4bit, bit for bit", "[ch03][bnb]") {
  // Exact, not within a tolerance: both compute table[code] * absmax with one float32
  // multiply (and, with DQ, code * nested absmax, then a separate add of the offset),
  // flush subnormals, and round to the output type to nearest even.
  for (const char* dtype : fx::dtypes) {
    for (const auto& c : fx::cases(dtype)) {
      INFO(c.name);
      const auto ours = as_dtype_bytes(dequantize_4bit_f32(c.bnb), c.dtype);
      REQUIRE(ours.size() == c.dequant.data.size());
      const auto first = std::mismatch(ours.begin(), ours.end(), c.dequant.data.begin()).first - ours.begin();
      INFO("first differing byte " << first);
      REQUIRE(first == static_cast<std::ptrdiff_t>(ours.size()));
    }
  }
}

TEST_CASE("bnb: F16/F32 input differs only on midpoints, as many codes as chapter 3 states", "[ch03][bnb]") {
  for (const char* dtype : {"f16", "f32"}) {
    long long total = 0;
    for (const auto& c : fx::cases(dtype)) {
      if (c.bnb.double_quant) continue;  // the same 4-bit codes as without DQ
      INFO(c.name);
      const auto ours = quantize_4bit(c.input, c.bnb.shape, c.bnb.type, c.bnb.blocksize, false);
      for (std::size_t b = 0; b < ours.absmax.size(); ++b) REQUIRE(fx::bits(ours.absmax[b]) == fx::bits(c.bnb.absmax[b]));
      const auto bs = static_cast<std::size_t>(c.bnb.blocksize);
      long long differing = 0;
      for (std::size_t i = 0; i < c.input.size(); ++i) {
        const auto want = fx::code_at(c.bnb.packed, i);
        if (fx::code_at(ours.packed, i) == want) continue;
        // Only where the CPU does not know the GPU's reciprocal, and a one-ulp change of
        // it gives bitsandbytes' code: x / absmax sits on a decision midpoint.
        const float absmax = ours.absmax[i / bs];
        INFO("element " << i << " x " << c.input[i] << " absmax " << absmax);
        REQUIRE_FALSE(rcp_approx_is_known(absmax));
        REQUIRE(explained_by_one_ulp(c.bnb.type, c.input[i], 1.0f / absmax, want));
        ++differing;
      }
      std::printf("bnb %s: %lld of %zu codes differ\n", c.name.c_str(), differing, c.input.size());
      total += differing;
    }
    const long long stated = std::string(dtype) == "f16" ? kStatedDifferingCodesF16 : kStatedDifferingCodesF32;
    std::printf("bnb %s: %lld codes differ from bitsandbytes (chapter 3 states %lld)\n", dtype, total, stated);
    CHECK(total == stated);
  }
}
