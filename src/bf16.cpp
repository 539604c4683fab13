// bfloat16 conversions (chapter 1). See bf16.hpp.
#include "bf16.hpp"

#include <bit>

namespace qlora {

//! [bf16-round]
bf16 f32_to_bf16(float x) {
  std::uint32_t u = std::bit_cast<std::uint32_t>(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    // NaN: keep the sign and top payload bits, force the quiet bit so the
    // result cannot collapse to an infinity when the low bits are dropped.
    return static_cast<bf16>((u >> 16) | 0x0040u);
  }
  // Round to nearest, ties to even: add 0x7fff plus the lowest kept bit, then
  // truncate. Infinities pass through unchanged (their low half is zero), and
  // values that round past the largest finite bf16 become infinity, as IEEE says.
  std::uint32_t lsb = (u >> 16) & 1u;
  u += 0x7fffu + lsb;
  return static_cast<bf16>(u >> 16);
}
//! [bf16-round]

float bf16_to_f32(bf16 b) { return std::bit_cast<float>(static_cast<std::uint32_t>(b) << 16); }

std::vector<bf16> to_bf16(std::span<const float> x) {
  std::vector<bf16> out(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) out[i] = f32_to_bf16(x[i]);
  return out;
}

std::vector<float> from_bf16(std::span<const bf16> x) {
  std::vector<float> out(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) out[i] = bf16_to_f32(x[i]);
  return out;
}

}  // namespace qlora
