// Chapter 7: Hugging Face config files. Both RoPE spellings (transformers 4.x's rope_theta
// + rope_scaling, 5.x's rope_parameters), LLaMA 3.1's frequency rescaling, Mistral's sliding
// window, a refusal naming the field for everything not implemented, and the CPU model
// against transformers' logits for tiny models of each style (tests/fixtures/configs, from
// tools/make_config_fixtures.py).
#include "file_helpers.hpp"
#include "hf_llama.hpp"
#include "llama2c.hpp"
#include "llama_model.hpp"
#include "llama_ops.hpp"
#include "model_shapes.hpp"
#include "safetensors.hpp"

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <cmath>
#include <cstring>
#include <fstream>
#include <numbers>
#include <random>

using namespace qlora;
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

// A small valid LLaMA config; each test adds or changes fields.
json base_config() {
  return {{"model_type", "llama"},         {"hidden_size", 32},   {"intermediate_size", 64},
          {"num_hidden_layers", 2},        {"num_attention_heads", 2}, {"num_key_value_heads", 1},
          {"vocab_size", 64},              {"max_position_embeddings", 128}};
}

LlamaConfig read_config(const json& j) {
  static int n = 0;
  const auto path = test::temp_path("test_ch07_configs", "config" + std::to_string(n++) + ".json");
  std::ofstream(path) << j.dump(2);
  return read_hf_config(path);
}

json llama3_scaling() {
  return {{"rope_type", "llama3"},
          {"factor", 8.0},
          {"low_freq_factor", 1.0},
          {"high_freq_factor", 4.0},
          {"original_max_position_embeddings", 64}};
}

void check_same_rope(const LlamaConfig& a, const LlamaConfig& b) {
  CHECK(a.rope_theta == b.rope_theta);
  CHECK(a.rope_scaling.type == b.rope_scaling.type);
  CHECK(a.rope_scaling.factor == b.rope_scaling.factor);
  CHECK(a.rope_scaling.low_freq_factor == b.rope_scaling.low_freq_factor);
  CHECK(a.rope_scaling.high_freq_factor == b.rope_scaling.high_freq_factor);
  CHECK(a.rope_scaling.original_max_position_embeddings == b.rope_scaling.original_max_position_embeddings);
}

double rel_frobenius(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    num += (static_cast<double>(a[i]) - b[i]) * (static_cast<double>(a[i]) - b[i]);
    den += static_cast<double>(b[i]) * b[i];
  }
  return std::sqrt(num / den);
}

std::vector<std::int32_t> to_i32(const Tensor& t) {
  REQUIRE(t.dtype == DType::I32);
  std::vector<std::int32_t> v(t.data.size() / 4);
  std::memcpy(v.data(), t.data.data(), t.data.size());
  return v;
}

}  // namespace

TEST_CASE("HF config: transformers 4.x and 5.x RoPE spellings read the same", "[ch07][config]") {
  SECTION("default RoPE with a theta") {
    auto v4 = base_config(), v4null = base_config(), v5 = base_config();
    v4["rope_theta"] = 500000.0;
    v4null["rope_theta"] = 500000.0;
    v4null["rope_scaling"] = nullptr;
    v5["rope_parameters"] = {{"rope_theta", 500000.0}, {"rope_type", "default"}};
    const auto a = read_config(v4), b = read_config(v4null), c = read_config(v5);
    CHECK(a.rope_theta == 500000.0f);
    CHECK(a.rope_scaling.type == RopeScaling::Type::none);
    check_same_rope(a, b);
    check_same_rope(a, c);
    CHECK(read_config(base_config()).rope_theta == 10000.0f);  // transformers' default
  }
  SECTION("llama3 scaling") {
    auto v4 = base_config(), v4old = base_config(), v5 = base_config();
    v4["rope_theta"] = 500000.0;
    v4["rope_scaling"] = llama3_scaling();
    v4old["rope_theta"] = 500000.0;
    v4old["rope_scaling"] = llama3_scaling();
    v4old["rope_scaling"].erase("rope_type");
    v4old["rope_scaling"]["type"] = "llama3";  // the key's name before rope_type
    v5["rope_parameters"] = llama3_scaling();
    v5["rope_parameters"]["rope_theta"] = 500000.0;
    const auto a = read_config(v4), b = read_config(v4old), c = read_config(v5);
    CHECK(a.rope_theta == 500000.0f);
    CHECK(a.rope_scaling.type == RopeScaling::Type::llama3);
    CHECK(a.rope_scaling.factor == 8.0f);
    CHECK(a.rope_scaling.low_freq_factor == 1.0f);
    CHECK(a.rope_scaling.high_freq_factor == 4.0f);
    CHECK(a.rope_scaling.original_max_position_embeddings == 64);
    check_same_rope(a, b);
    check_same_rope(a, c);
  }
  SECTION("the same scaling under both names") {
    auto j = base_config();
    j["rope_scaling"] = llama3_scaling();
    j["rope_parameters"] = llama3_scaling();
    CHECK(read_config(j).rope_scaling.type == RopeScaling::Type::llama3);
  }
  SECTION("a theta given in both places that agree") {
    auto j = base_config();
    j["rope_theta"] = 1e6;
    j["rope_parameters"] = {{"rope_theta", 1e6}, {"rope_type", "default"}};
    CHECK(read_config(j).rope_theta == 1e6f);
  }
}

