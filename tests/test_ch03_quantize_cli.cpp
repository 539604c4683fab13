// Chapter 3: `qlora quantize` / `qlora dequantize`, run as a user runs them ($QLORA_BIN).
// The output must hold the bitsandbytes 4-bit layout, equal the library's quantization
// of the same input, report bits/parameter measured from the stored bytes, round-trip
// through dequantize, and refuse bad flags naming the flag.
#include "bf16.hpp"
#include "file_helpers.hpp"
#include "hf_llama.hpp"
#include "llama2c.hpp"
#include "quant4_file.hpp"
#include "safetensors.hpp"
#include "search_path.hpp"

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <cstdlib>
#include <fstream>
#include <random>
#include <sstream>
#include <sys/wait.h>
#include <unistd.h>

using namespace qlora;
using test::model_or_fail;
namespace fs = std::filesystem;

namespace {

fs::path temp_path(const std::string& name) { return test::temp_path("test_ch03_cli", name); }

using test::run_qlora;

// Single-quoted for the shell (the test paths hold no quotes).
std::string q(const fs::path& p) {
  std::string s = p.string();
  s.insert(s.begin(), '\'');
  s.push_back('\'');
  return s;
}

std::vector<float> normal_values(std::size_t n, std::mt19937& rng, float sd) {
  std::normal_distribution<float> normal(0.0f, sd);
  std::vector<float> v(n);
  for (auto& x : v) x = normal(rng);
  return v;
}

// A small model-like file: F32 with an odd length, BF16, F16, and integer tensors to keep.
fs::path make_input() {
  std::mt19937 rng(42);
  SafeTensors st;
  st.metadata["format"] = "pt";
  st.tensors["proj.weight"] = Tensor::from_f32(normal_values(33 * 17, rng, 0.05f), {33, 17});
  st.tensors["norm.weight"] = Tensor::from_bf16(to_bf16(normal_values(64, rng, 1.0f)), {64});
  Tensor h;
  h.dtype = DType::F16;
  h.shape = {8, 8};
  for (int i = 0; i < 64; ++i) {
    std::uint16_t v = static_cast<std::uint16_t>(0x3000 + i * 7);  // F16 values in [0.125, ~0.5)
    if (i % 3 == 0) v |= 0x8000;
    h.data.push_back(static_cast<std::uint8_t>(v & 0xff));
    h.data.push_back(static_cast<std::uint8_t>(v >> 8));
  }
  st.tensors["half.weight"] = h;
  Tensor ids;
  ids.dtype = DType::I64;
  ids.shape = {3};
  ids.data.resize(24, 7);
  st.tensors["position_ids"] = ids;
  st.tensors["mask"] = Tensor::from_u8(std::vector<std::uint8_t>{1, 0, 1}, {3});
  auto p = temp_path("input.safetensors");
  write_safetensors(p, st);
  return p;
}

nlohmann::json read_json(const fs::path& p) {
  std::ifstream in(p);
  return nlohmann::json::parse(in);
}


}  // namespace

