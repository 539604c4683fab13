// Chapter 7, "Folders saved in 4 bits": a Hugging Face folder in bitsandbytes' 4-bit
// format (transformers' save_pretrained of a model loaded with BitsAndBytesConfig, or our
// own `qlora quantize` output) loads as stored — never dequantized and quantized again —
// and computes what transformers + bitsandbytes compute. Broken folders are refused,
// naming the tensor.
//
// Tolerance of the comparison with transformers + bitsandbytes (tests/fixtures/bnb_models,
// made by tools/make_bnb_fixtures.py): both sides dequantize the same stored codes and
// scales to the same float32 weights (chapter 3: w = table[code]·absmax in float32, the
// DQ scale decoded as code·absmax₂ then + offset), the fixture's embedding and norms are
// BF16 values, which our model keeps exactly, and bitsandbytes multiplies in float32
// (bnb_4bit_compute_dtype float32, TF32 off). What remains is float32 summation order
// (cuBLAS against OpenBLAS, ~1e-7 relative per dot product of ≤ 176 terms) and RoPE's
// tables (transformers builds cos/sin from float32 angles, we from double: ≤ 24 positions
// · 1 ulp ≈ 2e-6 rad). Through two layers that is a few 1e-6 of the largest logit; we
// allow 1e-4. A re-quantized, misread or mis-scaled block changes its weights by up to
// half a quantization step (~10% of the block's absmax) and the logits by ~1e-2, a
// hundred times more.
#include "atomic_file.hpp"
#include "bf16.hpp"
#include "file_helpers.hpp"
#include "hf_llama.hpp"
#include "llama_model.hpp"
#include "model_helpers.hpp"
#include "quant4_file.hpp"
#include "quantize_model.hpp"
#include "safetensors.hpp"

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <span>

using namespace qlora;
using Catch::Contains;
namespace fs = std::filesystem;

namespace {

struct Layout {
  QuantType type;
  bool dq;
  int blocksize;
  BaseStorage storage;
};

fs::path fresh_dir(const std::string& name) {
  const auto dir = test::temp_path("test_ch07_bnb_folders", name);
  fs::remove_all(dir);
  return dir;
}

nlohmann::json read_json(const fs::path& p) {
  std::ifstream in(p);
  return nlohmann::json::parse(in);
}

void write_json(const fs::path& p, const nlohmann::json& j) { write_text_atomic(p, j.dump(2) + "\n"); }

// What transformers writes for BitsAndBytesConfig(load_in_4bit=True, ...).
nlohmann::json quantization_config(QuantType type, bool dq) {
  return {{"quant_method", "bitsandbytes"},       {"load_in_4bit", true},
          {"load_in_8bit", false},                {"bnb_4bit_quant_type", to_string(type)},
          {"bnb_4bit_use_double_quant", dq},      {"bnb_4bit_quant_storage", "uint8"},
          {"bnb_4bit_compute_dtype", "float32"},  {"llm_int8_skip_modules", nullptr}};
}

// A folder as transformers saves a model loaded in 4 bits: config.json with its
// quantization_config, the seven projections of every layer in 4 bits (quantized from
// their BF16 values with our quantizer, which is bitsandbytes'), everything else BF16.
void write_4bit_folder(const fs::path& dir, const LlamaWeights& w, const Layout& l, bool with_config = true) {
  write_hf_llama(dir, checkpoint_from_weights(w));
  SafeTensors st = read_safetensors(dir / "model.safetensors");
  std::vector<std::string> projections;
  for (const auto& [name, t] : st.tensors)
    if (name.ends_with("_proj.weight")) projections.push_back(name);
  for (const auto& name : projections) {
    const Tensor t = st.at(name);
    put_quant4(st, name, quantize_4bit(t.to_f32(), t.shape, l.type, l.blocksize, l.dq), DType::BF16);
  }
  write_safetensors(dir / "model.safetensors", st);
  if (with_config) {
    auto cfg = read_json(dir / "config.json");
    cfg["quantization_config"] = quantization_config(l.type, l.dq);
    write_json(dir / "config.json", cfg);
  }
}

// Rewrites model.safetensors of `dir` through `edit`.
void edit_tensors(const fs::path& dir, const std::function<void(SafeTensors&)>& edit) {
  SafeTensors st = read_safetensors(dir / "model.safetensors");
  edit(st);
  write_safetensors(dir / "model.safetensors", st);
}

// Rewrites the JSON quant state of the 4-bit tensor `name` through `edit`.
void edit_state(SafeTensors& st, const std::string& name, const std::function<void(nlohmann::json&)>& edit) {
  for (const char* t : {"nf4", "fp4"}) {
    const std::string key = name + ".quant_state.bitsandbytes__" + t;
    if (!st.contains(key)) continue;
    auto js = nlohmann::json::parse(st.at(key).data.begin(), st.at(key).data.end());
    edit(js);
    const std::string text = js.dump();
    st.tensors[key] = Tensor::from_u8(std::span(reinterpret_cast<const std::uint8_t*>(text.data()), text.size()),
                                      {static_cast<std::int64_t>(text.size())});
    return;
  }
  FAIL("no quant state for " << name);
}

const Layout kNf4Dq{QuantType::nf4, true, 64, BaseStorage::nf4_dq};
const std::string kQ = "model.layers.1.self_attn.q_proj.weight";

double max_abs(const std::vector<float>& v) {
  double m = 0;
  for (float x : v) m = std::max(m, std::fabs(static_cast<double>(x)));
  return m;
}

double max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
  REQUIRE(a.size() == b.size());
  double m = 0;
  for (std::size_t i = 0; i < a.size(); ++i) m = std::max(m, std::fabs(static_cast<double>(a[i]) - b[i]));
  return m;
}

