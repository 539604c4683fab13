// Prompt templates (chapter 8, "Templates"). See chat_template.hpp.
#include "chat_template.hpp"

#include <stdexcept>

namespace qlora {

std::string to_string(ChatTemplate t) {
  switch (t) {
    case ChatTemplate::llama2: return "llama2";
    case ChatTemplate::chatml: return "chatml";
    case ChatTemplate::alpaca: return "alpaca";
    case ChatTemplate::llama3: return "llama3";
  }
  return "?";
}

ChatTemplate parse_chat_template(const std::string& name) {
  for (ChatTemplate t : {ChatTemplate::llama2, ChatTemplate::chatml, ChatTemplate::alpaca, ChatTemplate::llama3})
    if (name == to_string(t)) return t;
  throw std::invalid_argument("unknown template '" + name + "' (expected llama2, chatml, alpaca or llama3)");
}

std::string to_string(Role r) {
  switch (r) {
    case Role::system: return "system";
    case Role::user: return "user";
    case Role::assistant: return "assistant";
  }
  return "?";
}

namespace {

// The code point of the UTF-8 sequence starting at s[i] and its length; an invalid
// byte counts as itself (it is not whitespace either way).
char32_t code_point_at(const std::string& s, std::size_t i, std::size_t& len) {
  const auto b = static_cast<unsigned char>(s[i]);
  len = b < 0x80 ? 1 : b >> 5 == 0x6 ? 2 : b >> 4 == 0xE ? 3 : b >> 3 == 0x1E ? 4 : 1;
  if (i + len > s.size()) len = 1;
  if (len == 1) return b;
  char32_t cp = b & (0x7F >> len);
  for (std::size_t k = 1; k < len; ++k) cp = cp << 6 | (static_cast<unsigned char>(s[i + k]) & 0x3F);
  return cp;
}

// Python's str.isspace(): the ASCII controls \t..\r and \x1c..\x1f, the space, NEL,
// no-break space and the other Unicode space separators, line and paragraph separators.
bool python_space(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20) || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

// The byte length of the UTF-8 character that ends at s[end - 1].
std::size_t last_char_length(const std::string& s, std::size_t end) {
  std::size_t start = end - 1;
  while (start > 0 && end - start < 4 && (static_cast<unsigned char>(s[start]) & 0xC0) == 0x80) --start;
  return end - start;
}

void add_text(RenderedChat& r, std::string text, bool assistant) {
  r.pieces.push_back({TemplatePiece::Kind::text, std::move(text), assistant});
}
void add_special(RenderedChat& r, TemplatePiece::Kind kind, bool assistant) {
  r.pieces.push_back({kind, {}, assistant});
}
void add_special(RenderedChat& r, std::string token, bool assistant) {
  r.pieces.push_back({TemplatePiece::Kind::special, std::move(token), assistant});
}

// A user turn's text in the chat templates: an instruction record's input follows its
// instruction after a blank line.
std::string user_text(const Conversation& c, const Message& m) {
  return c.instruction_record && !c.input.empty() ? m.content + "\n\n" + c.input : m.content;
}

//! [llama2]
// Meta's template: the system message (first, if any) goes inside the first [INST];
// user and assistant alternate from a user turn (the template raises otherwise).
RenderedChat render_llama2(const Conversation& c) {
  const auto& msgs = c.messages;
  const bool has_system = !msgs.empty() && msgs[0].role == Role::system;
  const std::size_t first = has_system ? 1 : 0;
  if (msgs.size() == first) throw std::invalid_argument("template llama2: no user message");
  RenderedChat r;
  for (std::size_t i = first; i < msgs.size(); ++i) {
    const Message& m = msgs[i];
    const Role expected = (i - first) % 2 == 0 ? Role::user : Role::assistant;
    if (m.role != expected)
      throw std::invalid_argument("template llama2: message " + std::to_string(i + 1) + " is " + to_string(m.role) +
                                  ", expected " + to_string(expected) +
                                  " (one system message first, then user and assistant alternating)");
    if (m.role == Role::user) {
      std::string content = user_text(c, m);
      if (i == first && has_system) content = "<<SYS>>\n" + msgs[0].content + "\n<</SYS>>\n\n" + content;
      add_special(r, TemplatePiece::Kind::bos, false);
      add_text(r, "[INST] " + python_strip(content) + " [/INST]", false);
    } else {
      // append: GCC 12's -Wrestrict misfires on " " + s.
      add_text(r, std::string(" ").append(python_strip(m.content)).append(" "), true);
      add_special(r, TemplatePiece::Kind::eos, true);
    }
  }
  return r;
}
//! [llama2]

//! [chatml]
RenderedChat render_chatml(const Conversation& c, bool add_generation_prompt) {
  RenderedChat r;
  for (const Message& m : c.messages) {
    const bool assistant = m.role == Role::assistant;
    add_text(r, "<|im_start|>" + to_string(m.role) + "\n", false);
    add_text(r, (m.role == Role::user ? user_text(c, m) : m.content) + "<|im_end|>", assistant);
    add_text(r, "\n", false);
  }
  if (add_generation_prompt) add_text(r, "<|im_start|>assistant\n", false);
  return r;
}
//! [chatml]

//! [alpaca]
// Stanford Alpaca's PROMPT_DICT; the output follows "### Response:" directly.
constexpr const char* kAlpacaWithInput =
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:";
constexpr const char* kAlpacaNoInput =
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:";

// The prompt with its {instruction} and {input} fields filled in one pass, as Python's
// str.format_map does (a brace in the values is not a field).
std::string alpaca_source(const std::string& instruction, const std::string& input) {
  const std::string tmpl = input.empty() ? kAlpacaNoInput : kAlpacaWithInput;
  std::string out;
  for (std::size_t i = 0; i < tmpl.size();) {
    if (tmpl.compare(i, 13, "{instruction}") == 0) {
      out += instruction;
      i += 13;
    } else if (tmpl.compare(i, 7, "{input}") == 0) {
      out += input;
      i += 7;
    } else {
      out += tmpl[i++];
    }
  }
  return out;
}

RenderedChat render_alpaca(const Conversation& c, bool add_generation_prompt) {
  const auto& msgs = c.messages;
  const std::size_t n = add_generation_prompt ? 1 : 2;
  if (msgs.size() != n || msgs[0].role != Role::user || (n == 2 && msgs[1].role != Role::assistant))
    throw std::invalid_argument(std::string("template alpaca takes one instruction (a user message") +
                                (add_generation_prompt ? ")" : ") and its output (an assistant message)") +
                                ", no system message and no further turns");
  RenderedChat r;
  r.straddler_is_assistant = false;
  add_special(r, TemplatePiece::Kind::bos, false);
  add_text(r, alpaca_source(msgs[0].content, c.input), false);
  if (!add_generation_prompt) {
    add_text(r, msgs[1].content, true);
    add_special(r, TemplatePiece::Kind::eos, true);
  }
  return r;
}
//! [alpaca]

//! [llama3]
// Meta's template: a header per message, the content stripped (Jinja's trim is Python's
// strip), <|eot_id|> after it; the assistant's content and its <|eot_id|> are the answer.
// The template's bos_token before the first message is <|begin_of_text|> in LLaMA-3's
// vocabulary. Roles come in any order: the template checks none.
RenderedChat render_llama3(const Conversation& c, bool add_generation_prompt) {
  RenderedChat r;
  auto header = [&](Role role) {
    add_special(r, "<|start_header_id|>", false);
    add_text(r, to_string(role), false);
    add_special(r, "<|end_header_id|>", false);
    add_text(r, "\n\n", false);
  };
  for (const Message& m : c.messages) {
    if (&m == &c.messages.front()) add_special(r, "<|begin_of_text|>", false);
    header(m.role);
    const bool assistant = m.role == Role::assistant;
    add_text(r, python_strip(m.role == Role::user ? user_text(c, m) : m.content), assistant);
    add_special(r, "<|eot_id|>", assistant);
  }
  if (add_generation_prompt) header(Role::assistant);
  return r;
}
//! [llama3]

// Token ids and mask of one run of text: encoded at once, each token placed in the run
// by the text decode_piece gives it (the first token after BOS: its dummy-prefix space
// dropped, as at the start of any encoding).
void tokenize_run(const std::string& run, const std::vector<std::pair<std::size_t, bool>>& owner_starts,
                  bool straddler_is_assistant, const Tokenizer& tok, TokenizedChat& out) {
  // owner_starts: (byte offset where a piece begins, whether it is the assistant's), ascending.
  auto assistant_at = [&](std::size_t byte) {
    bool a = false;
    for (const auto& [start, is_assistant] : owner_starts)
      if (start <= byte) a = is_assistant;
    return a;
  };
  const std::vector<int> ids = tok.encode(run);
  std::size_t pos = 0;
  int prev = tok.bos_id();
  for (int id : ids) {
    const std::string piece = tok.decode_piece(prev, id);
    if (run.compare(pos, piece.size(), piece) != 0)
      throw std::runtime_error("the tokenizer does not spell \"" + run + "\" back piece by piece (token " +
                               std::to_string(id) + " at byte " + std::to_string(pos) +
                               "), so the assistant's tokens cannot be placed");
    const std::size_t end = pos + piece.size();
    bool assistant = assistant_at(pos);
    if (straddler_is_assistant)
      for (std::size_t b = pos; b < end && !assistant; ++b) assistant = assistant_at(b);
    out.ids.push_back(id);
    out.assistant_mask.push_back(assistant ? 1 : 0);
    pos = end;
    prev = id;
  }
  if (pos != run.size())
    throw std::runtime_error("the tokenizer's pieces spell " + std::to_string(pos) + " of the " +
                             std::to_string(run.size()) + " bytes of \"" + run + "\"");
}

}  // namespace

std::string python_strip(const std::string& s) {
  std::size_t begin = 0, end = s.size(), len = 0;
  while (begin < end && python_space(code_point_at(s, begin, len))) begin += len;
  while (end > begin) {
    const std::size_t n = last_char_length(s, end);
    if (!python_space(code_point_at(s, end - n, len)) || len != n) break;
    end -= n;
  }
  return s.substr(begin, end - begin);
}

RenderedChat render_chat(ChatTemplate t, const Conversation& c, bool add_generation_prompt) {
  RenderedChat r;
  switch (t) {
    case ChatTemplate::llama2: r = render_llama2(c); break;
    case ChatTemplate::chatml: r = render_chatml(c, add_generation_prompt); break;
    case ChatTemplate::alpaca: r = render_alpaca(c, add_generation_prompt); break;
    case ChatTemplate::llama3: r = render_llama3(c, add_generation_prompt); break;
  }
  r.chat_template = t;
  return r;
}

int template_token_id(ChatTemplate t, const std::string& token, const Tokenizer& tok) {
  if (const auto id = tok.special_token_id(token)) return *id;
  throw std::invalid_argument("template " + to_string(t) + " needs the special token " + token + ", which " +
                              tok.describe() + " does not have (as text it would be other tokens): use the " +
                              "model's LLaMA-3 tokenizer.json, or another template");
}

std::string turn_end_text(ChatTemplate t) { return t == ChatTemplate::chatml ? "<|im_end|>" : ""; }

std::string turn_end_token(ChatTemplate t) { return t == ChatTemplate::llama3 ? "<|eot_id|>" : ""; }

Conversation prompt_part(const Conversation& c) {
  Conversation p = c;
  if (!p.messages.empty() && p.messages.back().role == Role::assistant) p.messages.pop_back();
  return p;
}

std::string rendered_text(const RenderedChat& r) {
  std::string s;
  for (const auto& p : r.pieces)
    s += p.kind == TemplatePiece::Kind::bos ? "<s>" : p.kind == TemplatePiece::Kind::eos ? "</s>" : p.text;
  return s;
}

//! [tokenize_chat]
TokenizedChat tokenize_chat(const RenderedChat& r, const Tokenizer& tok) {
  TokenizedChat out;
  std::string run;
  std::vector<std::pair<std::size_t, bool>> owners;
  auto flush = [&] {
    if (!run.empty()) tokenize_run(run, owners, r.straddler_is_assistant, tok, out);
    run.clear();
    owners.clear();
  };
  for (const auto& p : r.pieces) {
    if (p.kind == TemplatePiece::Kind::text) {
      owners.emplace_back(run.size(), p.assistant);
      run += p.text;
      continue;
    }
    flush();
    out.ids.push_back(p.kind == TemplatePiece::Kind::bos   ? tok.bos_id()
                      : p.kind == TemplatePiece::Kind::eos ? tok.eos_id()
                                                           : template_token_id(r.chat_template, p.text, tok));
    out.assistant_mask.push_back(p.assistant ? 1 : 0);
  }
  flush();
  return out;
}
//! [tokenize_chat]

}  // namespace qlora
