// A Hugging Face LLaMA folder opened for streaming (chapter 7, "Loading a big model"):
// config.json, and model.safetensors or the shards that model.safetensors.index.json
// lists, each memory-mapped (MappedSafetensors). Opening reads only the headers and
// checks the whole folder against the config, so a bad file fails before any weight
// is read; the loaders then take one tensor at a time and release it.
#pragma once

#include "llama2c.hpp"
#include "safetensors.hpp"

#include <filesystem>
#include <map>
#include <span>
#include <string>
#include <vector>

namespace qlora {

class HfLlamaFolder {
 public:
  /// Throws std::runtime_error naming the folder, file, field or tensor when the config
  /// is unsupported, a tensor of llama_tensor_specs(config) is missing, has another shape
  /// or a non-floating dtype, or a tensor that is not part of the model is present.
  explicit HfLlamaFolder(const std::filesystem::path& dir);

  const std::filesystem::path& dir() const { return dir_; }
  const LlamaConfig& config() const { return config_; }
  /// The model tensor `name` (a llama_tensor_specs name), checked at opening.
  const TensorView& tensor(const std::string& name) const;
  /// The shard that holds `name`.
  const std::filesystem::path& file_of(const std::string& name) const;
  /// The values of `name` as BF16: the mapped bytes themselves when the file stores BF16,
  /// else rounded into `scratch` (resized). Valid until scratch changes.
  std::span<const bf16> bf16_values(const std::string& name, std::vector<bf16>& scratch) const;
  /// Drops the pages of `name` from this process (MappedSafetensors::release).
  void release(const std::string& name) const;
  /// Bytes of all model tensors as stored in the files.
  std::int64_t stored_bytes() const;

 private:
  std::filesystem::path dir_;
  LlamaConfig config_;
  std::vector<MappedSafetensors> shards_;
  std::map<std::string, std::pair<const TensorView*, const MappedSafetensors*>> tensors_;
  const std::pair<const TensorView*, const MappedSafetensors*>& find(const std::string& name) const;
};

/// Throws std::runtime_error naming the tensor (`where`) unless it is BF16, F16 or F32 with
/// the shape of `spec`: the rule for every float tensor of a folder, streamed or read whole.
void check_float_tensor(const TensorSpec& spec, DType dtype, const std::vector<std::int64_t>& shape,
                        const std::string& where);
/// Tensors a folder may hold beyond llama_tensor_specs, implied by the config: the RoPE
/// frequency buffers of older exports, and lm_head.weight of a tied model.
bool implied_by_config(const std::string& name, const LlamaConfig& c);

/// The safetensors files of a folder: the shards its model.safetensors.index.json names
/// (each once, sorted), else model.safetensors. Throws naming the index on a bad index.
std::vector<std::filesystem::path> hf_weight_files(const std::filesystem::path& dir);

}  // namespace qlora
