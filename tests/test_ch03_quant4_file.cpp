// Chapter 3: the 4-bit file format inside safetensors (bitsandbytes' Params4bit +
// QuantState.as_dict(packed=True) layout): exact key names, dtypes, shapes and JSON
// text; round trips for NF4/FP4 with and without double quantization; clear errors
// for every inconsistent part.
#include "dynamic_map.hpp"
#include "fp4.hpp"
#include "nf4.hpp"
#include "quant4_file.hpp"

#include <catch2/catch.hpp>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>

using namespace qlora;

namespace {

std::vector<float> normal_values(std::size_t n, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 0.02f);
  std::vector<float> v(n);
  for (auto& x : v) x = normal(rng);
  return v;
}

std::string text_of(const Tensor& t) { return std::string(t.data.begin(), t.data.end()); }

void set_text(Tensor& t, const std::string& s) {
  t.data.assign(s.begin(), s.end());
  t.shape = {static_cast<std::int64_t>(s.size())};
}

}  // namespace

TEST_CASE("python_float_repr writes floats as json.dumps does", "[ch03][quant4_file]") {
  // Expected strings from CPython's repr() of the same doubles.
  const std::pair<double, const char*> cases[] = {
      {1e-05, "1e-05"},
      {0.0001, "0.0001"},
      {1e+16, "1e+16"},
      {1000000000000000.0, "1000000000000000.0"},
      {123456789.0, "123456789.0"},
      {0.1, "0.1"},
      {static_cast<double>(0.012345f), "0.01234500017017126"},
      {-2.5e-07, "-2.5e-07"},
      {0.0, "0.0"},
      {-0.0, "-0.0"},
      {5e-324, "5e-324"},
      {1.7976931348623157e+308, "1.7976931348623157e+308"},
      {1e+22, "1e+22"},
      {0.849609375, "0.849609375"},
      {9999999999999998.0, "9999999999999998.0"},
      {100.0, "100.0"},
      {0.00012207031, "0.00012207031"},
  };
  for (const auto& [v, s] : cases) {
    INFO(s);
    CHECK(python_float_repr(v) == s);
  }
  CHECK(python_float_repr(std::numeric_limits<double>::quiet_NaN()) == "NaN");
}

TEST_CASE("put_quant4 writes bitsandbytes' key names, dtypes, shapes and JSON", "[ch03][quant4_file]") {
  const auto x = normal_values(15 * 33, 1);  // 495 values: odd length, partial last block
  SECTION("FP4 without double quantization") {
    auto q = quantize_4bit(x, {15, 33}, QuantType::fp4, 128, false);
    SafeTensors st;
    put_quant4(st, "w", q, DType::F16);
    CHECK(st.tensors.size() == 4);
    CHECK(st.at("w").dtype == DType::U8);
    CHECK(st.at("w").shape == std::vector<std::int64_t>{248, 1});
    CHECK(st.at("w.absmax").dtype == DType::F32);
    CHECK(st.at("w.absmax").shape == std::vector<std::int64_t>{4});
    CHECK(st.at("w.quant_map").shape == std::vector<std::int64_t>{16});
    CHECK(st.at("w.quant_map").to_f32() == std::vector<float>(fp4_table.begin(), fp4_table.end()));
    CHECK(text_of(st.at("w.quant_state.bitsandbytes__fp4")) ==
          R"({"quant_type": "fp4", "blocksize": 128, "dtype": "float16", "shape": [15, 33]})");
  }
  SECTION("NF4 with double quantization") {
    const auto big = normal_values(64 * 300, 2);  // 300 blocks: two nested blocks
    auto q = quantize_4bit(big, {300, 64}, QuantType::nf4, 64, true);
    SafeTensors st;
    put_quant4(st, "model.layers.0.mlp.up_proj.weight", q, DType::BF16);
    const std::string x_name = "model.layers.0.mlp.up_proj.weight";
    CHECK(st.tensors.size() == 6);
    CHECK(st.at(x_name).shape == std::vector<std::int64_t>{9600, 1});
    CHECK(st.at(x_name + ".absmax").dtype == DType::U8);
    CHECK(st.at(x_name + ".absmax").shape == std::vector<std::int64_t>{300});
    CHECK(st.at(x_name + ".nested_absmax").dtype == DType::F32);
    CHECK(st.at(x_name + ".nested_absmax").shape == std::vector<std::int64_t>{2});
    auto dyn = dynamic_map(true);
    CHECK(st.at(x_name + ".nested_quant_map").to_f32() == std::vector<float>(dyn.begin(), dyn.end()));
    CHECK(st.at(x_name + ".quant_map").to_f32() == std::vector<float>(nf4_table.begin(), nf4_table.end()));
    CHECK(text_of(st.at(x_name + ".quant_state.bitsandbytes__nf4")) ==
          R"({"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [300, 64], )"
          R"("nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": )" +
              python_float_repr(q.nested.offset) + "}");
    CHECK(quant4_names(st) == std::vector<std::string>{x_name});
    for (const auto& [name, t] : st.tensors) CHECK(is_quant4_part(st, name));
    CHECK_FALSE(is_quant4_part(st, x_name + ".bias"));
  }
}

