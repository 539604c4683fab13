// bitsandbytes' 4-bit settings of a Hugging Face folder (chapter 7, "Folders saved in
// 4 bits"): the "quantization_config" object that transformers writes into config.json
// when a model loaded with BitsAndBytesConfig(load_in_4bit=True, ...) is saved, e.g.
//   "quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": true,
//     "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": true,
//     "bnb_4bit_quant_storage": "uint8", "bnb_4bit_compute_dtype": "bfloat16", ...}
// The tensors themselves carry the authoritative quant state (chapter 3's format,
// quant4_file.hpp); this config says what every quantized projection must agree with.
// bnb_4bit_compute_dtype is the dtype bitsandbytes multiplies in; it does not change
// the stored bytes, so it is not read (our CPU multiplies in float32, the GPU in BF16).
#pragma once

#include "quant4.hpp"

#include <filesystem>
#include <optional>
#include <string>

namespace qlora {

/// What a folder's quantization_config declares for its 4-bit linear weights.
struct Bnb4bitConfig {
  QuantType type = QuantType::fp4;  ///< transformers' default bnb_4bit_quant_type is "fp4"
  bool double_quant = false;
};

/// "nf4 with double quantization", "fp4", ... for error messages.
std::string describe_4bit(QuantType type, bool double_quant);

/// The "quantization_config" of config.json, or nullopt when there is none. Throws
/// std::runtime_error naming the file and the field for a config this reader cannot honour:
/// another quant_method, 8-bit (LLM.int8), not load_in_4bit, a bnb_4bit_quant_storage
/// other than uint8 (the packed codes would not be U8), an unknown quant type.
std::optional<Bnb4bitConfig> read_bnb_4bit_config(const std::filesystem::path& config_json);

/// Throws std::runtime_error prefixed with `where` (the tensor) unless q is stored as cfg declares.
void check_against_config(const Bnb4bitConfig& cfg, const Quant4Tensor& q, const std::string& where);

}  // namespace qlora
