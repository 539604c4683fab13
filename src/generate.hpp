// Text generation with the KV-cache decoder (chapter 7, "Samples"; chapter 8, replies in
// a prompt template): the prompt is fed token by token, then each next token is picked
// greedily (temperature 0) or sampled with temperature and top-p (nucleus) truncation
// from a seeded generator.
#pragma once
#include "chat_template.hpp"
#include "llama_model.hpp"
#include "tokenizer.hpp"

#include <cstdint>
#include <optional>
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

/// The prompt ids followed by up to max_tokens generated ids: stops at EOS/BOS or
/// `stop_token` (not kept, as EOS is not), the end of the model's context (context_limit),
/// or once the generated text ends with `stop` (when not empty; the ids that spell it are
/// kept).
std::vector<int> generate_ids(LlamaModel& model, const Tokenizer& tok, std::vector<int> prompt_ids,
                              const SampleConfig& cfg, const std::string& stop = "",
                              std::optional<int> stop_token = std::nullopt);

/// Prompt plus up to max_tokens generated tokens (BOS first, as in training on text), decoded.
std::string generate_text(LlamaModel& model, const Tokenizer& tok, const std::string& prompt, const SampleConfig& cfg);

/// The assistant's reply to a conversation (chapter 8): the conversation rendered by the
/// template with its generation prompt, tokenized as in training, continued until EOS or
/// the template's end of turn (turn_end_text, removed from the reply; turn_end_token).
std::string generate_reply(LlamaModel& model, const Tokenizer& tok, ChatTemplate t, const Conversation& prompt,
                           const SampleConfig& cfg);

}  // namespace qlora
