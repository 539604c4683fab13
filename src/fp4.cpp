// bitsandbytes' FP4 data type (chapter 1). See fp4.hpp.
#include "fp4.hpp"

#include <cmath>

namespace qlora {

//! [fp4-table]
// Code bits: s e e m. Magnitudes (codes 0..7) in the order the bit patterns give:
// 000 -> 0, 001 -> 0.0625/12 (the only subnormal), 010 -> 8/12, 011 -> 12/12,
// 100 -> 4/12, 101 -> 6/12, 110 -> 2/12, 111 -> 3/12.
// The literals are bitsandbytes' own, so the float32 roundings match.
const std::array<float, 16> fp4_table = {
    0.0f,  0.005208333333f,  0.66666667f,  1.0f,  0.33333333f,  0.5f,  0.16666667f,  0.25f,
    -0.0f, -0.005208333333f, -0.66666667f, -1.0f, -0.33333333f, -0.5f, -0.16666667f, -0.25f};
//! [fp4-table]

//! [fp4-encode]
std::uint8_t fp4_encode(float x) {
  // A binary search over the sorted magnitudes 0 < 1/192 < 1/6 < 1/4 < 1/3 < 1/2
  // < 2/3 < 1. Each threshold is the midpoint of two neighbours, written as the
  // float literal bitsandbytes uses (0.583333f and 0.4166667f are a few ulp off
  // the exact 7/12 and 5/12; we keep them, because the bytes must match).
  const std::uint8_t sign = x < 0.0f ? 0b1000 : 0b0000;
  const float a = std::fabs(x);
  if (a > 0.29166667f) {      // between 1/4 and 1/3
    if (a > 0.583333f) {      // between 1/2 and 2/3
      if (a > 0.8333333f) {   // between 2/3 and 1
        return 0b0011 | sign;  // 1
      }
      return 0b0010 | sign;  // 2/3
    }
    if (a > 0.4166667f) {  // between 1/3 and 1/2
      return 0b0101 | sign;  // 1/2
    }
    return 0b0100 | sign;  // 1/3
  }
  if (a > 0.0859375f) {    // between 1/192 and 1/6 (= 33/384, exact in float)
    if (a > 0.20833333f) {  // between 1/6 and 1/4
      return 0b0111 | sign;  // 1/4
    }
    return 0b0110 | sign;  // 1/6
  }
  if (a > 0.00260417f) {  // between 0 and 1/192 (1/384)
    return 0b0001 | sign;  // 1/192
  }
  return 0b0000 | sign;  // 0 (NaN lands here too: every comparison is false)
}
//! [fp4-encode]

}  // namespace qlora
