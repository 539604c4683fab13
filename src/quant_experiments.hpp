// The measurements chapters 1-3 report, in one place so that the `qlora tables`
// command prints exactly what the tests assert: 4-bit data types compared on
// normally distributed blocks (chapter 2), the outlier problem of a tensor-wide
// absmax (chapter 1), and bits per parameter from stored bytes (chapter 3).
#pragma once

#include "quant_basics.hpp"

#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace qlora {

/// n samples of N(0, sd²) from std::mt19937(seed) and std::normal_distribution<float>
/// (libstdc++'s; another standard library would draw other numbers).
std::vector<float> normal_samples(std::size_t n, std::uint32_t seed, float sd = 1.0f);

/// The 4-bit formats compared in chapter 2, all blockwise with a float32 absmax per block.
inline const std::vector<std::string> four_bit_formats = {"nf4", "fp4", "int4"};

/// Quantizes and dequantizes x blockwise (no double quantization) with `format`
/// ("nf4", "fp4" or "int4" = symmetric absmax integers -7..7), in float32.
/// Throws std::invalid_argument for another format name.
std::vector<float> roundtrip_4bit(std::span<const float> x, const std::string& format, int blocksize);

/// One row of the outlier table: a scheme's error on the ordinary values of a tensor,
/// without and with one large outlier added.
struct OutlierRow {
  std::string scheme;   ///< e.g. "int8 tensor-wide", "int4 blockwise-64", "nf4 blockwise-64"
  ErrorStats without;   ///< error on the n - 1 ordinary values, tensor without the outlier
  ErrorStats with;      ///< error on the same values, tensor with the outlier
};

/// n normal values (sd 1) with and without x[n/2] replaced by `outlier`; error measured on
/// every value except that one. Schemes: int8 and int4 with one absmax for the tensor,
/// int8, int4 and NF4 with one absmax per `blocksize` values.
std::vector<OutlierRow> outlier_experiment(std::size_t n, float outlier, std::uint32_t seed, int blocksize);

/// Stored bytes and bits per parameter of one tensor quantized with and without DQ.
struct BitsRow {
  bool double_quant = false;
  std::int64_t numel = 0;
  std::int64_t storage_bytes = 0;
  double bits_per_parameter = 0.0;  ///< measured: storage_bytes * 8 / numel
  double formula = 0.0;             ///< 4 + 32/blocksize, or 4 + 8/blocksize + 32/(blocksize*256)
};

/// Quantizes normal_samples(numel, seed) with NF4 (without, then with double quantization).
std::vector<BitsRow> bits_experiment(std::int64_t numel, int blocksize, std::uint32_t seed);

/// Gigabytes (10^9 bytes) saved by `bits_saved` bits per parameter over `params` parameters.
double saving_gb(double params, double bits_saved);

}  // namespace qlora
