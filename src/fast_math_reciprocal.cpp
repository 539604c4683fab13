// The reciprocal of bitsandbytes' fast-math build. See fast_math_reciprocal.hpp.
#include "fast_math_reciprocal.hpp"

#include "quant_basics.hpp"

#include <bit>
#include <cmath>
#include <limits>
#include <sstream>
#include <stdexcept>

namespace qlora {

bool rcp_approx_is_known(float x) { return (std::bit_cast<std::uint32_t>(x) & 0xffffu) == 0; }

//! [rcp-approx-table]
float rcp_approx_ftz(float x) {
  if (!rcp_approx_is_known(x)) {
    std::ostringstream msg;
    msg << "rcp_approx_ftz: " << x << " is not a BF16 value; the GPU's reciprocal of it is not known on the CPU";
    throw std::invalid_argument(msg.str());
  }
  if (std::isnan(x)) return x;
  if (std::isinf(x)) return std::copysign(0.0f, x);
  const float flushed = flush_subnormal(x);  // .ftz: a subnormal input counts as zero
  if (flushed == 0.0f) return std::copysign(std::numeric_limits<float>::infinity(), x);
  // x = ±(1 + k/128) · 2^(E-127), so 1/x = ±rcp(1 + k/128) · 2^(127-E): the table entry
  // shifted by an exact power of two, unless the result leaves the normal range, where
  // .ftz flushes it (ldexp rounds a subnormal; flush_subnormal then makes it zero).
  const auto bits = std::bit_cast<std::uint32_t>(x);
  const int biased_exponent = static_cast<int>((bits >> 23) & 0xffu);
  const auto k = (bits >> 16) & 0x7fu;
  const float r = std::bit_cast<float>(rcp_approx_bf16_mantissa_bits[k]);
  return std::copysign(flush_subnormal(std::ldexp(r, 127 - biased_exponent)), x);
}
//! [rcp-approx-table]

float fast_math_reciprocal(float x) { return rcp_approx_is_known(x) ? rcp_approx_ftz(x) : 1.0f / x; }

}  // namespace qlora
