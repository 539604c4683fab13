// Hugging Face LLaMA checkpoints: a folder with config.json and model.safetensors
// (or shards listed in model.safetensors.index.json), tensors named
// model.layers.N.self_attn.q_proj.weight, ... (chapter 7).
//
// The RoPE convention differs from llama2.c: llama2.c (like Meta's original code)
// rotates interleaved pairs (x[2i], x[2i+1]) of each head, transformers rotates the
// two halves (x[i], x[i + head_size/2]). The same model therefore stores the rows of
// q_proj and k_proj in a different order. transformers' convert_llama_weights_to_hf.py
// reorders them with
//     permute(w) = w.view(n_heads, head_size/2, 2, cols).transpose(1, 2).reshape(rows, cols)
// i.e. row h·hs + 2i + t (pair i, element t of head h) moves to row h·hs + t·hs/2 + i.
// k_proj uses n_kv_heads (grouped-query attention).
#pragma once

#include "llama2c.hpp"

#include <filesystem>
#include <span>
#include <vector>

namespace qlora {

/// Rows of a q_proj/k_proj weight [n_heads·head_size, cols] from llama2.c's interleaved
/// order to Hugging Face's rotate-half order (transformers' `permute`).
std::vector<float> rope_interleaved_to_half(std::span<const float> w, int n_heads, int cols);
/// The inverse of rope_interleaved_to_half.
std::vector<float> rope_half_to_interleaved(std::span<const float> w, int n_heads, int cols);

/// Reorders every layer's q_proj (n_heads) and k_proj (n_kv_heads) to `target`; no-op if
/// the checkpoint is already in that layout. Throws std::invalid_argument for a 4-bit q/k:
/// its blocks run across rows, so reordering would mean quantizing again.
void convert_rope_layout(LlamaCheckpoint& ck, RopeLayout target);

/// Reads a LLaMA or Mistral config.json in transformers 4.x or 5.x spelling (chapter 7,
/// "Config files, old and new spellings"). Throws std::runtime_error naming the file and the
/// field on anything that changes the computation and is not implemented here.
LlamaConfig read_hf_config(const std::filesystem::path& path);

/// Writes config.json for c (transformers' spelling), atomically.
void write_hf_config(const std::filesystem::path& path, const LlamaConfig& c);

/// Reads a Hugging Face LLaMA folder (BF16, F16 or F32 tensors) into float32, layout
/// rotate_half. Tensors saved in bitsandbytes' 4-bit format (a folder saved by
/// transformers with BitsAndBytesConfig(load_in_4bit=True), or `qlora quantize` output)
/// keep their stored form in NamedTensor::q4 and their dequantized values in data; when
/// config.json has a quantization_config, every projection must be 4-bit as it declares.
/// Throws std::runtime_error naming the folder and the config field or tensor on anything
/// unsupported or inconsistent (missing/extra tensors, wrong shapes, dtypes, quant states).
LlamaCheckpoint read_hf_llama(const std::filesystem::path& dir);

/// Writes config.json and model.safetensors (BF16, q/k in rotate-half order, lm_head only
/// when not shared) into dir, creating it; each file is written atomically. config.json uses
/// transformers 4.x's RoPE spelling, which 4.x and 5.x both read; model_type is "mistral"
/// when the config has a sliding window.
void write_hf_llama(const std::filesystem::path& dir, const LlamaCheckpoint& ck);

}  // namespace qlora
