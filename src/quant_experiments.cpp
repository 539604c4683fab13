// Measurements for chapters 1-3. See quant_experiments.hpp.
#include "quant_experiments.hpp"

#include "quant4.hpp"

#include <random>
#include <stdexcept>

namespace qlora {

std::vector<float> normal_samples(std::size_t n, std::uint32_t seed, float sd) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, sd);
  std::vector<float> v(n);
  for (auto& x : v) x = normal(rng);
  return v;
}

std::vector<float> roundtrip_4bit(std::span<const float> x, const std::string& format, int blocksize) {
  if (format != "nf4" && format != "fp4" && format != "int4") {
    throw std::invalid_argument("unknown 4-bit format '" + format + "' (expected nf4, fp4 or int4)");
  }
  if (format == "int4") {
    check_blocksize(blocksize);
    return absmax_roundtrip(x, 4, static_cast<std::size_t>(blocksize));
  }
  const auto q = quantize_4bit(x, {static_cast<std::int64_t>(x.size())}, parse_quant_type(format), blocksize);
  return dequantize_4bit_f32(q);
}

// Error on every value except index `skip`.
static ErrorStats compare_except(std::span<const float> ref, std::span<const float> approx, std::size_t skip) {
  std::vector<float> r, a;
  for (std::size_t i = 0; i < ref.size(); ++i) {
    if (i == skip) continue;
    r.push_back(ref[i]);
    a.push_back(approx[i]);
  }
  return compare(r, a);
}

std::vector<OutlierRow> outlier_experiment(std::size_t n, float outlier, std::uint32_t seed, int blocksize) {
  if (n < 2) throw std::invalid_argument("outlier experiment: need at least 2 values");
  check_blocksize(blocksize);
  const auto clean = normal_samples(n, seed);
  auto spiked = clean;
  const std::size_t at = n / 2;
  spiked[at] = outlier;
  const auto bs = static_cast<std::size_t>(blocksize);
  const std::string blk = "blockwise-" + std::to_string(blocksize);
  struct Scheme {
    std::string name;
    std::vector<float> (*run)(std::span<const float>, std::size_t);
  };
  const std::vector<Scheme> schemes = {
      {"int8 tensor-wide", [](std::span<const float> x, std::size_t) { return absmax_roundtrip(x, 8, 0); }},
      {"int4 tensor-wide", [](std::span<const float> x, std::size_t) { return absmax_roundtrip(x, 4, 0); }},
      {"int8 " + blk, [](std::span<const float> x, std::size_t b) { return absmax_roundtrip(x, 8, b); }},
      {"int4 " + blk, [](std::span<const float> x, std::size_t b) { return absmax_roundtrip(x, 4, b); }},
      {"nf4 " + blk,
       [](std::span<const float> x, std::size_t b) { return roundtrip_4bit(x, "nf4", static_cast<int>(b)); }},
  };
  std::vector<OutlierRow> rows;
  for (const auto& s : schemes) {
    rows.push_back({s.name, compare_except(clean, s.run(clean, bs), at), compare_except(spiked, s.run(spiked, bs), at)});
  }
  return rows;
}

std::vector<BitsRow> bits_experiment(std::int64_t numel, int blocksize, std::uint32_t seed) {
  if (numel < 1) throw std::invalid_argument("bits experiment: --numel must be positive");
  check_blocksize(blocksize);
  const auto x = normal_samples(static_cast<std::size_t>(numel), seed, 0.02f);
  std::vector<BitsRow> rows;
  for (bool dq : {false, true}) {
    const auto q = quantize_4bit(x, {numel}, QuantType::nf4, blocksize, dq);
    const double b = blocksize;
    rows.push_back({dq, numel, q.storage_bytes(), q.bits_per_parameter(),
                    dq ? 4.0 + 8.0 / b + 32.0 / (b * 256.0) : 4.0 + 32.0 / b});
  }
  return rows;
}

double saving_gb(double params, double bits_saved) { return params * bits_saved / 8.0 / 1e9; }

}  // namespace qlora