TEST_CASE("quantize CLI on a generated safetensors: layout, values, report, dequantize", "[ch03][cli]") {
  const auto in = make_input();
  const auto input = read_safetensors(in);
  struct Config {
    std::string flags;
    QuantType type;
    int blocksize;
    bool dq;
  };
  for (const auto& c : {Config{"--type nf4 --blocksize 64 --double-quant", QuantType::nf4, 64, true},
                        Config{"--type fp4 --blocksize 128", QuantType::fp4, 128, false}}) {
    INFO(c.flags);
    auto out = temp_path("q.safetensors"), report = temp_path("q.json"), deq = temp_path("deq.safetensors");
    auto r = run_qlora("quantize " + c.flags + " " + q(in) + " " + q(out) + " --json " + q(report));
    INFO(r.output);
    REQUIRE(r.rc == 0);
    CHECK(r.output.find("proj.weight") != std::string::npos);
    CHECK(r.output.find("bits/parameter") != std::string::npos);

    auto st = read_safetensors(out);
    CHECK(quant4_names(st) == std::vector<std::string>{"half.weight", "norm.weight", "proj.weight"});
    CHECK(st.at("position_ids").data == input.at("position_ids").data);  // non-float tensors kept
    CHECK(st.at("mask").data == input.at("mask").data);
    CHECK(st.metadata == input.metadata);
    const std::string key = std::string(".quant_state.bitsandbytes__") + (c.type == QuantType::nf4 ? "nf4" : "fp4");
    CHECK(st.contains("proj.weight" + key));
    CHECK(st.at("proj.weight").shape == std::vector<std::int64_t>{281, 1});  // (561 + 1) / 2
    CHECK(st.contains("proj.weight.nested_absmax") == c.dq);

    // The CLI stores exactly what the library computes for the same input.
    auto report_json = read_json(report);
    CHECK(report_json["type"] == (c.type == QuantType::nf4 ? "nf4" : "fp4"));
    std::int64_t total_bytes = 0, total_params = 0;
    for (const char* name : {"half.weight", "norm.weight", "proj.weight"}) {
      INFO(name);
      const auto& orig = input.at(name);
      auto expect = quantize_4bit(orig.to_f32(), orig.shape, c.type, c.blocksize, c.dq);
      auto got = get_quant4(st, name, out.string());
      CHECK(got.dtype == orig.dtype);
      CHECK(got.q.packed == expect.packed);
      CHECK(got.q.absmax == expect.absmax);
      CHECK(got.q.nested.codes == expect.nested.codes);
      CHECK(got.q.nested.absmax == expect.nested.absmax);
      CHECK(got.q.nested.offset == expect.nested.offset);
      nlohmann::json row;
      for (const auto& t : report_json["tensors"])
        if (t["name"] == name) row = t;
      REQUIRE(row.is_object());
      CHECK(row["stored_bytes"].get<std::int64_t>() == expect.storage_bytes());
      CHECK(row["bits_per_parameter"].get<double>() == Approx(expect.bits_per_parameter()).epsilon(1e-12));
      CHECK(row["rel_frobenius"].get<double>() > 0.0);
      CHECK(row["rel_frobenius"].get<double>() < 0.2);
      total_bytes += expect.storage_bytes();
      total_params += expect.numel;
    }
    CHECK(report_json["summary"]["stored_bytes"].get<std::int64_t>() == total_bytes);
    CHECK(report_json["summary"]["quantized_parameters"].get<std::int64_t>() == total_params);
    CHECK(report_json["summary"]["file_bytes"].get<std::int64_t>() == static_cast<std::int64_t>(fs::file_size(out)));
    CHECK(report_json["kept"] == nlohmann::json::array({"mask", "position_ids"}));

    auto r2 = run_qlora("dequantize " + q(out) + " " + q(deq));
    INFO(r2.output);
    REQUIRE(r2.rc == 0);
    auto back = read_safetensors(deq);
    CHECK(back.tensors.size() == input.tensors.size());
    for (const char* name : {"half.weight", "norm.weight", "proj.weight"}) {
      const auto& t = back.at(name);
      CHECK(t.dtype == DType::BF16);
      CHECK(t.shape == input.at(name).shape);
      auto expect = quantize_4bit(input.at(name).to_f32(), input.at(name).shape, c.type, c.blocksize, c.dq);
      CHECK(t.to_f32() == from_bf16(dequantize_4bit_bf16(expect)));
    }
    CHECK(back.at("position_ids").data == input.at("position_ids").data);
  }
}

