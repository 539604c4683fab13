// Chapter 3: the safetensors container. Round trips, the reference writer's layout
// (dtype-aligned data, header padded to 8 bytes), exact F16 decoding, and a clear
// error naming the file and the tensor for every kind of corrupt or truncated file.
#include "file_helpers.hpp"
#include "safetensors.hpp"

#include <catch2/catch.hpp>

#include <bit>
#include <cmath>
#include <cstring>
#include <fstream>
#include <optional>
#include <random>
#include <unistd.h>

using namespace qlora;
using test::read_bytes;
using test::write_bytes;
namespace fs = std::filesystem;

namespace {

fs::path temp_path(const std::string& name) { return test::temp_path("test_ch03_st", name); }

// A file made by hand: u64 length (the header's own unless overridden), header, data.
fs::path craft(const std::string& name, const std::string& header, std::size_t data_bytes,
               std::optional<std::uint64_t> length = std::nullopt) {
  std::vector<std::uint8_t> b(8 + header.size() + data_bytes, 0x5a);
  std::uint64_t n = length.value_or(header.size());
  std::memcpy(b.data(), &n, 8);
  std::memcpy(b.data() + 8, header.data(), header.size());
  auto p = temp_path(name);
  write_bytes(p, b);
  return p;
}

// Checks that reading p fails and that the message names the file and every fragment.
void expect_error(const fs::path& p, std::initializer_list<std::string> fragments) {
  try {
    read_safetensors(p);
    FAIL("reading " << p << " should have failed");
  } catch (const std::runtime_error& e) {
    std::string msg = e.what();
    INFO(msg);
    CHECK(msg.find(p.string()) != std::string::npos);
    for (const auto& f : fragments) CHECK(msg.find(f) != std::string::npos);
  }
}

const std::string kOneTensor = R"("w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]})";

}  // namespace

TEST_CASE("safetensors round trip keeps every dtype, shape, byte and the metadata", "[ch03][safetensors]") {
  std::mt19937 rng(1234);
  std::normal_distribution<float> normal;
  SafeTensors st;
  std::vector<float> f(7 * 5);
  for (auto& v : f) v = normal(rng);
  st.tensors["layer.weight"] = Tensor::from_f32(f, {7, 5});
  st.tensors["layer.bias_bf16"] = Tensor::from_bf16(to_bf16(std::vector<float>(f.begin(), f.begin() + 5)), {5});
  std::vector<std::uint8_t> u(13);
  for (auto& v : u) v = static_cast<std::uint8_t>(rng());
  st.tensors["codes"] = Tensor::from_u8(u, {13, 1});
  Tensor scalar;  // rank-0 I64 and an empty F16 tensor are legal too
  scalar.dtype = DType::I64;
  scalar.data.resize(8);
  std::int64_t s = -42;
  std::memcpy(scalar.data.data(), &s, 8);
  st.tensors["step"] = scalar;
  Tensor empty;
  empty.dtype = DType::F16;
  empty.shape = {0, 4};
  st.tensors["empty"] = empty;
  st.metadata["format"] = "pt";
  st.metadata["note"] = "Grüße";

  auto p = temp_path("roundtrip.safetensors");
  write_safetensors(p, st);
  auto back = read_safetensors(p);
  REQUIRE(back.tensors.size() == st.tensors.size());
  for (const auto& [name, t] : st.tensors) {
    INFO(name);
    const auto& b = back.at(name);
    CHECK(b.dtype == t.dtype);
    CHECK(b.shape == t.shape);
    CHECK(b.data == t.data);
  }
  CHECK(back.metadata == st.metadata);
  CHECK(back.at("layer.weight").to_f32() == f);
  CHECK_FALSE(fs::exists(p.string() + ".tmp"));
}

