// NF4, the 4-bit NormalFloat data type of QLoRA (chapter 2, "NF4 from normal
// quantiles"). Its 16 values are quantiles of the standard normal distribution,
// scaled into [-1, 1]: 8 positive levels, 7 negative levels and an exact zero.
// Weights of trained networks are roughly normal within a block, so each code
// is used about equally often: that is what makes the type information-efficient.
#pragma once

#include <array>
#include <cstdint>

namespace qlora {

/// The outermost probability of the construction: ½(1 − 1/32 + 1 − 1/30), rounded to
/// seven digits as bitsandbytes' create_normal_map default.
inline constexpr double nf4_offset = 0.9677083;

/// bitsandbytes' NF4 table (float32), indexed by code, sorted ascending.
extern const std::array<float, 16> nf4_table;

/// One step of the derivation, for tables and plots.
struct NF4Level {
  double probability = 0.5;  ///< p with Φ(q) = p (0.5 for the exact zero)
  double quantile = 0.0;     ///< q = ±Φ⁻¹(p)
  double value = 0.0;        ///< q / max q
};

/// The NF4 levels from the normal quantile function, in double precision:
/// positive levels Φ⁻¹(p) for 8 probabilities evenly spaced from δ down to ½ (½ excluded),
/// negative levels −Φ⁻¹(p) for 7 such probabilities, plus 0; sorted; divided by the largest.
std::array<NF4Level, 16> nf4_levels_exact(double offset = nf4_offset);

/// The same construction in bitsandbytes' own arithmetic: probabilities from a float32
/// torch.linspace, quantiles rounded to float32, division by the maximum in float32.
/// This reproduces nf4_table bit for bit.
std::array<float, 16> nf4_levels_bitsandbytes_recipe(double offset = nf4_offset);

/// The code bitsandbytes' dQuantizeNF4 picks for a value already divided by the absmax:
/// a binary decision tree on the midpoints of neighbouring table values; x strictly
/// greater than a midpoint goes up. NaN gives code 0 (every comparison is false).
std::uint8_t nf4_encode(float x);

/// The 15 decision thresholds of nf4_encode, ascending (float32, as in bitsandbytes).
extern const std::array<float, 15> nf4_thresholds;

}  // namespace qlora
