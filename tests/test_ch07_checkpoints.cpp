// Chapter 7: checkpoint readers. llama2.c .bin files (stories260K with GQA), Hugging
// Face folders (kjv15M-hf against kjv15M.bin), the RoPE row permutation between the
// two conventions, and clear errors on corrupt checkpoints.
#include "atomic_file.hpp"
#include "bf16.hpp"
#include "file_helpers.hpp"
#include "hf_llama.hpp"
#include "llama2c.hpp"
#include "safetensors.hpp"
#include "search_path.hpp"

#include <catch2/catch.hpp>

#include <cmath>
#include <cstring>
#include <fstream>
#include <random>
#include <sys/resource.h>
#include <unistd.h>

#include <csignal>
#include <filesystem>
#include <iterator>

using namespace qlora;
using test::model_or_fail;
using test::read_bytes;
using test::write_bytes;
namespace fs = std::filesystem;

namespace {

fs::path temp_dir(const std::string& name) {
  auto dir = test::temp_path("test_ch07_ck", name);
  fs::create_directories(dir);
  return dir;
}

std::vector<float> random_vec(std::size_t n, std::mt19937& rng) {
  std::normal_distribution<float> normal;
  std::vector<float> v(n);
  for (auto& x : v) x = normal(rng);
  return v;
}

// RoPE on one head vector, in each convention: pair i is rotated by pos · theta^(-2i/hs).
void rope_interleaved(float* x, int hs, int pos) {
  for (int i = 0; i < hs / 2; ++i) {
    double a = pos * std::pow(10000.0, -2.0 * i / hs);
    double x0 = x[2 * i], x1 = x[2 * i + 1];
    x[2 * i] = static_cast<float>(x0 * std::cos(a) - x1 * std::sin(a));
    x[2 * i + 1] = static_cast<float>(x0 * std::sin(a) + x1 * std::cos(a));
  }
}
void rope_rotate_half(float* x, int hs, int pos) {
  for (int i = 0; i < hs / 2; ++i) {
    double a = pos * std::pow(10000.0, -2.0 * i / hs);
    double x0 = x[i], x1 = x[i + hs / 2];
    x[i] = static_cast<float>(x0 * std::cos(a) - x1 * std::sin(a));
    x[i + hs / 2] = static_cast<float>(x0 * std::sin(a) + x1 * std::cos(a));
  }
}

std::vector<float> matvec(const std::vector<float>& w, const std::vector<float>& x) {
  std::vector<float> y(w.size() / x.size());
  for (std::size_t r = 0; r < y.size(); ++r) {
    double s = 0;
    for (std::size_t c = 0; c < x.size(); ++c) s += static_cast<double>(w[r * x.size() + c]) * x[c];
    y[r] = static_cast<float>(s);
  }
  return y;
}

}  // namespace

TEST_CASE("llama2.c reader: stories260K header, names, shapes and GQA", "[ch07][checkpoint]") {
  auto path = model_or_fail("stories260K.bin");
  if (!path) return;
  auto ck = read_llama2c(*path);
  const auto& c = ck.config;
  CHECK(c.dim == 64);
  CHECK(c.hidden_dim == 172);
  CHECK(c.n_layers == 5);
  CHECK(c.n_heads == 8);
  CHECK(c.n_kv_heads == 4);
  CHECK(c.vocab_size == 512);
  CHECK(c.seq_len == 512);
  CHECK(c.shared_classifier);
  CHECK(c.kv_dim() == 32);
  CHECK(ck.rope_layout == RopeLayout::interleaved);
  REQUIRE(ck.tensors.size() == 1 + 5 * 9 + 1);
  CHECK(ck.tensors.front().name == "model.embed_tokens.weight");
  CHECK(ck.tensors.back().name == "model.norm.weight");
  CHECK(ck.at("model.layers.0.self_attn.q_proj.weight").shape == std::vector<std::int64_t>{64, 64});
  CHECK(ck.at("model.layers.4.self_attn.k_proj.weight").shape == std::vector<std::int64_t>{32, 64});
  CHECK(ck.at("model.layers.4.self_attn.v_proj.weight").shape == std::vector<std::int64_t>{32, 64});
  CHECK(ck.at("model.layers.2.mlp.gate_proj.weight").shape == std::vector<std::int64_t>{172, 64});
  CHECK(ck.at("model.layers.2.mlp.down_proj.weight").shape == std::vector<std::int64_t>{64, 172});
  CHECK(ck.at("model.layers.2.mlp.up_proj.weight").shape == std::vector<std::int64_t>{172, 64});
  CHECK_THROWS_WITH(ck.at("lm_head.weight"), Catch::Contains("lm_head.weight"));
  for (const auto& t : ck.tensors) {
    std::int64_t n = 1;
    for (auto d : t.shape) n *= d;
    CHECK(static_cast<std::int64_t>(t.data.size()) == n);
  }

  // Values land where the file layout says: kind by kind, all layers of a kind together.
  auto raw = read_bytes(*path);
  auto at_float = [&](std::size_t index) {
    float f;
    std::memcpy(&f, raw.data() + 28 + 4 * index, 4);
    return f;
  };
  const std::size_t V = 512, D = 64, L = 5, KV = 32, H = 172;
  CHECK(ck.at("model.embed_tokens.weight").data[7] == at_float(7));
  std::size_t wk = V * D + L * D + L * D * D;  // after embedding, rms_att, wq
  CHECK(ck.at("model.layers.3.self_attn.k_proj.weight").data[5] == at_float(wk + 3 * KV * D + 5));
  std::size_t w3 = wk + 2 * L * KV * D + L * D * D + L * D + 2 * L * H * D;  // ... wo, rms_ffn, w1, w2
  CHECK(ck.at("model.layers.4.mlp.up_proj.weight").data.back() == at_float(w3 + 5 * H * D - 1));
  CHECK(ck.at("model.norm.weight").data[0] == at_float(w3 + L * H * D));
}