TEST_CASE("HF config: defaults and harmless fields", "[ch07][config]") {
  const auto plain = read_config(base_config());
  CHECK(plain.norm_eps == 1e-6f);  // LlamaConfig's and MistralConfig's rms_norm_eps
  CHECK_FALSE(plain.shared_classifier);
  CHECK(plain.sliding_window == 0);

  auto j = base_config();
  j.update({{"architectures", {"LlamaForCausalLM"}}, {"torch_dtype", "float32"}, {"dtype", "float32"},
            {"bos_token_id", 1}, {"eos_token_id", {2, 3}}, {"pad_token_id", nullptr}, {"initializer_range", 0.02},
            {"use_cache", true}, {"transformers_version", "5.17.0"}, {"pretraining_tp", 2},
            {"attention_dropout", 0.0}, {"attention_bias", false}, {"mlp_bias", false}, {"hidden_act", "silu"},
            {"head_dim", 16}, {"partial_rotary_factor", 1.0}, {"num_key_value_heads", nullptr},
            {"quantization_config", {{"quant_method", "bitsandbytes"}, {"load_in_4bit", true}}}});
  const auto c = read_config(j);
  CHECK(c.n_kv_heads == c.n_heads);  // null means one kv head per query head
  CHECK(c.head_size() == 16);
  CHECK(c.bos_token_ids == std::vector<int>{1});
  CHECK(c.eos_token_ids == std::vector<int>{2, 3});
  CHECK(plain.bos_token_ids == std::vector<int>{1});  // transformers' defaults when absent
  CHECK(plain.eos_token_ids == std::vector<int>{2});
  j["bos_token_id"] = nullptr;
  CHECK(read_config(j).bos_token_ids.empty());
  j["bos_token_id"] = "<s>";
  CHECK_THROWS_WITH(read_config(j), Catch::Contains("\"bos_token_id\""));
}

TEST_CASE("HF config: Mistral is LLaMA with a sliding window", "[ch07][config]") {
  auto j = base_config();
  j["model_type"] = "mistral";
  j["num_attention_heads"] = 8;
  j["hidden_size"] = 64;
  j["sliding_window"] = nullptr;
  CHECK(read_config(j).sliding_window == 0);
  j["sliding_window"] = 32;
  CHECK(read_config(j).sliding_window == 32);
  j.erase("sliding_window");
  j.erase("num_key_value_heads");
  const auto d = read_config(j);  // MistralConfig's defaults
  CHECK(d.sliding_window == 4096);
  CHECK(d.n_kv_heads == 8);
}