std::vector<float> logits_of(LlamaModel& m, const std::vector<int>& tokens) {
  std::mt19937_64 rng(0);
  m.forward(tokens.data(), nullptr, 1, static_cast<int>(tokens.size()), false, rng);
  return m.logits();
}

}  // namespace

TEST_CASE("4-bit Hugging Face folders load as stored, in the storage the folder says", "[ch07][bnb]") {
  const LlamaWeights w = random_llama_weights(test::tiny_config(2, true), 71);
  const auto tokens = test::random_tokens(8, w.config.vocab_size, 72);
  for (const Layout& l : {kNf4Dq, Layout{QuantType::fp4, false, 64, BaseStorage::fp4},
                          Layout{QuantType::nf4, false, 128, BaseStorage::nf4},
                          Layout{QuantType::fp4, true, 256, BaseStorage::fp4_dq}}) {
    INFO(to_string(l.storage) << ", blocksize " << l.blocksize);
    const auto dir = fresh_dir("folder");
    write_4bit_folder(dir, w, l);
    const SafeTensors st = read_safetensors(dir / "model.safetensors");
    const LlamaWeights loaded = load_llama_weights(dir);
    REQUIRE(prequantized_storage(loaded) == l.storage);
    LlamaModel m(loaded, l.storage);
    for (int layer = 0; layer < w.config.n_layers; ++layer)
      for (Proj p : kAllProj) {
        const FrozenLinear& f = m.frozen(layer, p);
        const Quant4Tensor stored = get_quant4(st, hf_module_name(layer, p) + ".weight", "test").q;
        REQUIRE(f.q4);
        CHECK(f.storage == l.storage);
        CHECK(f.q4->blocksize == l.blocksize);
        CHECK(f.q4->packed == stored.packed);
        CHECK(f.q4->absmax == stored.absmax);
        CHECK(f.q4->nested.codes == stored.nested.codes);
        CHECK(f.storage_bytes() == stored.storage_bytes());
        CHECK(f.w == dequantize_4bit_f32(stored));
      }
    // Blocksize 64 is also what our own quantizer uses, so quantizing the BF16 weights
    // here gives the very same model: identical logits.
    if (l.blocksize == 64) {
      const LlamaWeights bf16 = [&] {
        const auto bdir = fresh_dir("bf16");
        write_hf_llama(bdir, checkpoint_from_weights(w));
        return load_llama_weights(bdir);
      }();
      LlamaModel ours(bf16, l.storage);
      CHECK(max_abs_diff(logits_of(m, tokens), logits_of(ours, tokens)) == 0.0);
    }
  }
}

TEST_CASE("4-bit folders: a --storage that disagrees with the folder is refused naming both", "[ch07][bnb]") {
  const auto dir = fresh_dir("storage");
  write_4bit_folder(dir, random_llama_weights(test::tiny_config(2, true), 73), kNf4Dq);
  const LlamaWeights w = load_llama_weights(dir);
  for (BaseStorage s : {BaseStorage::fp4, BaseStorage::nf4, BaseStorage::bfloat16, BaseStorage::float32, BaseStorage::int4})
    CHECK_THROWS_WITH(LlamaModel(w, s), Contains("nf4-dq") && Contains(to_string(s)));
  const auto r = test::run_qlora("eval --model '" + dir.string() + "' --storage fp4-dq");
  CHECK(r.rc != 0);
  CHECK_THAT(r.output, Contains("nf4-dq") && Contains("--storage fp4-dq") && Contains(dir.string()));
  // Without --storage the folder's own storage is used: the run gets past the model and
  // stops at the tokenizer, which is larger than this tiny model's vocabulary.
  const auto ok = test::run_qlora("eval --model '" + dir.string() + "'");
  CHECK_THAT(ok.output, Contains("tokenizer") && !Contains("--storage"));
}

