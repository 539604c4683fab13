// Chapter 3: blockwise NF4/FP4 and double quantization with bitsandbytes' rules
// (absmax per block, multiply by 1/absmax, high nibble first, odd lengths, partial
// last block, DQ with the signed dynamic map), edge cases, error bounds, bits per
// parameter from stored bytes, and comparisons with fixtures made by PyTorch
// (tools/make_quant_fixtures.py) when they are present. The comparison with
// bitsandbytes itself is tests/test_ch03_bnb_fixtures.cpp.
#include "bf16.hpp"
#include "dynamic_map.hpp"
#include "fast_math_reciprocal.hpp"
#include "fp4.hpp"
#include "nf4.hpp"
#include "quant4.hpp"
#include "quant_experiments.hpp"

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <bit>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <memory>
#include <random>

using namespace qlora;

namespace {

std::uint32_t fresh_seed() { return std::random_device{}(); }

// Normal values already rounded to bf16: what quantize_4bit sees for a bf16 weight.
std::vector<float> bf16_normal(std::size_t n, std::uint32_t seed, float sd = 0.02f) {
  auto v = normal_samples(n, seed, sd);
  for (auto& x : v) x = round_to_bf16(x);
  return v;
}

std::uint8_t code_at(const Quant4Tensor& q, std::size_t i) {
  return (i % 2 == 0) ? q.packed[i / 2] >> 4 : q.packed[i / 2] & 0x0f;
}

const std::array<float, 16>& table(QuantType t) { return t == QuantType::nf4 ? nf4_table : fp4_table; }

std::uint8_t encode(QuantType t, float x) { return t == QuantType::nf4 ? nf4_encode(x) : fp4_encode(x); }

// Largest gap between neighbouring table values (sorted), halved: the worst rounding error
// of a value in [-1, 1] relative to the absmax.
double half_largest_gap(QuantType t) {
  auto v = table(t);
  std::sort(v.begin(), v.end());
  double gap = 0.0;
  for (int k = 1; k < 16; ++k) gap = std::max(gap, double{v[k]} - double{v[k - 1]});
  return gap / 2.0;
}

// Checks the stored codes and absmax against the rules, element by element.
void check_rules(std::span<const float> x, const Quant4Tensor& q) {
  const auto bs = static_cast<std::size_t>(q.blocksize);
  REQUIRE(q.packed.size() == (x.size() + 1) / 2);
  REQUIRE(q.num_blocks() == static_cast<std::int64_t>((x.size() + bs - 1) / bs));
  for (std::size_t b = 0; b * bs < x.size(); ++b) {
    const std::size_t end = std::min((b + 1) * bs, x.size());
    float m = 0.0f;
    for (std::size_t i = b * bs; i < end; ++i) m = std::max(m, std::fabs(x[i]));
    if (!q.double_quant) REQUIRE(q.absmax[b] == m);
    const float inv = fast_math_reciprocal(m);  // bitsandbytes' rcp.approx where known (BF16 absmax)
    for (std::size_t i = b * bs; i < end; ++i) {
      INFO("element " << i);
      REQUIRE(code_at(q, i) == encode(q.type, x[i] * inv));
    }
  }
  if (x.size() % 2 == 1) {  // the padding zero in the last low nibble
    REQUIRE((q.packed.back() & 0x0f) == encode(q.type, 0.0f));
  }
}

std::vector<std::uint8_t> read_bytes(const std::filesystem::path& p) {
  std::ifstream f(p, std::ios::binary);
  REQUIRE(f.good());
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

template <typename T>
std::vector<T> read_array(const std::filesystem::path& p) {
  const auto bytes = read_bytes(p);
  REQUIRE(bytes.size() % sizeof(T) == 0);
  std::vector<T> out(bytes.size() / sizeof(T));
  std::memcpy(out.data(), bytes.data(), bytes.size());  // fixtures are little-endian, like x86-64
  return out;
}

const std::filesystem::path fixture_dir = std::filesystem::path(QLORA_FIXTURES_DIR) / "quant";

// The fixtures are committed: a missing one fails the test rather than passing it unchecked.
void require_fixture(const char* name) {
  INFO("fixture " << (fixture_dir / name).string()
                  << " is missing; tools/make_quant_fixtures.py makes it on a machine with PyTorch");
  REQUIRE(std::filesystem::exists(fixture_dir / name));
}

}  // namespace

TEST_CASE("blockwise NF4/FP4 follow bitsandbytes' rules on fresh random input", "[ch03][blockwise]") {
  const auto seed = fresh_seed();
  INFO("seed " << seed);
  for (QuantType t : {QuantType::nf4, QuantType::fp4}) {
    for (int bs : {32, 64, 128, 256, 4096}) {
      for (bool dq : {false, true}) {
        INFO(to_string(t) << " blocksize " << bs << " dq " << dq);
        // Odd length with a partial final block.
        const std::size_t n = static_cast<std::size_t>(bs) * 5 + 37;
        const auto x = bf16_normal(n, seed + static_cast<std::uint32_t>(bs));
        const auto q = quantize_4bit(x, {static_cast<std::int64_t>(n)}, t, bs, dq);
        CHECK(q.double_quant == dq);
        check_rules(x, q);
      }
    }
  }
}

TEST_CASE("first element goes into the high nibble", "[ch03][blockwise]") {
  // Two values: 1.0 (NF4 code 15) then -1.0 (code 0); absmax 1.
  const std::vector<float> x = {1.0f, -1.0f, 0.0f};
  const auto q = quantize_4bit(x, {3}, QuantType::nf4, 64);
  REQUIRE(q.packed.size() == 2);
  CHECK(q.packed[0] == 0xF0);
  CHECK(q.packed[1] == 0x77);  // 0.0 is code 7, and so is the padding zero
  const auto f = quantize_4bit(x, {3}, QuantType::fp4, 64);
  CHECK(f.packed[0] == 0x3B);  // FP4: +1 is 0b0011, -1 is 0b1011
  CHECK(f.packed[1] == 0x00);
}

TEST_CASE("all-zero block: absmax 0, dequantizes to exactly 0 (bitsandbytes' NaN path)", "[ch03][edge]") {
  const auto seed = fresh_seed();
  INFO("seed " << seed);
  auto x = bf16_normal(64 * 3, seed);
  std::fill(x.begin() + 64, x.begin() + 128, 0.0f);
  for (QuantType t : {QuantType::nf4, QuantType::fp4}) {
    INFO(to_string(t));
    const auto q = quantize_4bit(x, {192}, t, 64);
    CHECK(q.absmax[1] == 0.0f);
    // 0 * (1/0) = NaN; both trees answer NaN with code 0.
    for (std::size_t i = 64; i < 128; ++i) REQUIRE(code_at(q, i) == 0);
    const auto d = dequantize_4bit_f32(q);
    const auto b = dequantize_4bit_bf16(q);
    for (std::size_t i = 64; i < 128; ++i) {
      REQUIRE(d[i] == 0.0f);
      // NF4 code 0 is -1.0: -1 * 0 = -0.0 (bf16 0x8000); FP4 code 0 is +0.0.
      REQUIRE(b[i] == (t == QuantType::nf4 ? 0x8000 : 0x0000));
    }
  }
  const std::vector<float> zeros(100, 0.0f);
  for (bool dq : {false, true}) {
    const auto q = quantize_4bit(zeros, {10, 10}, QuantType::nf4, 64, dq);
    for (float a : block_absmax(q)) CHECK(a == 0.0f);
    for (float v : dequantize_4bit_f32(q)) CHECK(v == 0.0f);
  }
}

TEST_CASE("all-equal block and constant tensor round-trip exactly", "[ch03][edge]") {
  for (float c : {0.5f, -0.0390625f, 3.0f}) {
    for (QuantType t : {QuantType::nf4, QuantType::fp4}) {
      for (bool dq : {false, true}) {
        INFO("value " << c << " " << to_string(t) << " dq " << dq);
        const std::vector<float> x(1000, c);
        const auto q = quantize_4bit(x, {1000}, t, 64, dq);
        // Every block has the same absmax, so with DQ absmax - offset = 0 and the
        // nested absmax is 0: the decoded scale is the offset itself.
        for (float a : block_absmax(q)) REQUIRE(a == std::fabs(c));
        for (float v : dequantize_4bit_f32(q)) REQUIRE(v == c);
      }
    }
  }
}

TEST_CASE("bad input gives clear errors", "[ch03][edge]") {
  const auto x = bf16_normal(256, fresh_seed());
  for (int bs : {0, 16, 48, 100, 8192, -64}) {
    INFO("blocksize " << bs);
    CHECK_THROWS_WITH(quantize_4bit(x, {256}, QuantType::nf4, bs),
                      Catch::Contains("blocksize " + std::to_string(bs)) && Catch::Contains("not allowed"));
  }
  auto bad = x;
  bad[200] = std::numeric_limits<float>::quiet_NaN();
  CHECK_THROWS_WITH(quantize_4bit(bad, {256}, QuantType::nf4, 64), Catch::Contains("index 200") && Catch::Contains("NaN"));
  bad[200] = std::numeric_limits<float>::infinity();
  CHECK_THROWS_WITH(quantize_4bit(bad, {256}, QuantType::fp4, 64, true), Catch::Contains("infinite"));
  CHECK_THROWS_WITH(quantize_4bit(x, {16, 15}, QuantType::nf4, 64), Catch::Contains("240"));
  CHECK_THROWS_WITH(parse_quant_type("nf8"), Catch::Contains("nf8"));
  auto q = quantize_4bit(x, {256}, QuantType::nf4, 64);
  q.packed.pop_back();
  CHECK_THROWS_WITH(dequantize_4bit_f32(q), Catch::Contains("packed bytes"));
}

TEST_CASE("dequantize error is bounded per block by absmax x half the largest gap", "[ch03][error]") {
  const auto seed = fresh_seed();
  INFO("seed " << seed);
  for (QuantType t : {QuantType::nf4, QuantType::fp4}) {
    for (bool dq : {false, true}) {
      INFO(to_string(t) << " dq " << dq);
      const std::size_t n = 64 * 700 + 11;
      const auto x = bf16_normal(n, seed);
      const auto q = quantize_4bit(x, {static_cast<std::int64_t>(n)}, t, 64, dq);
      const auto exact = quantize_4bit(x, {static_cast<std::int64_t>(n)}, t, 64, false);
      const auto decoded = block_absmax(q);
      const auto d = dequantize_4bit_f32(q);
      const auto b = dequantize_4bit_bf16(q);
      const double h = half_largest_gap(t);
      for (std::size_t i = 0; i < n; ++i) {
        const double a = exact.absmax[i / 64];
        const double da = std::fabs(decoded[i / 64] - a);  // 0 without DQ
        // The code was chosen with the true absmax; DQ then rescales it by the decoded one.
        REQUIRE(std::fabs(double{d[i]} - x[i]) <= a * h * (1 + 1e-6) + da);
        REQUIRE(b[i] == f32_to_bf16(d[i]));
      }
      if (dq) {
        // DQ keeps the 4-bit codes; it only approximates the scales.
        CHECK(q.packed == exact.packed);
        double worst = 0.0;
        for (std::size_t k = 0; k < decoded.size(); ++k) {
          worst = std::max(worst, std::fabs(double{decoded[k]} - exact.absmax[k]) / exact.absmax[k]);
        }
        INFO("worst relative absmax error " << worst);
        CHECK(worst < 0.02);
      }
    }
  }
}

TEST_CASE("double quantization: offset, signed dynamic map, blocksize 256, decode formula", "[ch03][dq]") {
  const auto seed = fresh_seed();
  INFO("seed " << seed);
  const std::size_t n = 64 * 600 + 5;  // 601 blocks: three nested blocks, the last partial
  const auto x = bf16_normal(n, seed);
  const auto plain = quantize_4bit(x, {static_cast<std::int64_t>(n)}, QuantType::nf4, 64, false);
  const auto q = quantize_4bit(x, {static_cast<std::int64_t>(n)}, QuantType::nf4, 64, true);
  REQUIRE(q.absmax.empty());
  REQUIRE(q.nested.blocksize == 256);
  REQUIRE(q.nested.codes.size() == 601);
  REQUIRE(q.nested.absmax.size() == 3);
  double sum = 0.0;
  for (float a : plain.absmax) sum += a;
  CHECK(q.nested.offset == static_cast<float>(sum / 601.0));
  std::vector<float> centred(plain.absmax);
  for (float& a : centred) a -= q.nested.offset;
  const auto map = dynamic_map(true);
  for (std::size_t k = 0; k < centred.size(); ++k) {
    const std::size_t nb = k / 256;
    float m = 0.0f;
    for (std::size_t j = nb * 256; j < std::min(centred.size(), nb * 256 + 256); ++j) m = std::max(m, std::fabs(centred[j]));
    REQUIRE(q.nested.absmax[nb] == m);
    REQUIRE(q.nested.codes[k] == quantize_dynamic(centred[k] * fast_math_reciprocal(m), map));
  }
  const auto decoded = block_absmax(q);
  for (std::size_t k = 0; k < decoded.size(); ++k) {
    const float product = map[q.nested.codes[k]] * q.nested.absmax[k / 256];
    REQUIRE(decoded[k] == product + q.nested.offset);
  }
}

TEST_CASE("dynamic map: shape, search, midpoint rounding", "[ch03][dynamic]") {
  const auto s = dynamic_map(true);
  const auto u = dynamic_map(false);
  int neg = 0, zero = 0;
  for (int i = 0; i < 256; ++i) {
    if (i > 0) {
      CHECK(s[i - 1] < s[i]);
      CHECK(u[i - 1] < u[i]);
    }
    neg += s[i] < 0.0f;
    zero += s[i] == 0.0f;
  }
  CHECK(neg == 127);
  CHECK(zero == 1);
  CHECK(s[255] == 1.0f);
  CHECK(s[0] == -s[254]);  // ±0.99297: the largest fraction value, mirrored
  CHECK(u[0] == 0.0f);
  CHECK(u[255] == 1.0f);
  CHECK(std::fabs(s[0] + 0.99296875) < 1e-7);
  CHECK(s[128] == 1e-6f * ((0.1f + 1.0f) / 2.0f));  // the smallest positive value: 10^-6 * 0.55

  const auto seed = fresh_seed();
  INFO("seed " << seed);
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> uni(-1.0f, 1.0f);
  for (const auto* map : {&s, &u}) {
    for (int i = 0; i < 256; ++i) REQUIRE(quantize_dynamic((*map)[i], *map) == i);
    for (int i = 0; i < 100000; ++i) {
      // Mix uniform values with small ones, where the map is dense.
      float x = uni(rng);
      if (i % 2) x *= std::pow(10.0f, -static_cast<float>(i % 7));
      if (map == &u) x = std::fabs(x);
      const int c = quantize_dynamic(x, *map);
      double best = 1e9;
      for (float v : *map) best = std::min(best, std::fabs(double{x} - v));
      REQUIRE(std::fabs(double{x} - (*map)[c]) <= best + 1e-7 * std::fabs(double{x}));
    }
  }
  CHECK(quantize_dynamic(std::numeric_limits<float>::quiet_NaN(), s) == 0);

  // 8-bit blockwise round trip: error below half the local gap times the absmax.
  auto x = normal_samples(1000, seed);
  std::vector<std::uint8_t> codes(1000);
  std::vector<float> absmax(4), back(1000);
  quantize_blockwise_8bit(x, 256, s, codes, absmax);
  dequantize_blockwise_8bit(codes, 256, s, absmax, back);
  for (std::size_t i = 0; i < x.size(); ++i) REQUIRE(std::fabs(back[i] - x[i]) <= absmax[i / 256] * 0.0071);
  std::vector<float> wrong(3);
  CHECK_THROWS_WITH(quantize_blockwise_8bit(x, 256, s, codes, wrong), Catch::Contains("4 blocks"));
  CHECK_THROWS_WITH(quantize_blockwise_8bit(x, 0, s, codes, absmax), Catch::Contains("blocksize"));
}

TEST_CASE("bits per parameter from stored bytes: 4.5, ~4.127, and ~3 GB for 65B", "[ch03][bits]") {
  const auto rows = bits_experiment(64 * 256 * 64, 64, fresh_seed());
  REQUIRE(rows.size() == 2);
  const auto& plain = rows[0];
  const auto& dq = rows[1];
  CHECK(plain.storage_bytes == 64 * 256 * 64 / 2 + 4 * 256 * 64);
  CHECK(plain.bits_per_parameter == 4.5);
  CHECK(plain.formula == 4.5);
  // 524288 code bytes + 16384 absmax codes + 64 nested float32 absmax + 1 float32 offset.
  CHECK(dq.storage_bytes == 524288 + 16384 + 4 * 64 + 4);
  CHECK(dq.formula == Approx(4.126953125).epsilon(1e-12));
  CHECK(std::fabs(dq.bits_per_parameter - 4.127) < 5e-4);
  const double saved = plain.bits_per_parameter - dq.bits_per_parameter;
  CHECK(std::fabs(saved - 0.373) < 5e-4);
  const double gb = saving_gb(65e9, saved);
  CHECK(gb > 2.9);
  CHECK(gb < 3.1);
}

TEST_CASE("dynamic maps equal PyTorch's create_dynamic_map (fixture)", "[ch03][fixture]") {
  for (bool is_signed : {true, false}) {
    const char* name = is_signed ? "dynamic_map_signed.f32" : "dynamic_map_unsigned.f32";
    require_fixture(name);
    const auto torch_map = read_array<float>(fixture_dir / name);
    REQUIRE(torch_map.size() == 256);
    const auto ours = dynamic_map(is_signed);
    for (int i = 0; i < 256; ++i) {
      INFO(name << " index " << i);
      CHECK(std::bit_cast<std::uint32_t>(ours[i]) == std::bit_cast<std::uint32_t>(torch_map[i]));
    }
  }
}

TEST_CASE("absmax mean equals torch.mean to the last bit or one ulp (fixture)", "[ch03][fixture]") {
  require_fixture("absmax_mean.json");
  require_fixture("absmax_mean_input.f32");
  const auto meta = nlohmann::json::parse(read_bytes(fixture_dir / "absmax_mean.json"));
  const auto v = read_array<float>(fixture_dir / "absmax_mean_input.f32");
  REQUIRE(v.size() == meta.at("n").get<std::size_t>());
  const float ours = absmax_mean(v);
  for (const char* key : {"torch_cpu_mean", "torch_cuda_mean"}) {
    INFO(key);
    REQUIRE((meta.contains(key) && !meta.at(key).is_null()));
    const auto theirs = meta.at(key).get<float>();
    INFO(key << ": ours " << ours << " torch " << theirs);
    const auto d = std::abs(static_cast<std::int64_t>(std::bit_cast<std::uint32_t>(ours)) -
                            static_cast<std::int64_t>(std::bit_cast<std::uint32_t>(theirs)));
    CHECK(d <= 1);
  }
}

TEST_CASE("qlora tables prints the chapters' numbers", "[ch03][cli]") {
  const char* bin = std::getenv("QLORA_BIN");
  INFO("QLORA_BIN names the qlora binary; ctest sets it");
  REQUIRE(bin != nullptr);
  auto run = [&](const std::string& args) {
    const std::string cmd = std::string(bin) + " tables " + args + " --format json";
    std::unique_ptr<FILE, int (*)(FILE*)> pipe(popen(cmd.c_str(), "r"), pclose);
    REQUIRE(pipe != nullptr);
    std::string text;
    char buf[4096];
    while (std::size_t n = std::fread(buf, 1, sizeof buf, pipe.get())) text.append(buf, n);
    INFO(cmd);
    return nlohmann::json::parse(text);
  };
  const auto bits = run("bits");
  CHECK(bits.at("rows").at(0).at("bits_per_parameter").get<double>() == 4.5);
  CHECK(std::fabs(bits.at("rows").at(1).at("bits_per_parameter").get<double>() - 4.127) < 5e-4);
  CHECK(std::fabs(bits.at("saving_gb").get<double>() - 3.03) < 0.01);
  const auto nf4 = run("nf4");
  CHECK(nf4.at("float32_recipe_equal_codes").get<int>() == 16);
  const auto err = run("error --blocks 512");
  double rmse[3];
  for (int i = 0; i < 3; ++i) rmse[i] = err.at("rows").at(i).at("rmse").get<double>();
  CHECK(err.at("rows").at(0).at("format") == "nf4");
  CHECK(rmse[0] < rmse[1]);
  CHECK(rmse[0] < rmse[2]);
}