TEST_CASE("HF config: every unsupported field is refused by name", "[ch07][config]") {
  struct Case {
    std::string what;
    json patch;  // merged into base_config()
    std::string field;
  };
  auto scaling = [](const json& change) {
    auto s = llama3_scaling();
    s.update(change);
    return json{{"rope_scaling", s}};
  };
  auto llama3_without = [](const char* key) {
    auto s = llama3_scaling();
    s.erase(key);
    return json{{"rope_scaling", s}};
  };
  const std::vector<Case> cases = {
      {"model_type gemma", {{"model_type", "gemma"}}, "\"model_type\""},
      {"hidden_act gelu", {{"hidden_act", "gelu"}}, "\"hidden_act\""},
      {"attention_bias", {{"attention_bias", true}}, "\"attention_bias\""},
      {"mlp_bias", {{"mlp_bias", true}}, "\"mlp_bias\""},
      {"attention_dropout", {{"attention_dropout", 0.1}}, "\"attention_dropout\""},
      {"head_dim", {{"head_dim", 32}}, "\"head_dim\""},
      {"partial_rotary_factor", {{"partial_rotary_factor", 0.5}}, "\"partial_rotary_factor\""},
      {"partial_rotary_factor inside",
       {{"rope_parameters", {{"rope_type", "default"}, {"partial_rotary_factor", 0.5}}}},
       "\"rope_parameters.partial_rotary_factor\""},
      {"rope_scaling linear", {{"rope_scaling", {{"rope_type", "linear"}, {"factor", 2.0}}}}, "\"rope_scaling.rope_type\""},
      {"old type key dynamic", {{"rope_scaling", {{"type", "dynamic"}, {"factor", 2.0}}}}, "\"rope_scaling.type\""},
      {"rope_parameters yarn",
       {{"rope_parameters", {{"rope_type", "yarn"}, {"factor", 4.0}, {"original_max_position_embeddings", 32}}}},
       "\"rope_parameters.rope_type\""},
      {"longrope", {{"rope_scaling", {{"rope_type", "longrope"}}}}, "\"rope_scaling.rope_type\""},
      {"llama3 without factor", llama3_without("factor"), "\"rope_scaling.factor\""},
      {"llama3 without low_freq_factor", llama3_without("low_freq_factor"), "\"rope_scaling.low_freq_factor\""},
      {"llama3 without high_freq_factor", llama3_without("high_freq_factor"), "\"rope_scaling.high_freq_factor\""},
      {"llama3 without original_max_position_embeddings", llama3_without("original_max_position_embeddings"),
       "\"rope_scaling.original_max_position_embeddings\""},
      {"llama3 high <= low", scaling({{"high_freq_factor", 1.0}}), "\"rope_scaling.high_freq_factor\""},
      {"llama3 factor 0", scaling({{"factor", 0.0}}), "\"rope_scaling.factor\""},
      {"top-level original_max_position_embeddings differs",
       {{"rope_scaling", llama3_scaling()}, {"original_max_position_embeddings", 8192}},
       "\"original_max_position_embeddings\" 8192"},
      {"rope_scaling and rope_parameters",
       {{"rope_scaling", llama3_scaling()}, {"rope_parameters", {{"rope_type", "default"}}}}, "\"rope_parameters\""},
      {"two different thetas",
       {{"rope_theta", 10000.0}, {"rope_parameters", {{"rope_type", "default"}, {"rope_theta", 500000.0}}}},
       "\"rope_parameters.rope_theta\""},
      {"rope_theta negative", {{"rope_theta", -1.0}}, "\"rope_theta\""},
      {"rope_scaling a string", {{"rope_scaling", "llama3"}}, "\"rope_scaling\""},
      {"sliding_window 0", {{"sliding_window", 0}}, "\"sliding_window\""},
      {"sliding_window a string", {{"sliding_window", "4096"}}, "\"sliding_window\""},
  };
  for (const auto& c : cases) {
    DYNAMIC_SECTION(c.what) {
      auto j = base_config();
      j.update(c.patch);
      CHECK_THROWS_WITH(read_config(j), Catch::Contains("config") && Catch::Contains(c.field));
    }
  }
}

TEST_CASE("llama3 RoPE frequencies: a hand-computed case", "[ch07][config]") {
  // head_size 16, θ = 500000: wavelengths 2π·θ^(2i/16) = 6.28, 32.40, 167.1, 861.6, ... With
  // original context 64, low 1, high 4: below 64/4 = 16 kept (i = 0), above 64/1 = 64
  // divided by 8 (i >= 2), and i = 1 blended with s = (64/32.400 − 1)/3 = 0.32509:
  // f·((1 − s)/8 + s) = 0.193923 · 0.409457 = 0.079403.
  LlamaConfig c;
  c.dim = 32;
  c.n_heads = c.n_kv_heads = 2;
  c.rope_theta = 500000.0f;
  const auto plain = rope_inv_freq(c);
  REQUIRE(plain.size() == 8u);
  for (int i = 0; i < 8; ++i) CHECK(plain[i] == Approx(std::pow(500000.0, -i / 8.0)).epsilon(1e-6));

  c.rope_scaling = {.type = RopeScaling::Type::llama3, .factor = 8.0f, .low_freq_factor = 1.0f,
                    .high_freq_factor = 4.0f, .original_max_position_embeddings = 64};
  const auto scaled = rope_inv_freq(c);
  CHECK(scaled[0] == plain[0]);
  CHECK(scaled[1] == Approx(0.079403).epsilon(1e-5));
  for (int i = 2; i < 8; ++i) CHECK(scaled[i] == Approx(plain[i] / 8.0).epsilon(1e-6));
  // The same blend in double, written from the definition.
  const double f1 = std::pow(500000.0, -1 / 8.0), s = (64.0 / (2 * std::numbers::pi / f1) - 1.0) / 3.0;
  CHECK(scaled[1] == Approx(f1 * ((1 - s) / 8 + s)).epsilon(1e-6));

  // With factor 1 nothing is rescaled.
  c.rope_scaling.factor = 1.0f;
  const auto unscaled = rope_inv_freq(c);
  for (int i = 0; i < 8; ++i) CHECK(unscaled[i] == Approx(plain[i]).epsilon(1e-6));

  // The angle tables use these frequencies.
  c.seq_len = 4;
  std::vector<float> cos_t, sin_t;
  rope_tables(c, cos_t, sin_t);
  CHECK(sin_t[3 * 8 + 1] == Approx(std::sin(3.0 * unscaled[1])).epsilon(1e-6));
}

