// Chapter 7, "Loading a big model": memory-mapped safetensors, Hugging Face folders opened
// for streaming (shards, checks before any weight is read), host memory that stays near one
// tensor while a model streams through, and the CPU model's refusal of a model it cannot hold.
#include "file_helpers.hpp"
#include "model_helpers.hpp"
#include "hf_folder.hpp"
#include "hf_llama.hpp"
#include "llama_model.hpp"
#include "model_shapes.hpp"
#include "safetensors.hpp"

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>

using namespace qlora;
using qlora::test::temp_path;

namespace {

// Resident memory of this process now (Linux /proc/self/statm: pages of RSS, second field).
std::int64_t rss_bytes() {
  std::ifstream f("/proc/self/statm");
  std::int64_t size = 0, resident = 0;
  f >> size >> resident;
  return resident * sysconf(_SC_PAGESIZE);
}

// A checkpoint's tensors split over shards of about shard_bytes (BF16), with the index.
void write_sharded(const std::filesystem::path& dir, const LlamaCheckpoint& ck, std::size_t shard_bytes) {
  std::filesystem::create_directories(dir);
  std::vector<SafeTensors> shards(1);
  std::size_t in_shard = 0;
  for (const NamedTensor& t : ck.tensors) {
    const std::size_t bytes = t.data.size() * 2;
    if (in_shard > 0 && in_shard + bytes > shard_bytes) {
      shards.emplace_back();
      in_shard = 0;
    }
    shards.back().tensors[t.name] = Tensor::from_bf16(to_bf16(t.data), t.shape);
    in_shard += bytes;
  }
  nlohmann::json index = {{"metadata", nlohmann::json::object()}, {"weight_map", nlohmann::json::object()}};
  for (std::size_t s = 0; s < shards.size(); ++s) {
    const std::string name = "model-" + std::to_string(s + 1) + "-of-" + std::to_string(shards.size()) + ".safetensors";
    for (const auto& [t, v] : shards[s].tensors) index["weight_map"][t] = name;
    write_safetensors(dir / name, shards[s]);
  }
  std::ofstream(dir / "model.safetensors.index.json") << index.dump(1);
  write_hf_config(dir / "config.json", ck.config);
}

LlamaCheckpoint random_checkpoint(const LlamaConfig& c, std::uint64_t seed) {
  LlamaCheckpoint ck = checkpoint_from_weights(random_llama_weights(c, seed));
  return ck;
}

}  // namespace

TEST_CASE("A mapped safetensors file reads as the whole-file reader does and refuses what it refuses", "[ch07]") {
  SafeTensors st;
  st.metadata["format"] = "pt";
  st.tensors["a"] = Tensor::from_f32(std::vector<float>{1.5f, -2.0f, 3.25f}, {3});
  st.tensors["b"] = Tensor::from_bf16(to_bf16(std::vector<float>{0.5f, 7.0f}), {1, 2});
  st.tensors["c"] = Tensor::from_u8(std::vector<std::uint8_t>{1, 2, 3, 4, 5}, {5});
  const auto file = temp_path("ch07_loading", "three.safetensors");
  write_safetensors(file, st);
  const MappedSafetensors m(file);
  CHECK(m.metadata() == st.metadata);
  REQUIRE(m.tensors().size() == 3);
  for (const auto& [name, t] : st.tensors) {
    const TensorView& v = m.at(name);
    CHECK(v.dtype == t.dtype);
    CHECK(v.shape == t.shape);
    CHECK(std::equal(v.bytes.begin(), v.bytes.end(), t.data.begin(), t.data.end()));
  }
  CHECK(m.at("a").to_f32() == st.at("a").to_f32());
  m.release(m.at("a"));  // the pages go; the view still reads (the kernel pages them in again)
  CHECK(m.at("a").to_f32() == std::vector<float>{1.5f, -2.0f, 3.25f});
  CHECK_THROWS_WITH(m.at("zz"), Catch::Contains("no tensor 'zz'"));

  // The same rules as read_safetensors: a truncated file is refused with the same message.
  auto bytes = qlora::test::read_bytes(file);
  bytes.resize(bytes.size() - 3);
  const auto cut = temp_path("ch07_loading", "cut.safetensors");
  qlora::test::write_bytes(cut, bytes);
  std::string whole, mapped;
  try {
    read_safetensors(cut);
  } catch (const std::runtime_error& e) {
    whole = e.what();
  }
  try {
    MappedSafetensors again(cut);
  } catch (const std::runtime_error& e) {
    mapped = e.what();
  }
  CHECK_THAT(whole, Catch::Contains("cut.safetensors"));
  CHECK(mapped == whole);
  CHECK_THROWS_WITH(MappedSafetensors(temp_path("ch07_loading", "missing.safetensors")), Catch::Contains("cannot open"));
}

