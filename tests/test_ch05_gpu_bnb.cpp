// Chapter 5's GPU quantization against bitsandbytes itself (chapter 3, "The same
// quantization? Against the real library"): the device's rcp.approx.ftz.f32 is the CPU
// table, and quantize4 gives bitsandbytes' bytes for every configuration and input dtype
// of tests/fixtures/bnb/ (made by tools/bnb_compare.py). Without the fixtures it fails.
#include "bnb_fixtures.hpp"
#include "fast_math_reciprocal.cuh"
#include "fast_math_reciprocal.hpp"
#include "quantize4.cuh"

#include <catch2/catch.hpp>

#include <cmath>
#include <cstdio>
#include <limits>

using namespace qlora;
using namespace qlora::cuda;
namespace fx = qlora::bnb_fixtures;

TEST_CASE("bnb: the reciprocal table is the device's rcp.approx, for every BF16 value", "[ch05][gpu][bnb]") {
  // Every BF16 bit pattern but NaNs: normals of every exponent (the table shifted),
  // subnormals and zeros (flushed: ±inf), infinities (±0), and results below FLT_MIN
  // (flushed to ±0).
  std::vector<float> x;
  for (std::uint32_t b = 0; b < 0x10000; ++b) {
    const float v = bf16_to_f32(static_cast<bf16>(b));
    if (!std::isnan(v)) x.push_back(v);
  }
  const auto gpu = rcp_approx_on_device(x);
  for (std::size_t i = 0; i < x.size(); ++i) {
    INFO("x = " << x[i] << " (bf16 bits " << (fx::bits(x[i]) >> 16) << ")");
    REQUIRE(fx::bits(gpu[i]) == fx::bits(rcp_approx_ftz(x[i])));
  }
}

TEST_CASE("bnb: GPU quantize is bitsandbytes' bytes for every configuration and dtype", "[ch05][gpu][bnb]") {
  std::size_t offsets_equal = 0, dq_cases = 0;
  for (const char* dtype : fx::dtypes) {
    for (const auto& c : fx::cases(dtype)) {
      INFO(c.name);
      const auto& want = c.bnb;
      // BF16 goes in as BF16. F16 goes in as its exact float32 values: bitsandbytes' kernel
      // converts each half to float first, and every later operation is on float32.
      DeviceQuant4 q = std::string(dtype) == "bf16"
                           ? quantize4(to_device(std::span<const bf16>(to_bf16(c.input))).data(), want.shape,
                                       want.type, want.blocksize, want.double_quant)
                           : quantize4(to_device(std::span<const float>(c.input)).data(), want.shape, want.type,
                                       want.blocksize, want.double_quant);
      const auto got = q.download();
      REQUIRE(fx::differing_codes(got.packed, want.packed) == 0);
      if (!want.double_quant) {
        REQUIRE(got.absmax.size() == want.absmax.size());
        for (std::size_t b = 0; b < got.absmax.size(); ++b) REQUIRE(fx::bits(got.absmax[b]) == fx::bits(want.absmax[b]));
        continue;
      }
      // The offset is our exactly rounded mean, torch's a float32 tree sum (chapter 3):
      // where they agree, every nested byte must too.
      ++dq_cases;
      INFO("offset ours " << got.nested.offset << " bitsandbytes " << want.nested.offset);
      if (got.nested.offset != want.nested.offset) continue;
      ++offsets_equal;
      REQUIRE(got.nested.codes == want.nested.codes);
      for (std::size_t k = 0; k < got.nested.absmax.size(); ++k) {
        REQUIRE(fx::bits(got.nested.absmax[k]) == fx::bits(want.nested.absmax[k]));
      }
    }
  }
  std::printf("bnb GPU: DQ offset equals torch's in %zu of %zu configurations\n", offsets_equal, dq_cases);
}
