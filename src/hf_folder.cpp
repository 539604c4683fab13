// A Hugging Face LLaMA folder opened for streaming (chapter 7). See hf_folder.hpp.
#include "hf_folder.hpp"

#include "bnb_config.hpp"
#include "hf_llama.hpp"

#include <nlohmann/json.hpp>

#include <fstream>
#include <set>
#include <stdexcept>

namespace qlora {
namespace {

std::string shape_str(const std::vector<std::int64_t>& s) {
  std::string r = "[";
  for (std::size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

}  // namespace

void check_float_tensor(const TensorSpec& spec, DType dtype, const std::vector<std::int64_t>& shape,
                        const std::string& where) {
  if (!is_floating(dtype) || dtype == DType::F64)
    throw std::runtime_error(where + ": dtype " + to_string(dtype) + " (expected BF16, F16 or F32)");
  if (shape != spec.shape)
    throw std::runtime_error(where + ": shape " + shape_str(shape) + ", but config.json implies " + shape_str(spec.shape));
}

bool implied_by_config(const std::string& name, const LlamaConfig& c) {
  return name.ends_with(".self_attn.rotary_emb.inv_freq") || (name == "lm_head.weight" && c.shared_classifier);
}

std::vector<std::filesystem::path> hf_weight_files(const std::filesystem::path& dir) {
  const auto index = dir / "model.safetensors.index.json";
  if (!std::filesystem::exists(index)) return {dir / "model.safetensors"};
  std::ifstream in(index);
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(in);
  } catch (const nlohmann::json::parse_error& e) {
    throw std::runtime_error("shard index '" + index.string() + "': not valid JSON: " + e.what());
  }
  if (!j.is_object() || !j.contains("weight_map") || !j["weight_map"].is_object())
    throw std::runtime_error("shard index '" + index.string() + "': no \"weight_map\" object");
  std::set<std::string> shards;
  for (const auto& [name, file] : j["weight_map"].items()) {
    if (!file.is_string()) throw std::runtime_error("shard index '" + index.string() + "': bad entry for " + name);
    const std::string f = file.get<std::string>();
    // A shard is a file of this folder, never a path that leaves it.
    if (f.empty() || f.find('/') != std::string::npos || f == "." || f == "..")
      throw std::runtime_error("shard index '" + index.string() + "': shard name '" + f + "' of " + name +
                               " is not a file name in the folder");
    shards.insert(f);
  }
  std::vector<std::filesystem::path> files;
  for (const auto& s : shards) files.push_back(dir / s);
  return files;
}

//! [hf-folder-open]
HfLlamaFolder::HfLlamaFolder(const std::filesystem::path& dir) : dir_(dir) {
  const std::string where = "Hugging Face checkpoint '" + dir.string() + "'";
  if (!std::filesystem::is_directory(dir)) throw std::runtime_error(where + ": not a directory");
  config_ = read_hf_config(dir / "config.json");
  // A folder saved in 4 bits streams in through the host model (read_hf_llama) instead.
  if (read_bnb_4bit_config(dir / "config.json"))
    throw std::runtime_error(where + ": quantized by bitsandbytes (\"quantization_config\"); it loads through the "
                             "host model, not the streaming loader");
  for (const auto& f : hf_weight_files(dir)) shards_.emplace_back(f);  // headers only
  for (const MappedSafetensors& s : shards_)
    for (const auto& [name, t] : s.tensors()) {
      if (tensors_.count(name))
        throw std::runtime_error("tensor '" + name + "' appears in more than one shard of " + dir.string());
      tensors_.emplace(name, std::make_pair(&t, &s));
    }

  std::set<std::string> used;
  for (const auto& spec : llama_tensor_specs(config_)) {
    auto it = tensors_.find(spec.name);
    if (it == tensors_.end()) throw std::runtime_error(where + ": missing tensor '" + spec.name + "'");
    const TensorView& t = *it->second.first;
    check_float_tensor(spec, t.dtype, t.shape, "tensor '" + spec.name + "' in '" + it->second.second->path().string() + "'");
    used.insert(spec.name);
  }
  for (const auto& [name, value] : tensors_) {
    if (used.count(name) || implied_by_config(name, config_)) continue;
    throw std::runtime_error(where + ": unexpected tensor '" + name + "' in '" + value.second->path().string() +
                             "' (not part of a LLaMA model with this config)");
  }
}
//! [hf-folder-open]

const std::pair<const TensorView*, const MappedSafetensors*>& HfLlamaFolder::find(const std::string& name) const {
  auto it = tensors_.find(name);
  if (it == tensors_.end()) throw std::runtime_error("Hugging Face checkpoint '" + dir_.string() + "': no tensor '" + name + "'");
  return it->second;
}

const TensorView& HfLlamaFolder::tensor(const std::string& name) const { return *find(name).first; }
const std::filesystem::path& HfLlamaFolder::file_of(const std::string& name) const { return find(name).second->path(); }
//! [hf-folder-bf16]
std::span<const bf16> HfLlamaFolder::bf16_values(const std::string& name, std::vector<bf16>& scratch) const {
  const TensorView& t = tensor(name);
  const auto n = static_cast<std::size_t>(t.numel());
  // safetensors data is little-endian and BF16 is two bytes: the map can be read in place.
  if (t.dtype == DType::BF16) return {reinterpret_cast<const bf16*>(t.bytes.data()), n};
  scratch.resize(n);
  convert_bf16(t, scratch);
  return {scratch.data(), n};
}
//! [hf-folder-bf16]

void HfLlamaFolder::release(const std::string& name) const {
  const auto& [t, s] = find(name);
  s->release(*t);
}

std::int64_t HfLlamaFolder::stored_bytes() const {
  std::int64_t n = 0;
  for (const auto& spec : llama_tensor_specs(config_)) n += static_cast<std::int64_t>(tensor(spec.name).bytes.size());
  return n;
}

}  // namespace qlora
