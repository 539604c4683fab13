// The 8-bit dynamic data type and blockwise 8-bit quantization (chapter 3).
// See dynamic_map.hpp.
#include "dynamic_map.hpp"

#include "quant_basics.hpp"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

namespace qlora {

//! [dynamic-map]
std::array<float, 256> dynamic_map(bool is_signed) {
  // bitsandbytes' create_dynamic_map with max_exponent_bits = 7, total_bits = 8.
  // Exponent i (value scale 10^(i-6)) gets 2^i fraction values when signed (each
  // used with both signs) and 2^(i+1) when unsigned: 127*2 or 254 values, plus 0 and 1.
  // Each fraction value is the mean of two neighbours of linspace(0.1, 1, n).
  //
  // Bit-exactness: bitsandbytes builds the map with torch on the CPU in float32.
  // We follow each float32 rounding: torch.linspace's rule (torch_linspace_f32),
  // (b[k] + b[k+1]) / 2 in float32, and the scalar 10^(i-6) rounded to float32 before
  // the float32 product (torch casts a Python scalar to the tensor's dtype on the
  // CPU). torch 2.11's linspace fuses start + step*i into one FMA (checked against
  // its output); a torch build that does not fuse it would differ in the last bit.
  // tools/make_quant_fixtures.py dumps torch's maps so a test checks all 256 values.
  std::vector<float> data;
  for (int i = 0; i < 7; ++i) {
    const int n = is_signed ? (1 << i) + 1 : (1 << (i + 1)) + 1;
    const auto b = torch_linspace_f32(0.1f, 1.0f, n);
    const float scale = static_cast<float>(std::pow(10.0, i - 6));
    for (int k = 0; k + 1 < n; ++k) {
      const float mean = (b[k] + b[k + 1]) / 2.0f;
      data.push_back(scale * mean);
      if (is_signed) data.push_back(-(scale * mean));
    }
  }
  data.push_back(0.0f);
  data.push_back(1.0f);
  std::sort(data.begin(), data.end());
  std::array<float, 256> map{};
  std::copy(data.begin(), data.end(), map.begin());  // exactly 256 values, see above
  return map;
}
//! [dynamic-map]

static std::size_t num_blocks(std::size_t n, int blocksize) {
  return (n + static_cast<std::size_t>(blocksize) - 1) / static_cast<std::size_t>(blocksize);
}

static void check_sizes(const char* what, std::size_t n, int blocksize, std::size_t codes, std::size_t absmax) {
  if (blocksize < 1) throw std::invalid_argument(std::string(what) + ": blocksize must be >= 1");
  if (codes != n) {
    throw std::invalid_argument(std::string(what) + ": " + std::to_string(n) + " values but " +
                                std::to_string(codes) + " codes");
  }
  if (absmax != num_blocks(n, blocksize)) {
    throw std::invalid_argument(std::string(what) + ": " + std::to_string(num_blocks(n, blocksize)) +
                                " blocks but " + std::to_string(absmax) + " absmax values");
  }
}

//! [blockwise-8bit]
void quantize_blockwise_8bit(std::span<const float> x, int blocksize, const std::array<float, 256>& map,
                             std::span<std::uint8_t> codes, std::span<float> absmax, const Reciprocal& reciprocal) {
  check_sizes("quantize_blockwise_8bit", x.size(), blocksize, codes.size(), absmax.size());
  check_finite(x, "quantize_blockwise_8bit");
  const auto bs = static_cast<std::size_t>(blocksize);
  for (std::size_t b = 0; b < absmax.size(); ++b) {
    const std::size_t begin = b * bs;
    const std::size_t end = std::min(begin + bs, x.size());
    const float m = block_absmax_flushed(x.subspan(begin, end - begin));
    absmax[b] = m;
    // Like the CUDA kernel: multiply by the (fast-math) reciprocal. For an all-zero
    // block this is 0 * inf = NaN, which the search sends to code 0; it dequantizes to 0 again.
    const float inv = reciprocal(m);
    for (std::size_t i = begin; i < end; ++i) {
      codes[i] = quantize_dynamic(flush_subnormal(flush_subnormal(x[i]) * inv), map);
    }
  }
}

void dequantize_blockwise_8bit(std::span<const std::uint8_t> codes, int blocksize,
                               const std::array<float, 256>& map, std::span<const float> absmax,
                               std::span<float> out) {
  check_sizes("dequantize_blockwise_8bit", out.size(), blocksize, codes.size(), absmax.size());
  const auto bs = static_cast<std::size_t>(blocksize);
  for (std::size_t i = 0; i < codes.size(); ++i) {
    out[i] = flush_subnormal(map[codes[i]] * absmax[i / bs]);
  }
}
//! [blockwise-8bit]

}  // namespace qlora
