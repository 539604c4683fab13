// Chapter 8, templates: llama2, chatml and alpaca against transformers' apply_chat_template
// (and Stanford Alpaca's prompt) token for token, with the LLaMA-2 tokenizer, and llama3
// with the byte-level BPE fixture tokenizer (LLaMA-3's special tokens) (tests/fixtures/templates,
// written by tools/make_template_fixtures.py); then what the fixtures cannot show: the
// structure each template refuses, llama3's special tokens as ids and its refusal of a
// tokenizer without them, Python's strip, and where a token that straddles the prompt and
// the answer goes, on a made-up tokenizer.
#include "bpe_tokenizer.hpp"
#include "chat_template.hpp"
#include "file_helpers.hpp"
#include "instruct_helpers.hpp"
#include "tokenizer.hpp"

#include <nlohmann/json.hpp>

#include <catch2/catch.hpp>

#include <algorithm>
#include <fstream>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

using namespace qlora;
using qlora::test::PieceTokenizer;
namespace fs = std::filesystem;

namespace {

const char* kFixtureHelp = "fixtures: run python3 tools/make_template_fixtures.py --out tests/fixtures/templates where "
                           "transformers, tokenizers, sentencepiece and protobuf are installed (it writes "
                           "templates.json and templates-llama3.json)";

nlohmann::json read_fixture(const fs::path& file) {
  INFO(kFixtureHelp);
  REQUIRE(fs::exists(file));
  std::ifstream in(file);
  return nlohmann::json::parse(in);
}

// The byte-level BPE fixture of chapter 7: LLaMA-3's pre-tokenizer and special tokens.
const ByteLevelBpeTokenizer& llama3_tok() {
  static const ByteLevelBpeTokenizer tok(fs::path(QLORA_FIXTURES_DIR) / "bpe" / "tokenizer.json");
  return tok;
}

// A fixture case's input as the C++ side reads it: a conversation, or an Alpaca record.
Conversation conversation_of(const nlohmann::json& c) {
  Conversation conv;
  if (c.contains("messages")) {
    for (const auto& m : c.at("messages")) {
      const std::string role = m.at("role");
      const Role r = role == "system" ? Role::system : role == "user" ? Role::user : Role::assistant;
      conv.messages.push_back({r, m.at("content").get<std::string>()});
    }
    return conv;
  }
  const auto& rec = c.at("record");
  conv.instruction_record = true;
  conv.input = rec.value("input", "");
  conv.messages.push_back({Role::user, rec.at("instruction").get<std::string>()});
  if (rec.contains("output")) conv.messages.push_back({Role::assistant, rec.at("output").get<std::string>()});
  return conv;
}

// The fixture script's cross-check: one SentencePiece encode per run of text between the
// BOS and EOS markers, the markers as their ids.
std::vector<int> sentencepiece_runs(const Tokenizer& tok, const std::string& text) {
  std::vector<int> out;
  std::string run;
  auto flush = [&] {
    if (run.empty()) return;
    const auto ids = tok.encode(run);
    out.insert(out.end(), ids.begin(), ids.end());
    run.clear();
  };
  for (std::size_t i = 0; i < text.size();) {
    if (text.compare(i, 3, "<s>") == 0) {
      flush();
      out.push_back(tok.bos_id());
      i += 3;
    } else if (text.compare(i, 4, "</s>") == 0) {
      flush();
      out.push_back(tok.eos_id());
      i += 4;
    } else {
      run += text[i++];
    }
  }
  flush();
  return out;
}

}  // namespace

TEST_CASE("Templates: our ids and assistant masks are transformers' for every case", "[ch08][templates][fixtures]") {
  const auto fixture = read_fixture(fs::path(QLORA_FIXTURES_DIR) / "templates" / "templates.json");
  const auto tok_path = test::model_or_fail(fixture.at("tokenizer_file").get<std::string>());
  if (!tok_path) return;
  SentencePieceTokenizer tok(*tok_path);
  REQUIRE(fixture.at("bos_id").get<int>() == tok.bos_id());
  REQUIRE(fixture.at("eos_id").get<int>() == tok.eos_id());
  std::map<std::string, int> per_template;
  int departs = 0;
  for (const auto& c : fixture.at("cases")) {
    const std::string name = c.at("template").get<std::string>() + "/" + c.at("name").get<std::string>();
    INFO(name);
    const ChatTemplate t = parse_chat_template(c.at("template"));
    const RenderedChat r = render_chat(t, conversation_of(c), c.at("add_generation_prompt").get<bool>());
    CHECK(rendered_text(r) == c.at("rendered").get<std::string>());
    const TokenizedChat got = tokenize_chat(r, tok);
    const auto mask = c.at("assistant_mask").get<std::vector<int>>();
    // The fixture script compares transformers with the sentencepiece library run directly
    // on the same text. Where they agree, our ids and mask are theirs. Where transformers
    // departs from SentencePiece (a message that starts with two spaces: its legacy
    // LlamaTokenizer keeps "▁▁"), our ids are SentencePiece's, run the same way here.
    if (c.at("sentencepiece_agrees").get<bool>()) {
      CHECK(got.ids == c.at("ids").get<std::vector<int>>());
      CHECK(std::vector<int>(got.assistant_mask.begin(), got.assistant_mask.end()) == mask);
    } else {
      ++departs;
      CHECK(got.ids == sentencepiece_runs(tok, c.at("rendered").get<std::string>()));
    }
    ++per_template[c.at("template").get<std::string>()];
  }
  // Every template is covered by several conversations; transformers departs from
  // SentencePiece in the two cases built to show it.
  for (const char* t : {"llama2", "chatml", "alpaca"}) CHECK(per_template[t] >= 5);
  CHECK(departs == 2);
}

