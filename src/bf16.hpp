// bfloat16: the 16-bit format QLoRA computes in (chapter 1, "Quantization basics").
// A bf16 is the top half of an IEEE float32: same 8-bit exponent (same range),
// 7 mantissa bits instead of 23. Conversion rounds to nearest, ties to even.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

namespace qlora {

/// Raw bits of one bfloat16 value.
using bf16 = std::uint16_t;

/// float32 -> bfloat16, round to nearest even; NaN stays NaN (quiet), ±Inf stays ±Inf.
bf16 f32_to_bf16(float x);

/// bfloat16 -> float32, exact (bf16 is a truncated float32).
float bf16_to_f32(bf16 b);

/// Rounds a float32 to the nearest bf16-representable float32.
inline float round_to_bf16(float x) { return bf16_to_f32(f32_to_bf16(x)); }

std::vector<bf16> to_bf16(std::span<const float> x);
std::vector<float> from_bf16(std::span<const bf16> x);

}  // namespace qlora
