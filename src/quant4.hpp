// Blockwise 4-bit quantization with optional double quantization: the storage
// format of QLoRA's frozen base weights (chapter 3, "Blockwise and double
// quantization"). Bit-exact with bitsandbytes' quantize_4bit / dequantize_4bit:
//  - the tensor is flattened and cut into blocks of `blocksize` values
//    (32..4096, a power of two; the final block may be partial);
//  - each block stores its absmax in float32 and its values as 4-bit codes of
//    x * (1 / absmax), picked from the NF4 or FP4 table (nf4.hpp, fp4.hpp), where
//    1 / absmax is the fast-math reciprocal (fast_math_reciprocal.hpp);
//  - two codes per byte, the first element in the HIGH nibble;
//  - with double quantization the float32 absmax vector is stored as uint8
//    codes of (absmax - mean) in 8-bit blockwise form (blocksize 256, the signed
//    dynamic map of dynamic_map.hpp), plus one float32 absmax per 256 scales
//    and the float32 mean ("offset").
#pragma once

#include "bf16.hpp"
#include "fast_math_reciprocal.hpp"

#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace qlora {

enum class QuantType { nf4, fp4 };

std::string to_string(QuantType t);
/// Parses "nf4" / "fp4"; throws std::invalid_argument naming the value otherwise.
QuantType parse_quant_type(const std::string& s);

/// Throws std::invalid_argument unless blocksize is a power of two in [32, 4096].
void check_blocksize(int blocksize);

/// The second level of double quantization: 8-bit blockwise codes of the absmax vector.
struct NestedScales {
  std::vector<std::uint8_t> codes;  ///< one code per first-level block
  std::vector<float> absmax;        ///< one float32 absmax per `blocksize` codes
  float offset = 0.0f;              ///< mean of the first-level absmax vector
  int blocksize = 256;
};

/// A tensor stored in 4 bits. numel values; shape is kept for serialization.
struct Quant4Tensor {
  QuantType type = QuantType::nf4;
  int blocksize = 64;
  std::vector<std::int64_t> shape;
  std::int64_t numel = 0;
  std::vector<std::uint8_t> packed;  ///< (numel + 1) / 2 bytes, first element in the high nibble
  bool double_quant = false;
  std::vector<float> absmax;  ///< per block, float32 (empty when double_quant)
  NestedScales nested;        ///< used when double_quant

  std::int64_t num_blocks() const { return (numel + blocksize - 1) / blocksize; }
  /// Bytes actually stored: packed codes + scales (+ nested scales and offset).
  std::int64_t storage_bytes() const;
  /// storage_bytes() * 8 / numel.
  double bits_per_parameter() const;
};

/// Quantizes float values (bf16 and f16 inputs are upcast exactly first). Throws
/// std::invalid_argument on NaN/Inf input, naming the index, or a bad blocksize.
/// `reciprocal` computes 1/absmax for both levels (see fast_math_reciprocal.hpp).
Quant4Tensor quantize_4bit(std::span<const float> x, std::vector<std::int64_t> shape, QuantType type,
                           int blocksize = 64, bool double_quant = false,
                           const Reciprocal& reciprocal = fast_math_reciprocal);

/// Double quantization's second level with a given offset: 8-bit blockwise codes
/// (blocksize 256, signed dynamic map) of absmax - offset. quantize_4bit passes
/// absmax_mean(absmax); the fixture tests pass bitsandbytes' own offset.
NestedScales double_quantize(std::span<const float> absmax, float offset,
                             const Reciprocal& reciprocal = fast_math_reciprocal);

/// The double-quantization offset: the mean of the absmax vector, summed in double and
/// rounded once to float32 (PyTorch's float32 mean may differ in the last bit).
float absmax_mean(std::span<const float> absmax);

/// The float32 absmax of every block (decoded from the nested codes with double quantization).
std::vector<float> block_absmax(const Quant4Tensor& q);

/// Dequantizes to float32: table[code] * absmax, computed in float32 (bitsandbytes' order).
std::vector<float> dequantize_4bit_f32(const Quant4Tensor& q);
/// Dequantizes to bf16: the float32 value above rounded to nearest even.
std::vector<bf16> dequantize_4bit_bf16(const Quant4Tensor& q);

}  // namespace qlora
