// Text generation with the KV-cache decoder (chapter 7, "Samples"): the prompt is fed
// token by token after BOS, then each next token is picked greedily (temperature 0)
// or sampled with temperature and top-p (nucleus) truncation from a seeded generator.
#pragma once
#include "llama_model.hpp"
#include "tokenizer.hpp"

#include <cstdint>
#include <string>
#include <vector>

namespace qlora {

struct SampleConfig {
  int max_tokens = 64;
  float temperature = 0.0f;  ///< 0: greedy (argmax)
  float top_p = 1.0f;        ///< keep the smallest set of tokens whose probability sum reaches top_p
  std::uint64_t seed = 1;
};

/// Next token from logits: argmax at temperature 0, else a top-p sample of softmax(logits/temperature).
int sample_token(const std::vector<float>& logits, float temperature, float top_p, std::mt19937_64& rng);

/// The positions generation may fill: the model's context (seq_len), or a shorter sliding window.
int context_limit(const LlamaConfig& c);
/// What the model reads of a prompt: BOS, then its tokens.
std::vector<int> prompt_ids(const Tokenizer& tok, const std::string& prompt);
/// Throws std::invalid_argument when a prompt of `prompt_tokens` (BOS included) plus
/// `max_tokens` generated ones does not fit in context_limit(c), naming --max-tokens.
void check_generation_fits(const LlamaConfig& c, int prompt_tokens, int max_tokens);

/// Prompt plus up to max_tokens generated tokens (stops at EOS/BOS or the end of the model's context: seq_len, or a shorter sliding_window), decoded.
std::string generate_text(LlamaModel& model, const Tokenizer& tok, const std::string& prompt, const SampleConfig& cfg);

}  // namespace qlora
