// The shapes of real LLaMA-family models (chapter 7, "Scaling up"), for the random-weight
// models of `qlora bench train` and the plans of `qlora plan`. Values from each model's
// published config.json.
#pragma once

#include "llama2c.hpp"

#include <cstdint>
#include <string>
#include <vector>

namespace qlora {

/// "7b", "13b", "33b", "65b" (LLaMA-1/2 shapes, vocab 32000), "70b" (LLaMA-2, GQA 8 kv
/// heads) and "llama3-8b" (GQA, vocab 128256, θ = 500000), case-insensitive; or the path of
/// a Hugging Face config.json (any name ending in ".json"), read by read_hf_config with
/// all its checks. Throws std::invalid_argument naming the value and the known names.
LlamaConfig model_shape(const std::string& name);
std::vector<std::string> model_shape_names();

/// Parameters of the whole model: embedding, projections, norms and (when not shared) the classifier.
std::int64_t llama_parameter_count(const LlamaConfig& c);

}  // namespace qlora