TEST_CASE("Templates: llama3's ids and assistant masks are transformers' for every case",
          "[ch08][templates][fixtures]") {
  const auto fixture = read_fixture(fs::path(QLORA_FIXTURES_DIR) / "templates" / "templates-llama3.json");
  const ByteLevelBpeTokenizer& tok = llama3_tok();
  REQUIRE(fixture.at("tokenizer_file").get<std::string>() == "bpe/tokenizer.json");
  REQUIRE(fixture.at("bos_id").get<int>() == tok.bos_id());
  for (const auto& special : fixture.at("special_ids").items())
    CHECK(tok.special_token_id(special.key()) == special.value().get<int>());
  int cases = 0;
  for (const auto& c : fixture.at("cases")) {
    INFO("llama3/" << c.at("name").get<std::string>());
    REQUIRE(c.at("template").get<std::string>() == "llama3");
    const RenderedChat r =
        render_chat(ChatTemplate::llama3, conversation_of(c), c.at("add_generation_prompt").get<bool>());
    CHECK(rendered_text(r) == c.at("rendered").get<std::string>());
    const TokenizedChat got = tokenize_chat(r, tok);
    CHECK(got.ids == c.at("ids").get<std::vector<int>>());
    CHECK(std::vector<int>(got.assistant_mask.begin(), got.assistant_mask.end()) ==
          c.at("assistant_mask").get<std::vector<int>>());
    ++cases;
  }
  CHECK(cases >= 10);
}