TEST_CASE("quantize CLI on stories260K.bin: HF layout, BF16 norms, 4.5 and ~4.13 bits/parameter", "[ch03][cli]") {
  auto bin = model_or_fail("stories260K.bin");
  if (!bin) return;
  auto ck = read_llama2c(*bin);
  convert_rope_layout(ck, RopeLayout::rotate_half);
  for (bool dq : {false, true}) {
    INFO("double quant " << dq);
    auto out = temp_path("s260k.safetensors"), report = temp_path("s260k.json");
    auto r = run_qlora(std::string("quantize --type nf4 --blocksize 64 ") + (dq ? "--double-quant " : "") + q(*bin) + " " +
                   q(out) + " --json " + q(report));
    INFO(r.output);
    REQUIRE(r.rc == 0);
    auto st = read_safetensors(out);
    auto names = quant4_names(st);
    CHECK(names.size() == 1 + 5 * 7);  // the embedding and the seven projections of each layer
    // Norms stay BF16, rounded from the float32 checkpoint.
    const auto& norm = st.at("model.layers.2.input_layernorm.weight");
    CHECK(norm.dtype == DType::BF16);
    CHECK(norm.to_f32() == from_bf16(to_bf16(ck.at("model.layers.2.input_layernorm.weight").data)));
    // q_proj is stored in Hugging Face's rotate-half order: its dequantization is the
    // quantization of the permuted BF16 weight.
    const auto& wq = ck.at("model.layers.1.self_attn.q_proj.weight");
    auto expect = quantize_4bit(from_bf16(to_bf16(wq.data)), wq.shape, QuantType::nf4, 64, dq);
    auto got = get_quant4(st, "model.layers.1.self_attn.q_proj.weight", out.string());
    CHECK(got.dtype == DType::BF16);
    CHECK(got.q.packed == expect.packed);

    auto j = read_json(report);
    for (const auto& t : j["tensors"]) {
      INFO(t["name"]);
      const auto n = t["numel"].get<std::int64_t>();
      const auto blocks = n / 64;  // every stories260K matrix is a whole number of blocks
      const double bits = dq ? 8.0 * static_cast<double>(n / 2 + blocks + 4 * ((blocks + 255) / 256) + 4) / static_cast<double>(n)
                             : 4.5;
      CHECK(n % 64 == 0);
      CHECK(t["bits_per_parameter"].get<double>() == Approx(bits).epsilon(1e-12));
      CHECK(t["rel_frobenius"].get<double>() < 0.15);
    }
    const double summary = j["summary"]["bits_per_parameter"].get<double>();
    if (dq) {
      CHECK(summary > 4.127);  // the asymptote 4 + 8/64 + 32/(64·256), plus per-tensor rounding up
      CHECK(summary < 4.14);
    } else {
      CHECK(summary == Approx(4.5).epsilon(1e-12));
    }
  }
}

TEST_CASE("quantize CLI refuses bad flags and inputs, naming them", "[ch03][cli]") {
  const auto in = make_input();
  const auto out = temp_path("bad.safetensors");
  auto expect_fail = [&](const std::string& args, std::initializer_list<std::string> fragments) {
    auto r = run_qlora(args);
    INFO(args << "\n" << r.output);
    CHECK(r.rc != 0);
    for (const auto& f : fragments) CHECK(r.output.find(f) != std::string::npos);
  };
  expect_fail("quantize --type nf4 --blocksize 48 " + q(in) + " " + q(out), {"--blocksize", "48"});
  expect_fail("quantize --type nf4 --blocksize 8192 " + q(in) + " " + q(out), {"--blocksize", "8192"});
  expect_fail("quantize --type int4 " + q(in) + " " + q(out), {"--type", "int4"});
  expect_fail("quantize --blocksize sixty-four " + q(in) + " " + q(out), {"--blocksize"});
  expect_fail("quantize " + q(temp_path("missing.safetensors")) + " " + q(out), {"missing.safetensors"});
  expect_fail("quantize " + q(in), {"output"});
  auto txt = temp_path("weights.txt");
  std::ofstream(txt) << "not a checkpoint";
  expect_fail("quantize " + q(txt) + " " + q(out), {"weights.txt", "unknown format"});
  expect_fail("dequantize " + q(in) + " " + q(out), {"input.safetensors", "no 4-bit tensors"});
  CHECK_FALSE(fs::exists(out));
  // Already 4-bit input is refused rather than quantized twice.
  REQUIRE(run_qlora("quantize " + q(in) + " " + q(out)).rc == 0);
  expect_fail("quantize " + q(out) + " " + q(temp_path("twice.safetensors")), {"already holds 4-bit"});
}

TEST_CASE("demo prints the error and bits/parameter tables for stories260K", "[ch03][cli]") {
  auto missing = run_qlora("demo --model no-such-model.bin");
  CHECK(missing.rc != 0);
  CHECK(missing.output.find("no-such-model.bin") != std::string::npos);
  if (!model_or_fail("stories260K.bin")) return;
  auto r = run_qlora("demo");
  INFO(r.output);
  REQUIRE(r.rc == 0);
  CHECK(r.output.find("model.layers.4.mlp.down_proj.weight") != std::string::npos);
  // Summary rows: format, parameters, bytes, bits/param (36 matrices, 259328 parameters).
  CHECK(r.output.find("nf4              259328       145872       4.5000") != std::string::npos);
  CHECK(r.output.find("nf4+dq           259328       134008       4.1340") != std::string::npos);
  CHECK(r.output.find("fp4              259328       145872       4.5000") != std::string::npos);
}
