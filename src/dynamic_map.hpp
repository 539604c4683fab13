// bitsandbytes' 8-bit "dynamic" data type and blockwise 8-bit quantization with it
// (chapter 3, "Blockwise and double quantization"; chapter on 8-bit optimizers reuses
// it for Adam's states). The 256 values are decimal floating point numbers: a run of
// zeros picks the exponent (10^0 .. 10^-6) and the remaining bits a linear fraction,
// so the type covers seven decades with more resolution near zero.
#pragma once

#include <array>
#include <cstdint>
#include <span>

namespace qlora {

/// create_dynamic_map(signed=is_signed, max_exponent_bits=7, total_bits=8): 256 float32
/// values sorted ascending; signed covers [-0.99297, 1], unsigned [0, 1].
std::array<float, 256> dynamic_map(bool is_signed);

/// bitsandbytes' dQuantize<0>: a 7-step binary search for the bracketing values, then
/// rounding to the nearer of them by comparing against their float32 midpoint.
std::uint8_t quantize_dynamic(float x, const std::array<float, 256>& map);

/// Blockwise 8-bit quantization (kQuantizeBlockwise, General8bit): per block of
/// `blocksize` values absmax[b] = max |x|, codes = quantize_dynamic(x * (1 / absmax[b])).
/// codes.size() must equal x.size() and absmax.size() the number of blocks (the last
/// block may be partial). Throws std::invalid_argument on bad sizes, blocksize < 1 or
/// NaN/Inf input.
void quantize_blockwise_8bit(std::span<const float> x, int blocksize, const std::array<float, 256>& map,
                             std::span<std::uint8_t> codes, std::span<float> absmax);

/// The inverse: out[i] = map[codes[i]] * absmax[i / blocksize], in float32.
void dequantize_blockwise_8bit(std::span<const std::uint8_t> codes, int blocksize,
                               const std::array<float, 256>& map, std::span<const float> absmax,
                               std::span<float> out);

}  // namespace qlora