TEST_CASE("llama2.c reader: corrupt headers and sizes are rejected naming the file", "[ch07][checkpoint]") {
  auto path = model_or_fail("stories260K.bin");
  if (!path) return;
  const auto orig = read_bytes(*path);
  auto dir = temp_dir("corrupt");
  auto with_header = [&](int index, std::int32_t value) {
    auto b = orig;
    std::memcpy(b.data() + 4 * index, &value, 4);
    return b;
  };
  struct Case {
    std::string name;
    std::vector<std::uint8_t> bytes;
    std::string fragment;
  };
  std::vector<Case> cases = {
      {"heads.bin", with_header(3, 7), "not a multiple of n_heads"},
      {"kvheads.bin", with_header(4, 3), "not a multiple of n_kv_heads"},
      {"negative.bin", with_header(0, -64), "dim = -64"},
      {"huge.bin", with_header(2, 1 << 30), "describes more bytes"},
      {"unshared.bin", with_header(5, -512), "describes"},
      {"truncated.bin", std::vector<std::uint8_t>(orig.begin(), orig.end() - 4), "but the file has"},
      {"v1export.bin", with_header(0, 0x616b3432), "export version"},
      {"tiny.bin", std::vector<std::uint8_t>(orig.begin(), orig.begin() + 12), "28-byte header"},
  };
  for (const auto& c : cases) {
    INFO(c.name);
    auto p = dir / c.name;
    write_bytes(p, c.bytes);
    CHECK_THROWS_WITH(read_llama2c(p), Catch::Contains(p.string()) && Catch::Contains(c.fragment));
  }
}

TEST_CASE("RoPE permutation: inverse pair, a hand example, and attention scores agree", "[ch07][checkpoint]") {
  // One head of size 4, one column: rows (0,1),(2,3) are pairs in llama2.c; HF pairs (0,2),(1,3).
  std::vector<float> w = {10, 11, 12, 13};
  CHECK(rope_interleaved_to_half(w, 1, 1) == std::vector<float>{10, 12, 11, 13});
  CHECK(rope_half_to_interleaved(std::vector<float>{10, 12, 11, 13}, 1, 1) == w);

  std::mt19937 rng(7);
  const int dim = 48, n_heads = 6, n_kv = 2, hs = dim / n_heads;
  auto wq = random_vec(dim * dim, rng);
  auto wk = random_vec(n_kv * hs * dim, rng);
  CHECK(rope_half_to_interleaved(rope_interleaved_to_half(wq, n_heads, dim), n_heads, dim) == wq);
  CHECK(rope_half_to_interleaved(rope_interleaved_to_half(wk, n_kv, dim), n_kv, dim) == wk);
  CHECK(rope_interleaved_to_half(wq, n_heads, dim) != wq);

  // The permutation is right only if attention scores are unchanged: q·k after RoPE with
  // the original weights and interleaved pairs equals q·k with permuted weights and halves.
  auto wq_hf = rope_interleaved_to_half(wq, n_heads, dim);
  auto wk_hf = rope_interleaved_to_half(wk, n_kv, dim);
  auto x1 = random_vec(dim, rng), x2 = random_vec(dim, rng);
  const int p1 = 17, p2 = 5;
  auto q = matvec(wq, x1), k = matvec(wk, x2), q_hf = matvec(wq_hf, x1), k_hf = matvec(wk_hf, x2);
  for (int h = 0; h < n_heads; ++h) rope_interleaved(&q[h * hs], hs, p1), rope_rotate_half(&q_hf[h * hs], hs, p1);
  for (int h = 0; h < n_kv; ++h) rope_interleaved(&k[h * hs], hs, p2), rope_rotate_half(&k_hf[h * hs], hs, p2);
  for (int h = 0; h < n_heads; ++h) {
    const int g = h / (n_heads / n_kv);  // GQA: query head h reads kv head g
    double s = 0, s_hf = 0, norm = 0;
    for (int i = 0; i < hs; ++i) {
      s += static_cast<double>(q[h * hs + i]) * k[g * hs + i];
      s_hf += static_cast<double>(q_hf[h * hs + i]) * k_hf[g * hs + i];
      norm += std::abs(static_cast<double>(q[h * hs + i]) * k[g * hs + i]);
    }
    CHECK(std::abs(s - s_hf) <= 1e-5 * norm);
  }
  CHECK_THROWS_AS(rope_interleaved_to_half(std::vector<float>(6 * 3), 2, 3), std::invalid_argument);  // odd head size
}

