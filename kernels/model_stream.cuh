// Streaming a model onto the GPU (chapter 7, "Loading a big model"): the sources that
// LlamaModelGpu's streaming constructor reads, one tensor at a time, and the writer of
// the random models that `qlora bench train` hands to transformers.
//
// A source is a TensorFill: it writes one named tensor as BF16 into device memory.
// - folder_fill: a Hugging Face folder through its memory maps. BF16 bytes go from the
//   map straight to the device; F32 and F16 are rounded to BF16 in one tensor's worth of
//   host memory first. Each tensor's pages are released once it is on the device, so the
//   host holds about one tensor, whatever the model's size.
// - random_fill: random weights of a real shape, made on the device from a counter
//   hash (src/counter_hash.hpp), never on the host.
#pragma once
#include "hf_folder.hpp"
#include "llama_model_gpu.cuh"

#include <cstdint>
#include <filesystem>

namespace qlora::cuda {

/// The tensors of an opened folder (which must outlive the returned function).
TensorFill folder_fill(const HfLlamaFolder& folder);

/// Random weights: element i of a projection or embedding is std·z, of a norm weight
/// 1 + std·z, with z a standard normal (Box-Muller) from counter_hash(seed ^ hash(name), i).
/// The same seed gives the same model on every GPU.
TensorFill random_fill(std::uint64_t seed, float std = 0.02f);

/// Prints a streaming load's progress to stderr (tensors, GB, GB/s), a line per ~5%.
void print_load_progress(const LoadProgress& p);

/// Writes the tensors `fill` makes as a Hugging Face folder: config.json, BF16
/// safetensors shards of at most shard_bytes each and model.safetensors.index.json
/// (transformers' sharded layout), each file written atomically. For handing the very
/// same random model to transformers. `progress` is told each file written.
void write_hf_folder(const LlamaConfig& config, const TensorFill& fill, const std::filesystem::path& dir,
                     std::int64_t shard_bytes, const std::function<void(const std::filesystem::path&)>& progress = {});

}  // namespace qlora::cuda