TEST_CASE("A sliding window limits the sequence the model accepts", "[ch07][config]") {
  LlamaConfig c{.dim = 16, .hidden_dim = 24, .n_layers = 1, .n_heads = 2, .n_kv_heads = 1, .vocab_size = 32, .seq_len = 16};
  c.sliding_window = 8;
  CHECK_NOTHROW(check_sequence_length(c, 8, "test"));
  CHECK_THROWS_WITH(check_sequence_length(c, 9, "test"), Catch::Contains("9 tokens") && Catch::Contains("sliding_window 8"));
  c.sliding_window = 0;
  CHECK_THROWS_WITH(check_sequence_length(c, 17, "test"), Catch::Contains("17 tokens") && Catch::Contains("seq_len 16"));

  c.sliding_window = 8;
  LlamaModel m(random_llama_weights(c, 5), BaseStorage::float32);
  std::vector<int> tokens(9, 3);
  std::mt19937_64 rng(1);
  CHECK_NOTHROW(m.forward(tokens.data(), nullptr, 1, 8, false, rng));
  CHECK_THROWS_WITH(m.forward(tokens.data(), nullptr, 1, 9, false, rng), Catch::Contains("sliding_window"));
  for (int pos = 0; pos < 8; ++pos) m.decode_step(3, pos);
  CHECK_THROWS_WITH(m.decode_step(3, 8), Catch::Contains("sliding_window"));
}

TEST_CASE("HF writer: llama3 scaling and a sliding window round trip", "[ch07][config]") {
  std::mt19937 rng(4);
  std::normal_distribution<float> normal;
  LlamaCheckpoint ck;
  ck.config = {.dim = 32, .hidden_dim = 48, .n_layers = 1, .n_heads = 2, .n_kv_heads = 1, .vocab_size = 40,
               .seq_len = 256, .shared_classifier = false, .norm_eps = 1e-5f, .rope_theta = 500000.0f};
  ck.config.rope_scaling = {.type = RopeScaling::Type::llama3, .factor = 8.0f, .low_freq_factor = 1.0f,
                            .high_freq_factor = 4.0f, .original_max_position_embeddings = 32};
  ck.config.sliding_window = 64;
  ck.config.bos_token_ids = {38};  // LLaMA-3 style: BOS 128000, EOS 128001 and 128009
  ck.config.eos_token_ids = {37, 39};
  for (const auto& s : llama_tensor_specs(ck.config)) {
    std::size_t n = 1;
    for (auto d : s.shape) n *= static_cast<std::size_t>(d);
    std::vector<float> v(n);
    for (auto& x : v) x = normal(rng);
    ck.tensors.push_back({s.name, s.shape, std::move(v)});
  }
  const auto dir = test::temp_path("test_ch07_configs", "roundtrip");
  write_hf_llama(dir, ck);
  json written;
  std::ifstream(dir / "config.json") >> written;
  CHECK(written["model_type"] == "mistral");
  CHECK(written["rope_theta"] == 500000.0);
  CHECK(written["rope_scaling"]["rope_type"] == "llama3");
  CHECK(written["rope_scaling"]["original_max_position_embeddings"] == 32);
  CHECK_FALSE(written.contains("rope_parameters"));
  CHECK(written["bos_token_id"] == 38);
  CHECK(written["eos_token_id"] == json{37, 39});

  const auto back = read_hf_llama(dir).config;
  CHECK(back.bos_token_ids == ck.config.bos_token_ids);
  CHECK(back.eos_token_ids == ck.config.eos_token_ids);
  check_same_rope(back, ck.config);
  CHECK(back.sliding_window == 64);
  CHECK(back.norm_eps == 1e-5f);
  CHECK(back.seq_len == 256);
  CHECK_FALSE(back.shared_classifier);

  ck.config.sliding_window = 0;
  ck.config.rope_scaling = {};
  write_hf_llama(dir, ck);
  std::ifstream(dir / "config.json") >> written;
  CHECK(written["model_type"] == "llama");
  CHECK(written["rope_scaling"].is_null());
  CHECK_FALSE(written.contains("sliding_window"));
  const auto plain = read_hf_llama(dir).config;
  CHECK(plain.sliding_window == 0);
  CHECK(plain.rope_scaling.type == RopeScaling::Type::none);
}

