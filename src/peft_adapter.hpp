// PEFT adapter folders: how a trained LoRA leaves this program and opens in
// Hugging Face PEFT (`PeftModel.from_pretrained(base, folder)`) (chapter 4, "Saving
// the adapter"). A folder holds two files:
//  - adapter_model.safetensors: per adapted linear layer two tensors,
//      base_model.model.<module>.lora_A.weight  [r, in]
//      base_model.model.<module>.lora_B.weight  [out, r]
//    with <module> the layer's name in the Hugging Face LLaMA model, e.g.
//    "model.layers.0.self_attn.q_proj" or "model.layers.3.mlp.down_proj". We write
//    F32 (PEFT loads F32, F16 or BF16 and casts to the model's dtype); we read all three.
//  - adapter_config.json: PEFT's LoraConfig fields (peft_type "LORA", r, lora_alpha,
//    lora_dropout, target_modules, bias "none", task_type "CAUSAL_LM", use_rslora, ...).
// Writes are atomic (atomic_file.hpp). Reading validates everything and throws
// std::runtime_error naming the file and the key at fault.
#pragma once

#include "lora.hpp"

#include <filesystem>
#include <map>
#include <string>
#include <vector>

namespace qlora {

/// The seven linear projections of a LLaMA block, in model order.
const std::vector<std::string>& llama_linear_modules();

/// A whole adapter: one LoraAdapter per adapted layer, keyed by module name.
struct PeftAdapter {
  LoraConfig config;
  /// Short layer names PEFT matches against the end of module names, e.g. {"q_proj", "v_proj"}.
  std::vector<std::string> target_modules;
  std::string base_model_name_or_path;
  /// "model.layers.N.self_attn.q_proj" → adapter (gradients are not saved).
  std::map<std::string, LoraAdapter> modules;
};

/// "model.layers.0.self_attn.q_proj", 'A' → "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight".
std::string peft_tensor_key(const std::string& module, char which);

/// The adapter_config.json text PEFT writes for this adapter.
std::string peft_config_json(const PeftAdapter& adapter);

/// Writes dir/adapter_config.json and dir/adapter_model.safetensors (creating dir).
/// Throws std::invalid_argument if a module is not covered by target_modules or its shapes disagree with r.
void write_peft_adapter(const std::filesystem::path& dir, const PeftAdapter& adapter);

/// Reads and validates a PEFT LoRA adapter folder.
PeftAdapter read_peft_adapter(const std::filesystem::path& dir);

}  // namespace qlora