TEST_CASE("HF reader: kjv15M-hf equals kjv15M.bin after the permutation, to bf16 rounding", "[ch07][checkpoint]") {
  auto bin = model_or_fail("kjv15M.bin");
  auto hf = model_or_fail("kjv15M-hf");
  if (!bin || !hf) return;
  auto a = read_llama2c(*bin);
  auto b = read_hf_llama(*hf);
  CHECK(b.rope_layout == RopeLayout::rotate_half);
  CHECK(b.config.dim == a.config.dim);
  CHECK(b.config.hidden_dim == a.config.hidden_dim);
  CHECK(b.config.n_layers == a.config.n_layers);
  CHECK(b.config.n_heads == a.config.n_heads);
  CHECK(b.config.n_kv_heads == a.config.n_kv_heads);
  CHECK(b.config.vocab_size == a.config.vocab_size);
  CHECK(b.config.seq_len == a.config.seq_len);
  CHECK(b.config.shared_classifier == a.config.shared_classifier);
  convert_rope_layout(a, RopeLayout::rotate_half);
  REQUIRE(a.tensors.size() == b.tensors.size());
  for (std::size_t i = 0; i < a.tensors.size(); ++i) {
    const auto& ta = a.tensors[i];
    const auto& tb = b.tensors[i];
    INFO(ta.name);
    REQUIRE(ta.name == tb.name);
    REQUIRE(ta.shape == tb.shape);
    std::size_t mismatches = 0;
    for (std::size_t j = 0; j < ta.data.size(); ++j) mismatches += round_to_bf16(ta.data[j]) != tb.data[j];
    CHECK(mismatches == 0);
  }
}

TEST_CASE("HF writer and reader round trip stories260K (GQA) in BF16", "[ch07][checkpoint]") {
  auto path = model_or_fail("stories260K.bin");
  if (!path) return;
  auto a = read_llama2c(*path);
  auto dir = temp_dir("hf260K");
  write_hf_llama(dir, a);
  CHECK(a.rope_layout == RopeLayout::interleaved);  // the writer converts a copy
  auto st = read_safetensors(dir / "model.safetensors");
  CHECK(st.metadata.at("format") == "pt");
  CHECK(st.at("model.layers.0.self_attn.k_proj.weight").dtype == DType::BF16);
  CHECK(st.at("model.layers.0.self_attn.k_proj.weight").shape == std::vector<std::int64_t>{32, 64});
  CHECK_FALSE(st.contains("lm_head.weight"));

  auto b = read_hf_llama(dir);
  CHECK(b.config.n_kv_heads == 4);
  CHECK(b.config.norm_eps == a.config.norm_eps);
  CHECK(b.config.shared_classifier);
  convert_rope_layout(b, RopeLayout::interleaved);
  REQUIRE(b.tensors.size() == a.tensors.size());
  for (std::size_t i = 0; i < a.tensors.size(); ++i) {
    INFO(a.tensors[i].name);
    REQUIRE(b.tensors[i].name == a.tensors[i].name);
    std::vector<float> rounded(a.tensors[i].data.size());
    for (std::size_t j = 0; j < rounded.size(); ++j) rounded[j] = round_to_bf16(a.tensors[i].data[j]);
    CHECK(b.tensors[i].data == rounded);
  }
}

