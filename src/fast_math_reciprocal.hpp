// The reciprocal of bitsandbytes' fast-math build (chapter 3, "The same quantization?
// Against the real library"). bitsandbytes compiles its CUDA kernels with
// --use_fast_math, and there `1.0f / absmax` becomes the PTX instruction
// rcp.approx.ftz.f32: a hardware approximation that is at most one ulp from the
// correctly rounded reciprocal, with subnormal inputs and results flushed to zero.
// Where it is one ulp off, a value exactly on a decision midpoint (x / absmax = 5/24,
// say) gets the other code.
//
// The CPU cannot compute the instruction, but for a BF16 absmax it need not: the
// reciprocal of m · 2^e is rcp(m) · 2^-e, and a BF16 value has only 128 mantissas
// m = 1 + k/128. Their 128 reciprocals, measured once on the GPU by
// tools/bnb_compare.py, are the table in fast_math_reciprocal_table.cpp; a GPU test
// measures them again. For any other float32 the CPU uses the IEEE quotient.
#pragma once

#include <array>
#include <cstdint>
#include <functional>

namespace qlora {

/// float32 bits of rcp.approx.ftz.f32(1 + k/128), k = 0..127 (each in (0.5, 1]).
extern const std::array<std::uint32_t, 128> rcp_approx_bf16_mantissa_bits;

/// True when x is a BF16 value (its low 16 bits are zero): rcp_approx_ftz(x) is known.
bool rcp_approx_is_known(float x);

/// rcp.approx.ftz.f32(x) for a BF16 value x, from the table: ±0 and subnormals give ±inf,
/// ±inf gives ±0, NaN stays NaN, and a result below FLT_MIN is flushed to ±0.
/// Throws std::invalid_argument naming x when it is not a BF16 value.
float rcp_approx_ftz(float x);

/// 1.0f / x as bitsandbytes' kernels compute it, as far as the CPU knows it:
/// rcp_approx_ftz(x) for a BF16 value, the IEEE quotient 1.0f / x otherwise.
float fast_math_reciprocal(float x);

/// The reciprocal a blockwise quantizer multiplies by (fast_math_reciprocal by default;
/// the GPU tests pass the device's own instruction).
using Reciprocal = std::function<float(float)>;

}  // namespace qlora