TEST_CASE("Templates: the published structure, and refusals naming what is wrong", "[ch08][templates]") {
  const Conversation chat{{{Role::system, "Be brief."},
                           {Role::user, " hi "},
                           {Role::assistant, " hello "},
                           {Role::user, "bye"},
                           {Role::assistant, "see you"}},
                          false,
                          ""};
  CHECK(rendered_text(render_chat(ChatTemplate::llama2, chat, false)) ==
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n hi [/INST] hello </s><s>[INST] bye [/INST] see you </s>");
  CHECK(rendered_text(render_chat(ChatTemplate::chatml, chat, true)) ==
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n hi <|im_end|>\n<|im_start|>assistant\n hello "
        "<|im_end|>\n<|im_start|>user\nbye<|im_end|>\n<|im_start|>assistant\nsee you<|im_end|>\n"
        "<|im_start|>assistant\n");
  // An instruction record: alpaca keeps the input apart, the chat templates append it.
  const Conversation rec{{{Role::user, "Define {input}."}, {Role::assistant, "a word"}}, true, "lexeme"};
  CHECK(rendered_text(render_chat(ChatTemplate::alpaca, rec, false)) ==
        "<s>Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nDefine {input}.\n\n"
        "### Input:\nlexeme\n\n### Response:a word</s>");
  CHECK(rendered_text(render_chat(ChatTemplate::llama2, rec, false)) ==
        "<s>[INST] Define {input}.\n\nlexeme [/INST] a word </s>");

  auto refused = [](ChatTemplate t, const Conversation& c, bool gen, const std::string& fragment) {
    INFO(to_string(t) << ": expected an error containing \"" << fragment << "\"");
    CHECK_THROWS_WITH(render_chat(t, c, gen), Catch::Contains(fragment));
  };
  const Conversation two_users{{{Role::user, "a"}, {Role::user, "b"}}, false, ""};
  refused(ChatTemplate::llama2, two_users, false, "message 2 is user, expected assistant");
  const Conversation late_system{{{Role::user, "a"}, {Role::assistant, "b"}, {Role::system, "c"}}, false, ""};
  refused(ChatTemplate::llama2, late_system, false, "message 3 is system, expected user");
  refused(ChatTemplate::llama2, Conversation{{{Role::system, "s"}}, false, ""}, false, "no user message");
  refused(ChatTemplate::alpaca, chat, false, "template alpaca takes one instruction");
  refused(ChatTemplate::alpaca, Conversation{{{Role::user, "q"}}, true, ""}, false, "and its output");
  CHECK_THROWS_WITH(parse_chat_template("vicuna"), Catch::Contains("unknown template 'vicuna'"));
  CHECK(turn_end_text(ChatTemplate::chatml) == "<|im_end|>");
  CHECK(turn_end_text(ChatTemplate::llama2).empty());
  CHECK(prompt_part(chat).messages.size() == 4);
}

TEST_CASE("Templates: llama3 renders Meta's published Llama-3-Instruct format", "[ch08][templates]") {
  // Spelled out from the Jinja: bos_token once, then per message '<|start_header_id|>' + role +
  // '<|end_header_id|>\n\n' + content | trim + '<|eot_id|>', then the assistant's header.
  const Conversation chat{{{Role::system, "Be brief.\n"},
                           {Role::user, " hi "},
                           {Role::assistant, " hello "},
                           {Role::user, "bye"},
                           {Role::assistant, "see you"}},
                          false,
                          ""};
  CHECK(rendered_text(render_chat(ChatTemplate::llama3, chat, true)) ==
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nhello<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nbye<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nsee you<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n");
  // An instruction record: the input after the instruction, as in the other chat templates.
  const Conversation rec{{{Role::user, "Define {input}."}, {Role::assistant, "a word"}}, true, "lexeme"};
  CHECK(rendered_text(render_chat(ChatTemplate::llama3, rec, false)) ==
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nDefine {input}.\n\nlexeme<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\na word<|eot_id|>");
  // The template checks no turn order, so neither do we.
  const Conversation two_users{{{Role::user, "a"}, {Role::user, "b"}}, false, ""};
  CHECK(rendered_text(render_chat(ChatTemplate::llama3, two_users, false)) ==
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\na<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nb<|eot_id|>");
  CHECK(parse_chat_template("llama3") == ChatTemplate::llama3);
  CHECK(to_string(ChatTemplate::llama3) == "llama3");
  CHECK(turn_end_token(ChatTemplate::llama3) == "<|eot_id|>");
  CHECK(turn_end_text(ChatTemplate::llama3).empty());
  CHECK(turn_end_token(ChatTemplate::chatml).empty());
}

TEST_CASE("Templates: llama3's markers are special-token ids, and the answer is its content and <|eot_id|>",
          "[ch08][templates]") {
  const ByteLevelBpeTokenizer& tok = llama3_tok();
  const Conversation chat{{{Role::system, "  Réponds brièvement.\u3000"},
                           {Role::user, "\u00a0Que veut dire « naïf » ? 日本語 🙂\n"},
                           {Role::assistant, "\u2003 Qui manque d'expérience;\n\ncandide. ✓ \t"},
                           {Role::user, "And 12345?"},
                           {Role::assistant, " \t\n"}},
                          false,
                          ""};
  const RenderedChat r = render_chat(ChatTemplate::llama3, chat, false);
  const TokenizedChat t = tokenize_chat(r, tok);
  // transformers tokenizes the rendered string at once, its special tokens matched as such.
  CHECK(t.ids == tok.encode(rendered_text(r)));
  const int eot = template_token_id(ChatTemplate::llama3, "<|eot_id|>", tok);
  CHECK(eot == *tok.special_token_id("<|eot_id|>"));
  CHECK(t.ids.front() == *tok.special_token_id("<|begin_of_text|>"));
  CHECK(std::count(t.ids.begin(), t.ids.end(), *tok.special_token_id("<|begin_of_text|>")) == 1);
  CHECK(std::count(t.ids.begin(), t.ids.end(), *tok.special_token_id("<|start_header_id|>")) == 5);
  CHECK(std::count(t.ids.begin(), t.ids.end(), eot) == 5);
  // Each run of assistant tokens is one answer's stripped content and its <|eot_id|>; a
  // blank answer is its <|eot_id|> alone.
  std::vector<std::vector<int>> runs;
  for (std::size_t i = 0; i < t.ids.size(); ++i) {
    if (!t.assistant_mask[i]) continue;
    if (i == 0 || !t.assistant_mask[i - 1]) runs.emplace_back();
    runs.back().push_back(t.ids[i]);
  }
  std::vector<std::vector<int>> answers;
  for (const Message& m : chat.messages)
    if (m.role == Role::assistant) {
      answers.push_back(tok.encode(python_strip(m.content)));
      answers.back().push_back(eot);
    }
  CHECK(runs == answers);
  CHECK(answers.front().size() > 5);
  CHECK(answers.back() == std::vector<int>{eot});
  // The generation prompt is the assistant's header, none of it the answer.
  const Conversation question{{{Role::user, "Why?"}}, false, ""};
  const TokenizedChat asked = tokenize_chat(render_chat(ChatTemplate::llama3, question, true), tok);
  std::vector<int> tail{*tok.special_token_id("<|start_header_id|>")};
  for (int id : tok.encode("assistant")) tail.push_back(id);
  tail.push_back(*tok.special_token_id("<|end_header_id|>"));
  for (int id : tok.encode("\n\n")) tail.push_back(id);
  REQUIRE(asked.ids.size() > tail.size());
  CHECK(std::vector<int>(asked.ids.end() - static_cast<std::ptrdiff_t>(tail.size()), asked.ids.end()) == tail);
  CHECK(std::count(asked.assistant_mask.begin(), asked.assistant_mask.end(), 1) == 0);
}

TEST_CASE("Templates: llama3 refuses a tokenizer without LLaMA-3's special tokens, naming both", "[ch08][templates]") {
  const auto model = test::model_or_fail("tokenizer.model");
  if (!model) return;
  const SentencePieceTokenizer sp(*model);
  const Conversation chat{{{Role::user, "hi"}, {Role::assistant, "hello"}}, false, ""};
  CHECK_THROWS_WITH(tokenize_chat(render_chat(ChatTemplate::llama3, chat, false), sp),
                    Catch::Contains("template llama3 needs the special token <|begin_of_text|>") &&
                        Catch::Contains("SentencePiece model '" + model->string() + "'"));
  CHECK_THROWS_WITH(template_token_id(ChatTemplate::llama3, "<|eot_id|>", sp),
                    Catch::Contains("<|eot_id|>") && Catch::Contains("tokenizer.json"));
  // The made-up tokenizer has <s> and </s> only.
  const PieceTokenizer pieces({"hi"});
  CHECK_THROWS_WITH(tokenize_chat(render_chat(ChatTemplate::llama3, chat, false), pieces),
                    Catch::Contains("template llama3") && Catch::Contains(pieces.describe()));
}

TEST_CASE("python_strip strips what Python's str.strip() strips", "[ch08][templates]") {
  CHECK(python_strip("  a b \t\n") == "a b");
  // NBSP, ideographic space, line separator and the ASCII separators \x1c-\x1f are whitespace to Python.
  CHECK(python_strip("\xC2\xA0\xE3\x80\x80x\xE2\x80\xA8\x1f") == "x");
  // Zero-width space (U+200B) is not, nor are letters that share bytes with spaces.
  CHECK(python_strip("\xE2\x80\x8Bx") == "\xE2\x80\x8Bx");
  CHECK(python_strip(" caf\xC3\xA9 ") == "caf\xC3\xA9");
  CHECK(python_strip(" \t ").empty());
}

TEST_CASE("A token across the prompt/answer boundary: the answer's in chat templates, the prompt's in alpaca",
          "[ch08][templates]") {
  // ":f" spans the end of "### Response:" and the start of "forsake".
  const PieceTokenizer tok({":f", "orsake"});
  const Conversation rec{{{Role::user, "q"}, {Role::assistant, "forsake"}}, true, ""};
  const TokenizedChat alpaca = tokenize_chat(render_chat(ChatTemplate::alpaca, rec, false), tok);
  const auto colon_f = std::find(alpaca.ids.begin(), alpaca.ids.end(), 3) - alpaca.ids.begin();
  REQUIRE(colon_f < static_cast<std::ptrdiff_t>(alpaca.ids.size()));
  CHECK(alpaca.assistant_mask[static_cast<std::size_t>(colon_f)] == 0);      // as Stanford Alpaca counts it
  CHECK(alpaca.assistant_mask[static_cast<std::size_t>(colon_f) + 1] == 1);  // "orsake"
  CHECK(alpaca.assistant_mask.back() == 1);                                  // EOS
  CHECK(alpaca.ids.front() == tok.bos_id());

  RenderedChat same = render_chat(ChatTemplate::alpaca, rec, false);
  same.straddler_is_assistant = true;  // transformers' {% generation %} rule
  CHECK(tokenize_chat(same, tok).assistant_mask[static_cast<std::size_t>(colon_f)] == 1);

  // A tokenizer whose pieces do not spell the text back cannot place the answer's tokens.
  const PieceTokenizer lower({"ok"}, true);
  const Conversation upper{{{Role::user, "Why?"}, {Role::assistant, "OK"}}, false, ""};
  CHECK_THROWS_WITH(tokenize_chat(render_chat(ChatTemplate::chatml, upper, false), lower),
                    Catch::Contains("does not spell"));
}