TEST_CASE("get_quant4 reads back exactly what put_quant4 wrote", "[ch03][quant4_file]") {
  for (auto type : {QuantType::nf4, QuantType::fp4})
    for (bool dq : {false, true})
      for (int blocksize : {64, 256}) {
        INFO(to_string(type) << " dq=" << dq << " blocksize=" << blocksize);
        const auto x = normal_values(7 * 1001, static_cast<unsigned>(blocksize) + dq);
        auto q = quantize_4bit(x, {7, 1001}, type, blocksize, dq);
        SafeTensors st;
        put_quant4(st, "a.weight", q, DType::F32);
        auto back = get_quant4(st, "a.weight", "test");
        CHECK(back.dtype == DType::F32);
        CHECK(back.q.type == q.type);
        CHECK(back.q.blocksize == q.blocksize);
        CHECK(back.q.shape == q.shape);
        CHECK(back.q.numel == q.numel);
        CHECK(back.q.double_quant == q.double_quant);
        CHECK(back.q.packed == q.packed);
        CHECK(back.q.absmax == q.absmax);
        CHECK(back.q.nested.codes == q.nested.codes);
        CHECK(back.q.nested.absmax == q.nested.absmax);
        CHECK(back.q.nested.offset == q.nested.offset);
        CHECK(dequantize_4bit_bf16(back.q) == dequantize_4bit_bf16(q));
      }
}

TEST_CASE("get_quant4 rejects inconsistent parts naming the tensor and the part", "[ch03][quant4_file]") {
  const auto x = normal_values(64 * 10, 9);
  auto q = quantize_4bit(x, {10, 64}, QuantType::nf4, 64, true);
  SafeTensors st;
  put_quant4(st, "w", q, DType::BF16);
  const std::string state = "w.quant_state.bitsandbytes__nf4";
  const std::string json = text_of(st.at(state));
  auto expect = [&](const SafeTensors& s, const std::string& fragment) {
    try {
      get_quant4(s, "w", "file 'x.safetensors'");
      FAIL("expected an error containing " << fragment);
    } catch (const std::runtime_error& e) {
      std::string msg = e.what();
      INFO(msg);
      CHECK(msg.find("file 'x.safetensors'") != std::string::npos);
      CHECK(msg.find("'w'") != std::string::npos);
      CHECK(msg.find(fragment) != std::string::npos);
    }
  };
  auto with = [&](auto&& edit) {
    SafeTensors s = st;
    edit(s);
    return s;
  };
  expect(with([](SafeTensors& s) { s.tensors.erase("w.nested_absmax"); }), "missing part 'w.nested_absmax'");
  expect(with([](SafeTensors& s) { s.tensors.erase("w.quant_state.bitsandbytes__nf4"); }), "no 'w.quant_state");
  expect(with([](SafeTensors& s) { s.tensors["w.absmax"] = Tensor::from_f32(std::vector<float>(10, 1.0f), {10}); }),
         "'w.absmax' has dtype F32, expected U8");
  expect(with([](SafeTensors& s) { s.tensors["w"].shape = {160, 2}; }), "'w' has shape [160, 2], expected [320, 1]");
  expect(with([](SafeTensors& s) {
           auto m = s.at("w.quant_map").to_f32();
           m[3] += 1e-3f;
           s.tensors["w.quant_map"] = Tensor::from_f32(m, {16});
         }),
         "quant_map' differs from bitsandbytes' nf4 table at code 3");
  expect(with([](SafeTensors& s) {
           auto m = s.at("w.nested_absmax").to_f32();
           m[0] = std::numeric_limits<float>::quiet_NaN();
           s.tensors["w.nested_absmax"] = Tensor::from_f32(m, {1});
         }),
         "'w.nested_absmax' holds");
  auto edit_json = [&](const std::string& from, const std::string& to) {
    return with([&](SafeTensors& s) {
      std::string j = json;
      auto pos = j.find(from);
      REQUIRE(pos != std::string::npos);
      j.replace(pos, from.size(), to);
      set_text(s.tensors[state], j);
    });
  };
  expect(edit_json("\"blocksize\": 64", "\"blocksize\": 48"), "blocksize 48 is not allowed");
  expect(edit_json("\"quant_type\": \"nf4\"", "\"quant_type\": \"fp4\""), "contradicts the key");
  expect(edit_json("\"dtype\": \"bfloat16\"", "\"dtype\": \"int8\""), "unsupported \"dtype\" \"int8\"");
  expect(edit_json("[10, 64]", "[10, 65]"), "'w' has shape [320, 1], expected [325, 1]");
  expect(edit_json("\"nested_dtype\"", "\"nested_dtyp\""), "unknown quant state field \"nested_dtyp\"");
  expect(edit_json("{", "["), "not valid UTF-8 JSON");
  expect(with([](SafeTensors& s) { s.tensors["w.quant_state.bitsandbytes__fp4"] = s.at("w.quant_state.bitsandbytes__nf4"); }),
         "both nf4 and fp4");
}