TEST_CASE("4-bit folders: inconsistent quant states and configs are refused naming the tensor", "[ch07][bnb]") {
  const LlamaWeights w = random_llama_weights(test::tiny_config(2, true), 74);
  struct Case {
    const char* what;
    std::function<void(const fs::path&)> corrupt;
    std::vector<std::string> fragments;
  };
  const std::string gate = "model.layers.0.mlp.gate_proj.weight";
  const std::vector<Case> cases = {
      {"quant state shape transposed",
       [&](const fs::path& d) {
         edit_tensors(d, [&](SafeTensors& st) { edit_state(st, gate, [](nlohmann::json& j) { j["shape"] = {16, 24}; }); });
       },
       {gate, "[16, 24]", "[24, 16]"}},
      {"packed codes too short",
       [&](const fs::path& d) {
         edit_tensors(d, [&](SafeTensors& st) { st.tensors[kQ] = Tensor::from_u8(std::vector<std::uint8_t>(100), {100, 1}); });
       },
       {kQ, "shape [100, 1]", "expected [128, 1]"}},
      {"unknown quant_type",
       [&](const fs::path& d) {
         edit_tensors(d, [&](SafeTensors& st) { edit_state(st, kQ, [](nlohmann::json& j) { j["quant_type"] = "int4"; }); });
       },
       {kQ, "int4"}},
      {"missing nested absmax",
       [&](const fs::path& d) { edit_tensors(d, [&](SafeTensors& st) { st.tensors.erase(kQ + ".nested_absmax"); }); },
       {kQ, "missing part", "nested_absmax"}},
      {"blocksize not a power of two",
       [&](const fs::path& d) {
         edit_tensors(d, [&](SafeTensors& st) { edit_state(st, kQ, [](nlohmann::json& j) { j["blocksize"] = 48; }); });
       },
       {kQ, "48"}},
      {"blocksize too large",
       [&](const fs::path& d) {
         edit_tensors(d, [&](SafeTensors& st) { edit_state(st, kQ, [](nlohmann::json& j) { j["blocksize"] = 8192; }); });
       },
       {kQ, "8192"}},
      {"quant_map not the NF4 table",
       [&](const fs::path& d) {
         edit_tensors(d, [&](SafeTensors& st) { st.tensors[kQ + ".quant_map"].data[4] ^= 1; });
       },
       {kQ + ".quant_map", "nf4 table"}},
      {"config declares fp4, the tensors are nf4",
       [&](const fs::path& d) {
         auto cfg = read_json(d / "config.json");
         cfg["quantization_config"]["bnb_4bit_quant_type"] = "fp4";
         write_json(d / "config.json", cfg);
       },
       {"model.layers.0.self_attn.q_proj.weight", "nf4 with double quantization", "declares fp4"}},
      {"config declares 4 bits, a projection is BF16",
       [&](const fs::path& d) {
         edit_tensors(d, [&](SafeTensors& st) {
           for (const char* part : {".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".quant_state.bitsandbytes__nf4"})
             st.tensors.erase(gate + part);
           st.tensors[gate] = Tensor::from_bf16(std::vector<bf16>(24 * 16), {24, 16});
         });
       },
       {gate, "not stored in 4 bits"}},
      {"8-bit config",
       [&](const fs::path& d) {
         auto cfg = read_json(d / "config.json");
         cfg["quantization_config"]["load_in_8bit"] = true;
         write_json(d / "config.json", cfg);
       },
       {"config.json", "load_in_8bit"}},
      {"another quant method",
       [&](const fs::path& d) {
         auto cfg = read_json(d / "config.json");
         cfg["quantization_config"]["quant_method"] = "gptq";
         write_json(d / "config.json", cfg);
       },
       {"config.json", "gptq"}},
      {"packed codes not in uint8",
       [&](const fs::path& d) {
         auto cfg = read_json(d / "config.json");
         cfg["quantization_config"]["bnb_4bit_quant_storage"] = "bfloat16";
         write_json(d / "config.json", cfg);
       },
       {"config.json", "bnb_4bit_quant_storage", "bfloat16"}},
  };
  for (const auto& c : cases) {
    INFO(c.what);
    const auto dir = fresh_dir("corrupt");
    write_4bit_folder(dir, w, kNf4Dq);
    REQUIRE_NOTHROW(load_llama_weights(dir));
    c.corrupt(dir);
    try {
      (void)load_llama_weights(dir);
      FAIL("accepted");
    } catch (const std::runtime_error& e) {
      const std::string msg = e.what();
      INFO(msg);
      CHECK_THAT(msg, Contains(dir.string()));
      for (const auto& f : c.fragments) CHECK_THAT(msg, Contains(f));
    }
  }
}

TEST_CASE("4-bit folders: projections stored in different formats are refused naming the tensor", "[ch07][bnb]") {
  const LlamaWeights w = random_llama_weights(test::tiny_config(2, true), 75);
  const auto dir = fresh_dir("mixed");
  write_4bit_folder(dir, w, kNf4Dq, false);
  const std::string down = "model.layers.1.mlp.down_proj.weight";
  edit_tensors(dir, [&](SafeTensors& st) {
    const auto q = get_quant4(st, down, "test").q;
    for (const char* part : {".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".quant_state.bitsandbytes__nf4"})
      st.tensors.erase(down + part);
    put_quant4(st, down, quantize_4bit(dequantize_4bit_f32(q), q.shape, QuantType::fp4, 64, false), DType::BF16);
  });
  CHECK_THROWS_WITH(load_llama_weights(dir),
                    Contains(dir.string()) && Contains(down) && Contains("fp4") && Contains("nf4-dq"));
}

TEST_CASE("`qlora quantize` output of a whole model loads the same way", "[ch07][bnb]") {
  const LlamaWeights w = random_llama_weights(test::tiny_config(4, false), 76);
  const auto bf16_dir = fresh_dir("quantize_in");
  write_hf_llama(bf16_dir, checkpoint_from_weights(w));
  QuantizeOptions opt;
  opt.type = QuantType::nf4;
  opt.double_quant = true;
  const QuantizeResult r = quantize_checkpoint(bf16_dir / "model.safetensors", opt);
  const auto dir = fresh_dir("quantize_out");
  fs::create_directories(dir);
  fs::copy_file(bf16_dir / "config.json", dir / "config.json");
  write_safetensors(dir / "model.safetensors", r.file);
  // quantize stores every tensor in 4 bits, the embedding and norms too; those are
  // dequantized (the model keeps them in BF16), the projections kept as stored.
  const LlamaWeights loaded = load_llama_weights(dir);
  CHECK(prequantized_storage(loaded) == BaseStorage::nf4_dq);
  LlamaModel m(loaded, BaseStorage::nf4_dq);
  for (int layer = 0; layer < w.config.n_layers; ++layer)
    for (Proj p : kAllProj)
      CHECK(m.frozen(layer, p).q4->packed == get_quant4(r.file, hf_module_name(layer, p) + ".weight", "test").q.packed);
  const auto emb = get_quant4(r.file, "model.embed_tokens.weight", "test").q;
  CHECK(m.tok_emb() == from_bf16(dequantize_4bit_bf16(emb)));
}

TEST_CASE("transformers + bitsandbytes 4-bit folders: our logits are theirs", "[ch07][bnb][fixtures]") {
  const fs::path dir = fs::path(QLORA_FIXTURES_DIR) / "bnb_models";
  INFO("fixtures: run tools/make_bnb_fixtures.py on a machine with a GPU, torch, transformers and bitsandbytes "
       "(it writes " << dir.string() << ")");
  REQUIRE(fs::exists(dir / "index.json"));
  const auto index = read_json(dir / "index.json");
  REQUIRE(index.at("cases").size() >= 2);
  for (const auto& c : index.at("cases")) {
    const std::string name = c.at("name");
    INFO(name);
    const BaseStorage storage = parse_base_storage(name);
    const LlamaWeights w = load_llama_weights(dir / c.at("folder").get<std::string>());
    REQUIRE(prequantized_storage(w) == storage);
    LlamaModel m(w, storage);
    CHECK(m.frozen(0, Proj::q).q4->blocksize == c.at("blocksize").get<int>());
    const SafeTensors ref = read_safetensors(dir / c.at("logits").get<std::string>());
    const Tensor& tok = ref.at("tokens");
    std::vector<int> tokens(tok.data.size() / 4);
    std::memcpy(tokens.data(), tok.data.data(), tok.data.size());
    const std::vector<float> theirs = ref.at("logits").to_f32();
    const std::vector<float> ours = logits_of(m, tokens);
    const double err = max_abs_diff(ours, theirs) / max_abs(theirs);
    INFO("max |logit difference| / max |logit| = " << err);
    CHECK(err < 1e-4);
    std::printf("%s: max |logit difference| / max |logit| = %.3g\n", name.c_str(), err);
  }
}
