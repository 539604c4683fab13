// bitsandbytes' own quantize_4bit / dequantize_4bit outputs, as tools/bnb_compare.py
// writes them (tests/fixtures/bnb/, made on a GPU machine by scripts/gpu_bnb.sh), for
// the CPU test (test_ch03_bnb.cpp) and the GPU test (test_ch05_gpu_bnb.cpp). A missing
// fixture fails the test: these tests exist to compare with the real library.
#pragma once

#include "quant4.hpp"
#include "safetensors.hpp"

#include <catch2/catch.hpp>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

namespace qlora::bnb_fixtures {

inline const std::filesystem::path dir = std::filesystem::path(QLORA_FIXTURES_DIR) / "bnb";
inline constexpr int blocksizes[] = {64, 128, 256, 512, 1024, 2048, 4096};
inline constexpr const char* dtypes[] = {"bf16", "f16", "f32"};

inline SafeTensors read(const std::string& file) {
  const auto path = dir / file;
  if (!std::filesystem::exists(path)) {
    FAIL(path.string() << " is missing: make it on a GPU machine with scripts/gpu_bnb.sh (tools/bnb_compare.py)");
  }
  return read_safetensors(path);
}

/// One configuration: the input and what bitsandbytes made of it.
struct Case {
  std::string dtype;  ///< bf16, f16 or f32: the input's and the dequantized output's type
  std::string name;   ///< e.g. "fp4.bs64.dq", for messages
  std::vector<float> input;  ///< exact float32 values of the input
  Quant4Tensor bnb;          ///< bitsandbytes' quant state in our format
  Tensor dequant;            ///< bitsandbytes' dequantize_4bit output (input dtype)
};

template <class T>
std::vector<T> values(const Tensor& t) {
  std::vector<T> v(t.data.size() / sizeof(T));
  std::memcpy(v.data(), t.data.data(), v.size() * sizeof(T));  // fixtures are little-endian, like x86-64
  return v;
}

/// Every configuration of one dtype file: NF4/FP4 x 7 blocksizes x double quantization off/on.
inline std::vector<Case> cases(const std::string& dtype) {
  const auto st = read("bnb_" + dtype + ".safetensors");
  std::vector<Case> out;
  for (int bs : blocksizes) {
    const Tensor& input = st.at("input.bs" + std::to_string(bs));
    for (QuantType type : {QuantType::nf4, QuantType::fp4}) {
      const std::string base = to_string(type) + ".bs" + std::to_string(bs);
      for (bool dq : {false, true}) {
        Case c;
        c.dtype = dtype;
        c.name = dtype + " " + base + (dq ? ".dq" : "");
        c.input = input.to_f32();
        Quant4Tensor& q = c.bnb;
        q.type = type;
        q.blocksize = bs;
        q.shape = input.shape;
        q.numel = input.numel();
        q.packed = values<std::uint8_t>(st.at(base + ".packed"));  // the same codes with and without DQ
        q.double_quant = dq;
        if (dq) {
          q.nested.codes = values<std::uint8_t>(st.at(base + ".dq.absmax_code"));
          q.nested.absmax = values<float>(st.at(base + ".dq.nested_absmax"));
          q.nested.offset = values<float>(st.at(base + ".dq.offset")).at(0);
          q.nested.blocksize = 256;
        } else {
          q.absmax = values<float>(st.at(base + ".absmax"));
        }
        c.dequant = st.at(base + (dq ? ".dq.dequant" : ".dequant"));
        out.push_back(std::move(c));
      }
    }
  }
  return out;
}

/// The 4-bit code of element i.
inline std::uint8_t code_at(const std::vector<std::uint8_t>& packed, std::size_t i) {
  return (i % 2 == 0) ? packed[i / 2] >> 4 : packed[i / 2] & 0x0f;
}

/// Number of 4-bit codes (nibbles, the padding one included) that differ.
inline std::size_t differing_codes(const std::vector<std::uint8_t>& a, const std::vector<std::uint8_t>& b) {
  REQUIRE(a.size() == b.size());
  std::size_t n = 0;
  for (std::size_t k = 0; k < a.size(); ++k) {
    const int diff = a[k] ^ b[k];
    n += (diff & 0xf0) != 0;
    n += (diff & 0x0f) != 0;
  }
  return n;
}

/// Float32 bits, to compare values exactly (-0 != +0, NaN == NaN of the same payload).
inline std::uint32_t bits(float x) {
  std::uint32_t b;
  std::memcpy(&b, &x, sizeof b);
  return b;
}

}  // namespace qlora::bnb_fixtures
