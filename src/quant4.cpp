// Blockwise 4-bit quantization and double quantization (chapter 3), bit-exact with
// bitsandbytes' quantize_4bit / dequantize_4bit. See quant4.hpp.
//
// Where each rule comes from in bitsandbytes:
//  - kQuantizeBlockwise (csrc/kernels.cu): absmax per block in float32, scaled value
//    x * (1.0f / absmax), dQuantizeNF4 / dQuantizeFP4, first element in the high nibble,
//    a partial last block padded with zeros that are quantized too (they fill the low
//    nibble of the last byte when the length is odd);
//  - quantize_4bit (functional.py) with compress_statistics: offset = absmax.mean(),
//    then quantize_blockwise(absmax - offset, blocksize=256) with the signed dynamic map;
//  - dequantize_4bit: absmax = dequantize_blockwise(...) then `absmax += offset` (a
//    float32 multiply, then a separate float32 add: no FMA), and the 4-bit kernel
//    computes table[code] * absmax in float32 and converts to bf16 (round to nearest even).
//
// bitsandbytes' CUDA library is compiled with --use_fast_math. Two consequences:
// subnormals are flushed to zero (we do the same: flush_subnormal), and 1.0f / absmax
// is the approximate reciprocal rcp.approx.ftz.f32 (at most 1 ulp off). We use it where
// the CPU knows it, for a BF16 absmax, and the IEEE quotient elsewhere
// (fast_math_reciprocal.hpp); the codes can then only differ, for F16/F32 input, when
// x / absmax falls within an ulp of a decision threshold.
#include "quant4.hpp"

#include "dynamic_map.hpp"
#include "fast_math_reciprocal.hpp"
#include "fp4.hpp"
#include "nf4.hpp"
#include "quant_basics.hpp"

#include <algorithm>
#include <cmath>
#include <stdexcept>

