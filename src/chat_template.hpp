// Prompt templates (chapter 8, "Templates"): how a conversation becomes one token
// sequence, and which of its tokens are the assistant's. Four are built in, each
// reproducing token for token what transformers' apply_chat_template gives with the
// template as published (tests/test_ch08_templates.cpp against
// tools/make_template_fixtures.py):
//  - llama2: Meta's Llama-2-chat template. BOS "[INST] user [/INST]" per user turn,
//    " answer " EOS per assistant turn, the system prompt inside the first [INST]
//    between <<SYS>> markers; contents stripped of surrounding whitespace.
//  - chatml: "<|im_start|>role\ncontent<|im_end|>\n" per message, no BOS or EOS. The
//    markers are plain text: a vocabulary without them (LLaMA-2's) needs no new
//    embedding rows, which LoRA would not train.
//  - alpaca: Stanford Alpaca's prompt ("Below is an instruction ... ### Response:") with
//    or without an input, then the output and EOS, BOS first.
//  - llama3: Meta's Llama-3-Instruct template. <|begin_of_text|> once, then per message
//    <|start_header_id|>role<|end_header_id|>, a blank line, the stripped content and
//    <|eot_id|>. The markers are LLaMA-3's special tokens, encoded as their ids; a
//    tokenizer without them is refused.
// Text between two special tokens is encoded in one call, so a SentencePiece tokenizer
// puts its dummy-prefix space before each run (transformers' legacy LLaMA tokenizer,
// and Meta's own one-encode-per-turn code).
#pragma once
#include "tokenizer.hpp"

#include <cstdint>
#include <string>
#include <vector>

namespace qlora {

enum class ChatTemplate { llama2, chatml, alpaca, llama3 };
/// "llama2", "chatml", "alpaca", "llama3".
std::string to_string(ChatTemplate t);
/// Inverse of to_string; throws std::invalid_argument naming the value and the choices.
ChatTemplate parse_chat_template(const std::string& name);

enum class Role { system, user, assistant };
/// "system", "user", "assistant".
std::string to_string(Role r);

struct Message {
  Role role;
  std::string content;
};

/// What a template renders: a conversation, or an Alpaca instruction record, which is the
/// conversation [user: instruction, assistant: output] with its `input` kept apart (the
/// alpaca template has a place for it; the chat templates append it to the instruction
/// after a blank line).
struct Conversation {
  std::vector<Message> messages;
  bool instruction_record = false;
  std::string input;  ///< Alpaca's optional input (instruction records only)
};

/// One piece of a rendering: text, the BOS or EOS token, or another special token (its
/// text is the token, e.g. "<|eot_id|>"); assistant marks what the assistant says (the
/// response tokens that carry the loss).
struct TemplatePiece {
  enum class Kind { text, bos, eos, special };
  Kind kind = Kind::text;
  std::string text;
  bool assistant = false;
};

struct RenderedChat {
  std::vector<TemplatePiece> pieces;
  /// A token that spans the end of the prompt and the start of the answer: the
  /// assistant's (transformers' {% generation %} mask takes every token the answer
  /// touches), or the prompt's (Stanford Alpaca counts the prompt's own tokens).
  bool straddler_is_assistant = true;
  ChatTemplate chat_template = ChatTemplate::llama2;  ///< the template that rendered it, for messages
};

/// Renders a conversation as the template does. add_generation_prompt appends what
/// opens the assistant's turn (chatml: "<|im_start|>assistant\n"; llama3: the assistant's
/// header; llama2's "[/INST]" already does; alpaca: the prompt without output). Throws
/// std::invalid_argument when the template cannot render it: llama2 takes one system
/// message, first, then user and assistant alternating from a user turn; alpaca takes one
/// user turn (and its answer unless add_generation_prompt), no system message; llama3
/// renders the roles in any order, as Meta's template does.
RenderedChat render_chat(ChatTemplate t, const Conversation& c, bool add_generation_prompt);

/// The rendering as one string with BOS and EOS spelled <s> and </s>, other special tokens
/// by their text: what apply_chat_template(..., tokenize=False) returns for the LLaMA-2
/// tokenizer (llama2, chatml, alpaca) or a LLaMA-3 one (llama3).
std::string rendered_text(const RenderedChat& r);

struct TokenizedChat {
  std::vector<int> ids;
  std::vector<std::uint8_t> assistant_mask;  ///< 1 where ids[i] is the assistant's
};

/// Token ids and the assistant mask of a rendering. Each run of text between special
/// tokens is encoded at once; where its tokens lie in the text is read back through
/// Tokenizer::decode_piece. Throws std::runtime_error when the tokenizer's pieces do not
/// spell the text back (a normalizing tokenizer), since then no token can be placed, and
/// template_token_id's error when a special token is missing.
TokenizedChat tokenize_chat(const RenderedChat& r, const Tokenizer& tok);

/// The id of `token`, a special token that template `t` writes (llama3's "<|eot_id|>").
/// Throws std::invalid_argument naming the template, the token and the tokenizer when the
/// tokenizer has no such special token (LLaMA-2's): written as text it would be other
/// tokens, a sequence the model was never trained on.
int template_token_id(ChatTemplate t, const std::string& token, const Tokenizer& tok);

/// Text that ends the assistant's turn besides EOS: "<|im_end|>" for chatml (a plain-text
/// marker here), none for the other templates.
std::string turn_end_text(ChatTemplate t);

/// The special token that ends the assistant's turn besides EOS: "<|eot_id|>" for llama3
/// (LLaMA-3 base models' EOS is <|end_of_text|>), none for the other templates.
std::string turn_end_token(ChatTemplate t);

/// The conversation without its final assistant message (if it ends with one): what a
/// model is asked to continue when its answer is compared with the reference.
Conversation prompt_part(const Conversation& c);

/// Python's str.strip(): the text without leading and trailing Unicode whitespace (what
/// the llama2 template's content.strip() does).
std::string python_strip(const std::string& s);

}  // namespace qlora