TEST_CASE("A sharded folder reads exactly as the single-file folder of the same model", "[ch07]") {
  const LlamaConfig c = qlora::test::tiny_config(2, false);
  const LlamaCheckpoint ck = random_checkpoint(c, 5);
  const auto one = temp_path("ch07_loading", "one");
  const auto many = temp_path("ch07_loading", "many");
  write_hf_llama(one, ck);
  write_sharded(many, ck, 1024);  // a few tensors per shard
  REQUIRE(hf_weight_files(many).size() > 3);
  const LlamaCheckpoint a = read_hf_llama(one), b = read_hf_llama(many);
  REQUIRE(a.tensors.size() == b.tensors.size());
  for (std::size_t i = 0; i < a.tensors.size(); ++i) {
    CAPTURE(a.tensors[i].name);
    CHECK(a.tensors[i].name == b.tensors[i].name);
    CHECK(a.tensors[i].data == b.tensors[i].data);
  }
  const HfLlamaFolder f(many);
  CHECK(f.stored_bytes() == 2 * llama_parameter_count(c));
  std::vector<bf16> scratch;
  const auto v = f.bf16_values("model.norm.weight", scratch);
  CHECK(scratch.empty());  // BF16 in the file: read in place, nothing converted
  CHECK(std::vector<bf16>(v.begin(), v.end()) == to_bf16(ck.at("model.norm.weight").data));

  SECTION("an index that names a file outside the folder is refused") {
    std::ofstream(many / "model.safetensors.index.json")
        << R"({"weight_map": {"model.norm.weight": "../elsewhere.safetensors"}})";
    CHECK_THROWS_WITH(HfLlamaFolder(many), Catch::Contains("not a file name in the folder"));
  }
  SECTION("a tensor in two shards is refused, naming it") {
    write_safetensors(many / "extra.safetensors", [&] {
      SafeTensors st;
      st.tensors["model.norm.weight"] = Tensor::from_bf16(to_bf16(ck.at("model.norm.weight").data), {c.dim});
      return st;
    }());
    auto index = nlohmann::json::parse(std::ifstream(many / "model.safetensors.index.json"));
    index["weight_map"]["model.extra"] = "extra.safetensors";
    std::ofstream(many / "model.safetensors.index.json") << index.dump();
    CHECK_THROWS_WITH(HfLlamaFolder(many), Catch::Contains("model.norm.weight") && Catch::Contains("more than one shard"));
  }
}