TEST_CASE("safetensors writer lays data out as the reference implementation does", "[ch03][safetensors]") {
  SafeTensors st;
  st.tensors["a"] = Tensor::from_u8(std::vector<std::uint8_t>{1, 2, 3}, {3});
  st.tensors["b"] = Tensor::from_f32(std::vector<float>{1.5f}, {1});
  st.tensors["c"] = Tensor::from_bf16(std::vector<bf16>{0x3f80}, {1, 1});
  st.metadata["format"] = "pt";
  auto p = temp_path("layout.safetensors");
  write_safetensors(p, st);
  auto bytes = read_bytes(p);
  std::uint64_t n = 0;
  std::memcpy(&n, bytes.data(), 8);
  CHECK(n % 8 == 0);  // padded with spaces so the data starts 8-byte aligned
  std::string header(bytes.begin() + 8, bytes.begin() + 8 + static_cast<std::ptrdiff_t>(n));
  // Descending dtype alignment (F32, BF16, U8), then name; metadata first; compact JSON.
  std::string expect =
      R"({"__metadata__":{"format":"pt"},"b":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
      R"("c":{"dtype":"BF16","shape":[1,1],"data_offsets":[4,6]},"a":{"dtype":"U8","shape":[3],"data_offsets":[6,9]}})";
  expect.append((8 - expect.size() % 8) % 8, ' ');
  CHECK(header == expect);
  CHECK(bytes.size() == 8 + n + 9);
  float b = 0;
  std::memcpy(&b, bytes.data() + 8 + n, 4);
  CHECK(b == 1.5f);
}

TEST_CASE("F16 decodes exactly: normals, subnormals, signed zeros, infinities, NaN", "[ch03][safetensors]") {
  CHECK(f16_to_f32(0x3c00) == 1.0f);
  CHECK(f16_to_f32(0xc000) == -2.0f);
  CHECK(f16_to_f32(0x7bff) == 65504.0f);
  CHECK(f16_to_f32(0x0001) == std::ldexp(1.0f, -24));  // smallest subnormal
  CHECK(f16_to_f32(0x03ff) == std::ldexp(1023.0f, -24));
  CHECK(f16_to_f32(0x0400) == std::ldexp(1.0f, -14));  // smallest normal
  CHECK(std::bit_cast<std::uint32_t>(f16_to_f32(0x8000)) == 0x80000000u);
  CHECK(f16_to_f32(0x7c00) == INFINITY);
  CHECK(f16_to_f32(0xfc00) == -INFINITY);
  CHECK(std::isnan(f16_to_f32(0x7e00)));
  CHECK(std::isnan(f16_to_f32(0x7c01)));  // signalling payload must not collapse to Inf
  // Every finite code against the definition (-1)^s · 2^(e-15) · (1 + m/1024), subnormals 2^-14 · m/1024.
  for (std::uint32_t h = 0; h < 65536; ++h) {
    const int e = static_cast<int>((h >> 10) & 31), m = static_cast<int>(h & 1023);
    if (e == 31) continue;
    double v = e == 0 ? std::ldexp(m / 1024.0, -14) : std::ldexp(1.0 + m / 1024.0, e - 15);
    if (h & 0x8000) v = -v;
    REQUIRE(f16_to_f32(static_cast<std::uint16_t>(h)) == static_cast<float>(v));
  }
  Tensor t;
  t.dtype = DType::F16;
  t.shape = {2};
  std::uint16_t raw[2] = {0x3555, 0xbc00};
  t.data.resize(4);
  std::memcpy(t.data.data(), raw, 4);
  auto v = t.to_f32();
  CHECK(v[0] == Approx(0.333251953125).epsilon(0));
  CHECK(v[1] == -1.0f);
  CHECK_THROWS_WITH(Tensor::from_u8(std::vector<std::uint8_t>{1}, {1}).to_f32(),
                    Catch::Contains("U8") && Catch::Contains("not a floating"));
}

