// bitsandbytes' 8-bit "dynamic" data type and blockwise 8-bit quantization with it
// (chapter 3, "Blockwise and double quantization"; chapter on 8-bit optimizers reuses
// it for Adam's states). The 256 values are decimal floating point numbers: a run of
// zeros picks the exponent (10^0 .. 10^-6) and the remaining bits a linear fraction,
// so the type covers seven decades with more resolution near zero.
#pragma once

#include "fast_math_reciprocal.hpp"

#include <array>
#include <cstdint>
#include <span>

namespace qlora {

/// create_dynamic_map(signed=is_signed, max_exponent_bits=7, total_bits=8): 256 float32
/// values sorted ascending; signed covers [-0.99297, 1], unsigned [0, 1].
std::array<float, 256> dynamic_map(bool is_signed);

// Compiled by nvcc, the search below is also a device function: the 8-bit AdamW kernel
// (kernels/adamw.cu) calls the same code as the CPU reference.
#ifdef __CUDACC__
#define QLORA_HOST_DEVICE __host__ __device__
#else
#define QLORA_HOST_DEVICE
#endif

//! [dynamic-quantize]
/// bitsandbytes' dQuantize<0>: a 7-step binary search for the bracketing values, then
/// rounding to the nearer of them by comparing against their float32 midpoint. `map`
/// points at the 256 ascending values of dynamic_map().
QLORA_HOST_DEVICE inline std::uint8_t dynamic_code(float x, const float* map) {
  // Binary search: after 7 halving steps `pivot` is a neighbour of x and
  // lower_pivot / upper_pivot the last indices seen below / above it.
  int pivot = 127;
  int upper_pivot = 255;
  int lower_pivot = 0;
  float lower = -1.0f;
  float upper = 1.0f;
  float val = map[pivot];
  for (int step = 64; step > 0; step >>= 1) {
    if (x > val) {
      lower_pivot = pivot;
      lower = val;
      pivot += step;
    } else {
      upper_pivot = pivot;
      upper = val;
      pivot -= step;
    }
    val = map[pivot];
  }
  // If the search never turned, the bracket is the end of the table.
  if (upper_pivot == 255) upper = map[255];
  if (lower_pivot == 0) lower = map[0];
  // Round to the nearer neighbour through the float32 midpoint; ties stay at `pivot`.
  // (a + b) · 0.5 is an add and an exact halving: no FMA can change it on either device.
  if (x > val) {
    const float midpoint = (upper + val) * 0.5f;
    return static_cast<std::uint8_t>(x > midpoint ? upper_pivot : pivot);
  }
  const float midpoint = (lower + val) * 0.5f;
  return static_cast<std::uint8_t>(x < midpoint ? lower_pivot : pivot);
}
//! [dynamic-quantize]

/// dynamic_code on a map held in a std::array.
inline std::uint8_t quantize_dynamic(float x, const std::array<float, 256>& map) { return dynamic_code(x, map.data()); }

/// Blockwise 8-bit quantization (kQuantizeBlockwise, General8bit): per block of
/// `blocksize` values absmax[b] = max |x|, codes = quantize_dynamic(x * reciprocal(absmax[b])).
/// codes.size() must equal x.size() and absmax.size() the number of blocks (the last
/// block may be partial). Throws std::invalid_argument on bad sizes, blocksize < 1 or
/// NaN/Inf input.
void quantize_blockwise_8bit(std::span<const float> x, int blocksize, const std::array<float, 256>& map,
                             std::span<std::uint8_t> codes, std::span<float> absmax,
                             const Reciprocal& reciprocal = fast_math_reciprocal);

/// The inverse: out[i] = map[codes[i]] * absmax[i / blocksize], in float32.
void dequantize_blockwise_8bit(std::span<const std::uint8_t> codes, int blocksize,
                               const std::array<float, 256>& map, std::span<const float> absmax,
                               std::span<float> out);

}  // namespace qlora