namespace qlora {

std::string to_string(QuantType t) { return t == QuantType::nf4 ? "nf4" : "fp4"; }

QuantType parse_quant_type(const std::string& s) {
  if (s == "nf4") return QuantType::nf4;
  if (s == "fp4") return QuantType::fp4;
  throw std::invalid_argument("unknown 4-bit quantization type '" + s + "' (expected nf4 or fp4)");
}

void check_blocksize(int blocksize) {
  const bool power_of_two = blocksize > 0 && (blocksize & (blocksize - 1)) == 0;
  if (!power_of_two || blocksize < 32 || blocksize > 4096) {
    throw std::invalid_argument("blocksize " + std::to_string(blocksize) +
                                " is not allowed (expected a power of two from 32 to 4096)");
  }
}

//! [storage-bytes]
std::int64_t Quant4Tensor::storage_bytes() const {
  const auto bytes = static_cast<std::int64_t>(packed.size());
  if (!double_quant) return bytes + 4 * static_cast<std::int64_t>(absmax.size());
  return bytes + static_cast<std::int64_t>(nested.codes.size())  // one uint8 per block
         + 4 * static_cast<std::int64_t>(nested.absmax.size())   // one float32 per 256 blocks
         + 4;                                                     // the float32 offset
}
//! [storage-bytes]

double Quant4Tensor::bits_per_parameter() const {
  return numel == 0 ? 0.0 : 8.0 * static_cast<double>(storage_bytes()) / static_cast<double>(numel);
}

static const std::array<float, 16>& table_of(QuantType t) { return t == QuantType::nf4 ? nf4_table : fp4_table; }

static std::uint8_t encode(QuantType t, float scaled) { return t == QuantType::nf4 ? nf4_encode(scaled) : fp4_encode(scaled); }

//! [absmax-mean]
// The DQ offset. PyTorch's absmax.mean() reduces in float32 in its own (device
// dependent) order; we sum in double and round once, which is at least as accurate.
// The two can differ in the last bit, and then, rarely, an absmax code by ±1.
float absmax_mean(std::span<const float> v) {
  if (v.empty()) return 0.0f;
  double sum = 0.0;
  for (float x : v) sum += x;
  return static_cast<float>(sum / static_cast<double>(v.size()));
}
//! [absmax-mean]

//! [quantize-4bit]
Quant4Tensor quantize_4bit(std::span<const float> x, std::vector<std::int64_t> shape, QuantType type, int blocksize,
                           bool double_quant, const Reciprocal& reciprocal) {
  check_blocksize(blocksize);
  std::int64_t shape_numel = 1;
  for (auto d : shape) {
    if (d < 0) throw std::invalid_argument("quantize_4bit: negative dimension in shape");
    shape_numel *= d;
  }
  if (shape_numel != static_cast<std::int64_t>(x.size())) {
    throw std::invalid_argument("quantize_4bit: shape has " + std::to_string(shape_numel) + " elements but " +
                                std::to_string(x.size()) + " values were given");
  }
  check_finite(x, "quantize_4bit");

  Quant4Tensor q;
  q.type = type;
  q.blocksize = blocksize;
  q.shape = std::move(shape);
  q.numel = static_cast<std::int64_t>(x.size());
  q.packed.assign((x.size() + 1) / 2, 0);
  std::vector<float> absmax(static_cast<std::size_t>(q.num_blocks()));

  const auto bs = static_cast<std::size_t>(blocksize);
  for (std::size_t b = 0; b < absmax.size(); ++b) {
    const std::size_t begin = b * bs;
    const std::size_t end = std::min(begin + bs, x.size());
    const float m = block_absmax_flushed(x.subspan(begin, end - begin));
    absmax[b] = m;
    // Scale by the reciprocal, as the kernel does: x * (1/absmax), not x / absmax, and
    // 1/absmax is the fast-math build's rcp.approx where we know it. An all-zero block
    // has m = 0, so inv = inf and every scaled value is 0 * inf = NaN: NF4's tree sends
    // NaN to code 0 (-1.0, which times absmax 0 dequantizes to -0.0), FP4's to code 0 (+0.0).
    const float inv = reciprocal(m);
    // A block starts at an even index (blocksize is even), so pairs never straddle
    // blocks. An odd last element is paired with a padding zero, quantized like the rest.
    for (std::size_t i = begin; i < end; i += 2) {
      const float hi = flush_subnormal(x[i]);
      const float lo = i + 1 < end ? flush_subnormal(x[i + 1]) : 0.0f;
      const std::uint8_t c_hi = encode(type, flush_subnormal(hi * inv));
      const std::uint8_t c_lo = encode(type, flush_subnormal(lo * inv));
      q.packed[i / 2] = static_cast<std::uint8_t>((c_hi << 4) | c_lo);  // first element: high nibble
    }
  }

  if (!double_quant) {
    q.absmax = std::move(absmax);
    return q;
  }
  // Double quantization: the absmax vector is itself quantized, to 8 bits with a
  // shared float32 absmax per 256 scales, after removing its mean (absmax values
  // are all positive, so centring uses the signed map's full range).
  q.double_quant = true;
  q.nested = double_quantize(absmax, absmax_mean(absmax), reciprocal);
  return q;
}
//! [quantize-4bit]

NestedScales double_quantize(std::span<const float> absmax, float offset, const Reciprocal& reciprocal) {
  NestedScales n;
  n.blocksize = 256;
  n.offset = offset;
  std::vector<float> centred(absmax.begin(), absmax.end());
  for (float& a : centred) a -= offset;  // torch's `absmax - offset`: one float32 subtraction
  n.codes.resize(centred.size());
  n.absmax.resize((centred.size() + 255) / 256);
  quantize_blockwise_8bit(centred, n.blocksize, dynamic_map(true), n.codes, n.absmax, reciprocal);
  return n;
}

//! [block-absmax]
std::vector<float> block_absmax(const Quant4Tensor& q) {
  if (!q.double_quant) return q.absmax;
  std::vector<float> absmax(q.nested.codes.size());
  dequantize_blockwise_8bit(q.nested.codes, q.nested.blocksize, dynamic_map(true), q.nested.absmax, absmax);
  for (float& a : absmax) a += q.nested.offset;  // separate float32 add, as `absmax += offset`
  return absmax;
}
//! [block-absmax]

//! [dequantize-4bit]
std::vector<float> dequantize_4bit_f32(const Quant4Tensor& q) {
  if (static_cast<std::int64_t>(q.packed.size()) != (q.numel + 1) / 2) {
    throw std::invalid_argument("dequantize_4bit: " + std::to_string(q.packed.size()) + " packed bytes for " +
                                std::to_string(q.numel) + " values");
  }
  check_blocksize(q.blocksize);
  const auto absmax = block_absmax(q);
  if (static_cast<std::int64_t>(absmax.size()) != q.num_blocks()) {
    throw std::invalid_argument("dequantize_4bit: " + std::to_string(absmax.size()) + " scales for " +
                                std::to_string(q.num_blocks()) + " blocks");
  }
  const auto& table = table_of(q.type);
  const auto bs = static_cast<std::size_t>(q.blocksize);
  std::vector<float> out(static_cast<std::size_t>(q.numel));
  for (std::size_t i = 0; i < out.size(); ++i) {
    const std::uint8_t byte = q.packed[i / 2];
    const std::uint8_t code = (i % 2 == 0) ? byte >> 4 : byte & 0x0f;
    out[i] = flush_subnormal(table[code] * absmax[i / bs]);
  }
  return out;
}

std::vector<bf16> dequantize_4bit_bf16(const Quant4Tensor& q) {
  const auto f = dequantize_4bit_f32(q);
  return to_bf16(f);
}
//! [dequantize-4bit]

}  // namespace qlora