TEST_CASE("safetensors: corrupt and truncated files give clear errors", "[ch03][safetensors]") {
  SECTION("shorter than the length field") {
    auto p = temp_path("short.safetensors");
    write_bytes(p, {1, 2, 3, 4, 5});
    expect_error(p, {"5 bytes", "too short"});
  }
  SECTION("header length past the end of the file") {
    expect_error(craft("hlen.safetensors", "{" + kOneTensor + "}", 24, 4096), {"header length 4096", "truncated"});
  }
  SECTION("header is not JSON") {
    expect_error(craft("badjson.safetensors", R"({"w":{"dtype":"F32",)", 0), {"not valid JSON"});
  }
  SECTION("header is not an object") {
    expect_error(craft("array.safetensors", "[1,2]", 0), {"start with '{'"});
  }
  SECTION("offsets out of bounds") {
    expect_error(craft("oob.safetensors", "{" + kOneTensor + "}", 20), {"tensor 'w'", "out of bounds"});
  }
  SECTION("truncated data") {
    SafeTensors st;
    st.tensors["big"] = Tensor::from_f32(std::vector<float>(100, 1.0f), {10, 10});
    auto p = temp_path("truncated.safetensors");
    write_safetensors(p, st);
    auto b = read_bytes(p);
    b.resize(b.size() - 10);
    write_bytes(p, b);
    expect_error(p, {"tensor 'big'", "out of bounds"});
  }
  SECTION("overlapping tensors") {
    std::string h = R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},)"
                    R"("b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})";
    expect_error(craft("overlap.safetensors", h, 16), {"overlaps", "'a'", "'b'"});
  }
  SECTION("a hole between tensors") {
    std::string h = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                    R"("b":{"dtype":"F32","shape":[2],"data_offsets":[12,20]}})";
    expect_error(craft("gap.safetensors", h, 20), {"gap", "tensor 'b'"});
  }
  SECTION("bytes after the last tensor") {
    expect_error(craft("trailing.safetensors", "{" + kOneTensor + "}", 32), {"cover 24 bytes", "32"});
  }
  SECTION("byte size does not match dtype × shape") {
    std::string h = R"({"w":{"dtype":"BF16","shape":[2,3],"data_offsets":[0,24]}})";
    expect_error(craft("size.safetensors", h, 24), {"tensor 'w'", "24 bytes", "needs 12"});
  }
  SECTION("unknown dtype") {
    std::string h = R"({"w":{"dtype":"Q4_K","shape":[2],"data_offsets":[0,2]}})";
    expect_error(craft("dtype.safetensors", h, 2), {"tensor 'w'", "Q4_K"});
  }
  SECTION("missing field, wrong types, negative dimension") {
    expect_error(craft("nodtype.safetensors", R"({"w":{"shape":[2],"data_offsets":[0,8]}})", 8),
                 {"tensor 'w'", "\"dtype\""});
    expect_error(craft("shape.safetensors", R"({"w":{"dtype":"F32","shape":"2","data_offsets":[0,8]}})", 8),
                 {"tensor 'w'", "\"shape\""});
    expect_error(craft("neg.safetensors", R"({"w":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", 8),
                 {"tensor 'w'", "negative"});
    expect_error(craft("offs.safetensors", R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[8]}})", 8),
                 {"tensor 'w'", "data_offsets"});
    expect_error(craft("order.safetensors", R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}})", 8),
                 {"tensor 'w'", "begin 8 > end 0"});
  }
  SECTION("metadata must map strings to strings") {
    expect_error(craft("meta.safetensors", R"({"__metadata__":{"step":3},)" + kOneTensor + "}", 24),
                 {"__metadata__", "'step'"});
  }
  SECTION("missing file") {
    CHECK_THROWS_WITH(read_safetensors(temp_path("nope.safetensors")), Catch::Contains("cannot open"));
  }
}

TEST_CASE("safetensors writer refuses a tensor whose bytes do not match its shape", "[ch03][safetensors]") {
  SafeTensors st;
  Tensor t = Tensor::from_f32(std::vector<float>(6, 0.0f), {2, 3});
  t.shape = {4, 3};
  st.tensors["bad"] = t;
  CHECK_THROWS_WITH(write_safetensors(temp_path("bad.safetensors"), st),
                    Catch::Contains("tensor 'bad'") && Catch::Contains("needs 48"));
  CHECK_THROWS_AS(Tensor::from_f32(std::vector<float>(5), {2, 3}), std::invalid_argument);
}
