// FP4 as bitsandbytes defines it (chapter 1, "Quantization basics"): a 4-bit
// float with one sign bit (bit 3), two exponent bits and one mantissa bit, E2M1
// with an exponent bias of 3. The eight magnitudes are {0, 0.0625, 8, 12, 4, 6,
// 2, 3} / 12, so a block's absmax maps onto the largest value, 12.
#pragma once

#include <array>
#include <cstdint>

namespace qlora {

/// Value of every FP4 code as a fraction of the block absmax, in float32 exactly as
/// bitsandbytes stores them. Codes 8..15 are the negatives of codes 0..7 (code 8 is -0).
extern const std::array<float, 16> fp4_table;

/// The code bitsandbytes' dQuantizeFP4 picks for a value already divided by the absmax:
/// sign from x < 0, then |x| compared against fixed float32 thresholds, x strictly
/// greater than a threshold goes to the larger magnitude. NaN gives code 0.
std::uint8_t fp4_encode(float x);

}  // namespace qlora