TEST_CASE("HF reader: inconsistent folders are rejected naming the field or tensor", "[ch07][checkpoint]") {
  std::mt19937 rng(3);
  LlamaCheckpoint ck;
  ck.config = {.dim = 16, .hidden_dim = 24, .n_layers = 2, .n_heads = 4, .n_kv_heads = 2, .vocab_size = 32, .seq_len = 8, .shared_classifier = false};
  for (const auto& s : llama_tensor_specs(ck.config)) {
    std::size_t n = 1;
    for (auto d : s.shape) n *= static_cast<std::size_t>(d);
    ck.tensors.push_back({s.name, s.shape, random_vec(n, rng)});
  }
  CHECK(ck.tensors.back().name == "lm_head.weight");
  auto dir = temp_dir("hfbad");
  write_hf_llama(dir, ck);
  REQUIRE_NOTHROW(read_hf_llama(dir));

  auto st = read_safetensors(dir / "model.safetensors");
  SECTION("missing tensor") {
    st.tensors.erase("model.layers.1.mlp.up_proj.weight");
    write_safetensors(dir / "model.safetensors", st);
    CHECK_THROWS_WITH(read_hf_llama(dir), Catch::Contains("missing tensor 'model.layers.1.mlp.up_proj.weight'"));
  }
  SECTION("wrong shape") {
    st.tensors["model.norm.weight"] = Tensor::from_f32(std::vector<float>(8), {8});
    write_safetensors(dir / "model.safetensors", st);
    CHECK_THROWS_WITH(read_hf_llama(dir), Catch::Contains("model.norm.weight") && Catch::Contains("shape [8]"));
  }
  SECTION("integer dtype") {
    st.tensors["model.norm.weight"] = Tensor::from_u8(std::vector<std::uint8_t>(16), {16});
    write_safetensors(dir / "model.safetensors", st);
    CHECK_THROWS_WITH(read_hf_llama(dir), Catch::Contains("model.norm.weight") && Catch::Contains("U8"));
  }
  SECTION("unexpected tensor") {
    st.tensors["model.layers.0.self_attn.q_proj.bias"] = Tensor::from_f32(std::vector<float>(16), {16});
    write_safetensors(dir / "model.safetensors", st);
    CHECK_THROWS_WITH(read_hf_llama(dir), Catch::Contains("unexpected tensor 'model.layers.0.self_attn.q_proj.bias'"));
  }
  SECTION("config field") {
    std::ofstream(dir / "config.json") << R"({"model_type": "llama", "hidden_size": 16})";
    CHECK_THROWS_WITH(read_hf_llama(dir), Catch::Contains("config.json") && Catch::Contains("intermediate_size"));
  }
  SECTION("unsupported activation") {
    std::ofstream(dir / "config.json") << R"({"model_type": "llama", "hidden_act": "gelu"})";
    CHECK_THROWS_WITH(read_hf_llama(dir), Catch::Contains("hidden_act"));
  }
}

// A write that fails half-way (here: a file-size limit, as a full disk would) leaves the
// previous file intact, no temporary behind, and says which file and why.
TEST_CASE("A failed atomic write keeps the old file and names the path and the OS error", "[ch07][files]") {
  const auto file = test::temp_path("ch07_files", "adapter.bin");
  write_text_atomic(file, "the previous checkpoint");
  rlimit old{};
  REQUIRE(getrlimit(RLIMIT_FSIZE, &old) == 0);
  rlimit small = old;
  small.rlim_cur = 4096;
  const auto previous = std::signal(SIGXFSZ, SIG_IGN);  // fail the write with EFBIG instead of a signal
  REQUIRE(setrlimit(RLIMIT_FSIZE, &small) == 0);
  std::string message;
  try {
    write_text_atomic(file, std::string(1 << 20, 'x'));
  } catch (const std::runtime_error& e) {
    message = e.what();
  }
  setrlimit(RLIMIT_FSIZE, &old);
  std::signal(SIGXFSZ, previous);
  CHECK_THAT(message, Catch::Contains("adapter.bin.tmp") && Catch::Contains(std::strerror(EFBIG)) &&
                          Catch::Contains("is unchanged"));
  std::ifstream in(file);
  std::string kept((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  CHECK(kept == "the previous checkpoint");
  CHECK_FALSE(std::filesystem::exists(file.string() + ".tmp"));
  const auto missing = test::temp_path("ch07_files", "no_such_dir") / "x" / "adapter.bin";
  CHECK_THROWS_WITH(write_text_atomic(missing, "x"), Catch::Contains("cannot open") &&
                                                        Catch::Contains(std::strerror(ENOENT)));
}