// The host half of a streaming load (what folder_fill does before each copy to the GPU):
// every tensor read as BF16 from the map, then released. Resident memory must stay near
// the largest tensor (its mapped pages, plus its converted copy for an F32 file), not grow
// with the model; without release() it grows to the whole model, which shows the
// measurement can tell the two apart.
TEST_CASE("Streaming a sharded model keeps host memory near one tensor", "[ch07]") {
  LlamaConfig c;
  c.dim = 512;
  c.hidden_dim = 1408;
  c.n_layers = 8;
  c.n_heads = 8;
  c.n_kv_heads = 8;
  c.vocab_size = 32000;
  c.seq_len = 64;
  c.shared_classifier = false;
  const auto dir = temp_path("ch07_loading", "stream");
  write_sharded(dir, random_checkpoint(c, 9), std::size_t{40} << 20);
  const HfLlamaFolder folder(dir);
  const std::int64_t largest = 2ll * c.vocab_size * c.dim;  // the embedding, BF16
  const std::int64_t total = folder.stored_bytes();
  for (const bool release : {true, false}) {
    const std::int64_t before = rss_bytes();
    std::int64_t peak = 0;
    std::vector<bf16> scratch;
    double checksum = 0;
    for (const auto& spec : llama_tensor_specs(c)) {
      const auto v = folder.bf16_values(spec.name, scratch);
      for (std::size_t i = 0; i < v.size(); i += 512) checksum += bf16_to_f32(v[i]);  // touch every page
      peak = std::max(peak, rss_bytes() - before);
      if (release) folder.release(spec.name);
    }
    std::printf("streamed %.0f MB (largest tensor %.0f MB) %s release: resident grew by at most %.1f MB\n",
                static_cast<double>(total) / 1e6, static_cast<double>(largest) / 1e6, release ? "with" : "without",
                static_cast<double>(peak) / 1e6);
    CHECK(std::isfinite(checksum));
    if (release)
      CHECK(peak < 2 * largest);
    else
      CHECK(peak > total / 2);
    if (!release)
      for (const auto& spec : llama_tensor_specs(c)) folder.release(spec.name);
  }
}

// A 65B-shape folder whose data is a hole (a sparse file): the headers are real, so the
// folder opens and its size is known; the CPU model must refuse it by size, pointing at
// --device cuda, before it reads a byte of data.
TEST_CASE("The CPU model refuses a model it cannot hold, naming the size and --device cuda", "[ch07]") {
  const LlamaConfig c = model_shape("65b");
  const auto dir = temp_path("ch07_loading", "sparse65b");
  std::filesystem::create_directories(dir);
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  std::uint64_t offset = 0;
  for (const auto& t : llama_tensor_specs(c)) {
    std::uint64_t n = 2;
    for (auto d : t.shape) n *= static_cast<std::uint64_t>(d);
    header[t.name] = {{"dtype", "BF16"}, {"shape", t.shape}, {"data_offsets", {offset, offset + n}}};
    offset += n;
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  const auto file = dir / "model.safetensors";
  {
    std::ofstream out(file, std::ios::binary);
    const std::uint64_t len = text.size();
    out.write(reinterpret_cast<const char*>(&len), 8);
    out.write(text.data(), static_cast<std::streamsize>(text.size()));
  }
  std::filesystem::resize_file(file, 8 + text.size() + offset);  // a hole: no disk blocks
  write_hf_config(dir / "config.json", c);
  CHECK(HfLlamaFolder(dir).config().n_layers == 80);
  CHECK_THROWS_WITH(load_llama_weights(dir), Catch::Contains("65.29 B-parameter") && Catch::Contains("--device cuda") &&
                                                 Catch::Contains("sparse65b"));
  std::filesystem::remove_all(dir);
}

// A NaN in a weight file stops the load where the file and the tensor are known.
TEST_CASE("A non-finite weight is refused naming the file, the tensor and the position", "[ch07]") {
  const LlamaConfig c = test::tiny_config(2, true);
  LlamaCheckpoint ck = random_checkpoint(c, 41);
  for (NamedTensor& t : ck.tensors)
    if (t.name == "model.layers.1.mlp.down_proj.weight") t.data[static_cast<std::size_t>(t.shape[1]) * 2 + 3] = NAN;
  const auto dir = temp_path("ch07_loading", "nan_folder");
  write_sharded(dir, ck, 1 << 30);
  CHECK_THROWS_WITH(load_llama_weights(dir), Catch::Contains("model.layers.1.mlp.down_proj.weight") &&
                                                 Catch::Contains("model-1-of-1.safetensors") &&
                                                 Catch::Contains("NaN at row 2, column 3"));
  for (NamedTensor& t : ck.tensors)
    if (t.name == "model.layers.1.mlp.down_proj.weight") t.data[static_cast<std::size_t>(t.shape[1]) * 2 + 3] = 1.0f;
  ck.tensors.front().data[7] = INFINITY;  // the embedding
  write_sharded(dir, ck, 1 << 30);
  CHECK_THROWS_WITH(load_llama_weights(dir), Catch::Contains("model.embed_tokens.weight") &&
                                                 Catch::Contains("an infinite value at row 0, column 7"));
}