// Needs tests/fixtures/configs from tools/make_config_fixtures.py (transformers 5.x): fails
// without them. Each style is read with transformers' own config.json (5.x spelling) and with
// config-4x.json (the 4.x spelling of the same model).
TEST_CASE("CPU model matches transformers' logits for every config style and spelling", "[ch07][config]") {
  const fs::path root = fs::path(QLORA_FIXTURES_DIR) / "configs";
  const std::vector<std::string> styles = {"llama2", "llama3", "gqa", "tinyllama", "bigvocab", "mistral",
                                           "mistral_window"};
  for (const auto& style : styles) {
    const fs::path src = root / style;
    INFO("style " << style << " in " << src.string());
    REQUIRE(fs::exists(src / "config.json"));
    REQUIRE(fs::exists(src / "config-4x.json"));
    REQUIRE(fs::exists(src / "reference.safetensors"));
    json v5, v4;
    std::ifstream(src / "config.json") >> v5;
    std::ifstream(src / "config-4x.json") >> v4;
    CHECK(v5.contains("rope_parameters"));  // what the spelling test is about
    CHECK_FALSE(v4.contains("rope_parameters"));
    CHECK(v4.contains("rope_theta"));

    const auto ref = read_safetensors(src / "reference.safetensors");
    const auto tokens = to_i32(ref.at("tokens"));
    const auto positions = to_i32(ref.at("positions"));
    const auto want = ref.at("logits").to_f32();
    const int T = static_cast<int>(tokens.size());
    for (const auto& [spelling, tag] : {std::pair{"config.json", "5x"}, std::pair{"config-4x.json", "4x"}}) {
      INFO("spelling " << spelling);
      const auto dir = test::temp_path("test_ch07_configs", style + "_" + tag);
      fs::create_directories(dir);
      fs::copy_file(src / "model.safetensors", dir / "model.safetensors", fs::copy_options::overwrite_existing);
      fs::copy_file(src / spelling, dir / "config.json", fs::copy_options::overwrite_existing);
      LlamaModel m(load_llama_weights(dir), BaseStorage::float32);
      const int V = m.config().vocab_size;
      REQUIRE(want.size() == positions.size() * static_cast<std::size_t>(V));
      std::mt19937_64 rng(0);
      const std::vector<int> ids(tokens.begin(), tokens.end());
      m.forward(ids.data(), nullptr, 1, T, false, rng);
      std::vector<float> got;
      for (int p : positions)
        got.insert(got.end(), m.logits().begin() + static_cast<std::ptrdiff_t>(p) * V,
                   m.logits().begin() + static_cast<std::ptrdiff_t>(p + 1) * V);
      CHECK(rel_frobenius(got, want) <= 1e-4);
      if (m.config().sliding_window > 0) {
        const std::vector<int> longer(static_cast<std::size_t>(m.config().sliding_window) + 1, 0);
        CHECK_THROWS_WITH(m.forward(longer.data(), nullptr, 1, static_cast<int>(longer.size()), false, rng),
                          Catch::Contains("sliding_window"));
      }
    }
  }
}

TEST_CASE("A shape may be a config.json: qlora bench train --shape and qlora plan read it", "[ch07][config]") {
  json j = base_config();
  j["num_hidden_layers"] = 3;
  const auto path = test::temp_path("test_ch07_configs", "shape_config.json");
  std::ofstream(path) << j.dump(2);
  const LlamaConfig c = model_shape(path.string());
  CHECK(c.n_layers == 3);
  CHECK(c.dim == 32);
  CHECK(c.n_kv_heads == 1);
  CHECK_THROWS_WITH(model_shape("/nonexistent/cfg.json"), Catch::Contains("/nonexistent/cfg.json"));
  CHECK_THROWS_WITH(model_shape("8b"), Catch::Contains("unknown model shape '8b'"));
}
