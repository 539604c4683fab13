// Merging a trained PEFT adapter into its base model for good (chapter 7, "Merging
// and exporting"): every adapted projection becomes W' = W + s·B·A (lora_merge from
// chapter 4), and the result is written as a plain Hugging Face LLaMA folder that
// any LLaMA loader opens without PEFT (`qlora merge`).
//
// Layouts: the merge happens on our float32 weights, whose q/k rows follow Hugging
// Face's rotate-half RoPE order, like a PEFT adapter's q/k lora_B rows (and a llama2.c
// base is permuted to it when loaded), so B·A adds to W row for row and the exported
// folder needs no permutation either.
//
// Precision: the merge is exact float32 arithmetic (one rounding per weight); the
// export rounds every weight to BF16, which is what changes the logits (relative
// weight error ≤ 2⁻⁹; tests/test_ch07_merge.cpp measures both).
#pragma once

#include "llama_model.hpp"
#include "peft_adapter.hpp"

#include <filesystem>
#include <string>

namespace qlora {

/// Adds s·B·A of every module of `adapter` to the weight it adapts (of a base loaded in 4
/// bits: to its dequantized values, dropping the stored 4-bit form). Every module must name a projection of this model with matching
/// shapes; otherwise throws std::runtime_error naming `where` (the adapter folder) and the
/// module. Returns the number of projections merged.
int merge_peft_adapter(LlamaWeights& weights, const PeftAdapter& adapter, const std::string& where);

/// What merge_model did.
struct MergeSummary {
  int modules = 0;              ///< projections that received s·B·A
  bool tokenizer_copied = false;  ///< the tokenizer next to the model was copied (see merge_model)
};

/// `qlora merge`: loads the base (llama2.c .bin or Hugging Face folder), merges the PEFT
/// adapter folder into it and writes out_dir/config.json + model.safetensors in BF16
/// (write_hf_llama; each file atomically), with the base's BOS/EOS ids. The tokenizer next
/// to the base, if its vocabulary size equals the model's, is copied alongside (atomically):
/// tokenizer.model, else tokenizer.json and its tokenizer_config.json.
MergeSummary merge_model(const std::filesystem::path& model, const std::filesystem::path& adapter_dir,
                         const std::filesystem::path& out_dir);

}  // namespace qlora
