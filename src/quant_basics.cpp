// Quantization basics (chapter 1). See quant_basics.hpp.
#include "quant_basics.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>

namespace qlora {

void check_finite(std::span<const float> x, const char* what) {
  for (std::size_t i = 0; i < x.size(); ++i) {
    if (!std::isfinite(x[i])) {
      throw std::invalid_argument(std::string(what) + ": value at index " + std::to_string(i) + " is " +
                                  (std::isnan(x[i]) ? "NaN" : "infinite") +
                                  "; quantization needs finite input");
    }
  }
}

//! [error-stats]
ErrorStats compare(std::span<const float> ref, std::span<const float> approx) {
  if (ref.size() != approx.size()) {
    throw std::invalid_argument("compare: reference has " + std::to_string(ref.size()) +
                                " values but approximation has " + std::to_string(approx.size()));
  }
  ErrorStats s;
  s.count = static_cast<std::int64_t>(ref.size());
  double sum_sq_err = 0.0;
  double sum_sq_ref = 0.0;
  for (std::size_t i = 0; i < ref.size(); ++i) {
    const double e = static_cast<double>(ref[i]) - static_cast<double>(approx[i]);
    s.max_abs = std::max(s.max_abs, std::fabs(e));
    sum_sq_err += e * e;
    sum_sq_ref += static_cast<double>(ref[i]) * static_cast<double>(ref[i]);
  }
  if (!ref.empty()) s.rmse = std::sqrt(sum_sq_err / static_cast<double>(ref.size()));
  s.rel_frobenius = sum_sq_ref > 0.0 ? std::sqrt(sum_sq_err / sum_sq_ref) : (sum_sq_err > 0.0 ? INFINITY : 0.0);
  return s;
}
//! [error-stats]

static float max_abs(std::span<const float> x) {
  float m = 0.0f;
  for (float v : x) m = std::max(m, std::fabs(v));
  return m;
}

//! [absmax-quant]
AbsmaxQuant quantize_absmax(std::span<const float> x, int bits) {
  if (bits < 2 || bits > 8) {
    throw std::invalid_argument("quantize_absmax: bits must be in [2, 8], got " + std::to_string(bits));
  }
  check_finite(x, "quantize_absmax");
  AbsmaxQuant a;
  a.bits = bits;
  a.absmax = max_abs(x);
  a.q.resize(x.size());
  const int qmax = (1 << (bits - 1)) - 1;  // 127 for int8, 7 for int4: symmetric, -128/-8 unused
  if (a.absmax == 0.0f) return a;           // all zeros: every code is 0
  const float scale = static_cast<float>(qmax) / a.absmax;
  for (std::size_t i = 0; i < x.size(); ++i) {
    // nearbyint rounds half to even; |x| <= absmax keeps the code inside [-qmax, qmax].
    a.q[i] = static_cast<std::int8_t>(std::clamp(static_cast<int>(std::nearbyint(x[i] * scale)), -qmax, qmax));
  }
  return a;
}

std::vector<float> dequantize(const AbsmaxQuant& a) {
  const float step = a.absmax / static_cast<float>((1 << (a.bits - 1)) - 1);
  std::vector<float> out(a.q.size());
  for (std::size_t i = 0; i < a.q.size(); ++i) out[i] = static_cast<float>(a.q[i]) * step;
  return out;
}
//! [absmax-quant]

//! [zero-point-quant]
ZeroPointQuant quantize_zero_point(std::span<const float> x) {
  check_finite(x, "quantize_zero_point");
  ZeroPointQuant z;
  z.q.resize(x.size());
  if (x.empty()) return z;
  const auto [lo_it, hi_it] = std::minmax_element(x.begin(), x.end());
  // The range always contains 0, so that 0.0 has an exact code (padding, ReLU zeros).
  const float lo = std::min(*lo_it, 0.0f);
  const float hi = std::max(*hi_it, 0.0f);
  if (hi == lo) return z;  // all zeros: scale 0, every value dequantizes to 0
  z.scale = (hi - lo) / 255.0f;
  z.zero_point = std::clamp(static_cast<std::int32_t>(std::nearbyint(-lo / z.scale)), 0, 255);
  for (std::size_t i = 0; i < x.size(); ++i) {
    const int q = static_cast<int>(std::nearbyint(x[i] / z.scale)) + z.zero_point;
    z.q[i] = static_cast<std::uint8_t>(std::clamp(q, 0, 255));
  }
  return z;
}

std::vector<float> dequantize(const ZeroPointQuant& z) {
  std::vector<float> out(z.q.size(), 0.0f);
  for (std::size_t i = 0; i < z.q.size(); ++i) {
    out[i] = static_cast<float>(static_cast<std::int32_t>(z.q[i]) - z.zero_point) * z.scale;
  }
  return out;
}
//! [zero-point-quant]

std::vector<float> absmax_roundtrip(std::span<const float> x, int bits, std::size_t blocksize) {
  if (blocksize == 0) blocksize = std::max<std::size_t>(x.size(), 1);
  std::vector<float> out;
  out.reserve(x.size());
  for (std::size_t start = 0; start < x.size(); start += blocksize) {
    const auto block = x.subspan(start, std::min(blocksize, x.size() - start));
    const auto deq = dequantize(quantize_absmax(block, bits));
    out.insert(out.end(), deq.begin(), deq.end());
  }
  return out;
}

float flush_subnormal(float x) {
  return std::fpclassify(x) == FP_SUBNORMAL ? std::copysign(0.0f, x) : x;
}

float block_absmax_flushed(std::span<const float> block) {
  float m = 0.0f;
  for (float v : block) m = std::max(m, std::fabs(flush_subnormal(v)));
  return m;
}

//! [torch-linspace]
std::vector<float> torch_linspace_f32(float start, float end, int steps) {
  if (steps < 1) throw std::invalid_argument("torch_linspace_f32: steps must be >= 1");
  std::vector<float> out(static_cast<std::size_t>(steps));
  if (steps == 1) {
    out[0] = start;
    return out;
  }
  // PyTorch's CPU kernel (RangeFactoriesKernel.cpp): step in the output dtype,
  // then start + step*i below the halfway index and end - step*(steps-1-i) above.
  // The build of torch 2.11 on an AVX-512 machine fuses each product and sum into
  // one FMA (one rounding): the maps it gives match this, bit for bit, only with
  // std::fma (tests/fixtures/quant, produced by tools/make_quant_fixtures.py).
  const float step = (end - start) / static_cast<float>(steps - 1);
  const int halfway = steps / 2;
  for (int i = 0; i < steps; ++i) {
    out[static_cast<std::size_t>(i)] = i < halfway ? std::fma(step, static_cast<float>(i), start)
                                                   : std::fma(-step, static_cast<float>(steps - 1 - i), end);
  }
  return out;
}
//! [torch-linspace]

}  // namespace qlora
