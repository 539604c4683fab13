// Quantization basics (chapter 1): absmax (symmetric) integer quantization in
// 8 and 4 bits, zero-point (asymmetric) 8-bit quantization, the error metrics the
// book uses everywhere, and two pieces of float32 arithmetic that later chapters
// reproduce from PyTorch and bitsandbytes' CUDA build.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

namespace qlora {

/// How far an approximation is from a reference.
struct ErrorStats {
  double max_abs = 0.0;        ///< max_i |ref_i - approx_i|
  double rmse = 0.0;           ///< sqrt(mean_i (ref_i - approx_i)^2)
  double rel_frobenius = 0.0;  ///< ||ref - approx||_2 / ||ref||_2 (0 when both are zero)
  std::int64_t count = 0;      ///< number of values compared
};

/// Compares two equally long vectors, accumulating in double. Throws std::invalid_argument
/// when the lengths differ.
ErrorStats compare(std::span<const float> ref, std::span<const float> approx);

/// Symmetric ("absmax") integer quantization: q = round(x * qmax / absmax), qmax = 2^(bits-1) - 1.
struct AbsmaxQuant {
  int bits = 8;
  float absmax = 0.0f;        ///< max |x|; 0 for an all-zero input
  std::vector<std::int8_t> q;  ///< codes in [-qmax, qmax]
};

/// Quantizes with one absmax for the whole input. bits must be in [2, 8]; throws
/// std::invalid_argument for other bit widths and for NaN/Inf input (naming the index).
AbsmaxQuant quantize_absmax(std::span<const float> x, int bits);
/// q * absmax / qmax, in float32.
std::vector<float> dequantize(const AbsmaxQuant& a);

/// Asymmetric ("zero-point") 8-bit quantization: the range [min, max] is mapped onto
/// 0..255, q = clamp(round(x / scale) + zero_point, 0, 255). The range is widened to
/// contain 0 so that 0.0 has an exact code.
struct ZeroPointQuant {
  float scale = 0.0f;           ///< (max - min) / 255 over a range widened to contain 0; 0 for all zeros
  std::int32_t zero_point = 0;  ///< the code that stands for 0.0
  std::vector<std::uint8_t> q;
};

/// Throws std::invalid_argument for NaN/Inf input (naming the index).
ZeroPointQuant quantize_zero_point(std::span<const float> x);
/// (q - zero_point) * scale, in float32.
std::vector<float> dequantize(const ZeroPointQuant& z);

/// Absmax quantization applied block by block (blocksize 0 = one block for the whole
/// input), returned already dequantized: the round trip chapter 1 measures.
std::vector<float> absmax_roundtrip(std::span<const float> x, int bits, std::size_t blocksize = 0);

/// Throws std::invalid_argument naming `what` and the index of the first NaN/Inf in x.
void check_finite(std::span<const float> x, const char* what);

/// bitsandbytes' CUDA library is built with --use_fast_math, which flushes subnormal
/// float32 values to (signed) zero; the reference does the same where it matters.
float flush_subnormal(float x);

/// max |x| over a block, subnormals flushed first (as bitsandbytes' fast-math kernels do).
/// The per-block scale of every blockwise quantizer (4-bit and 8-bit).
float block_absmax_flushed(std::span<const float> block);

/// torch.linspace(start, end, steps, dtype=float32) on the CPU, value for value: the
/// step is computed in float32, the first half counts up from start, the second half
/// down from end (so the end point is exact).
std::vector<float> torch_linspace_f32(float start, float end, int steps);

}  // namespace qlora
