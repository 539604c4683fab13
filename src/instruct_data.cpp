// Instruction data (chapter 8, "Records" and "Labels"). See instruct_data.hpp.
#include "instruct_data.hpp"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <fstream>
#include <stdexcept>

namespace qlora {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

// Errors name the file and line first, like a compiler's: FILE:LINE: what is wrong.
[[noreturn]] void bad_record(const fs::path& file, int line, const std::string& what) {
  throw std::runtime_error(file.string() + ":" + std::to_string(line) + ": " + what);
}

const std::string& string_field(const json& j, const char* key, const std::string& where, const fs::path& file,
                                int line) {
  const auto it = j.find(key);
  if (it == j.end()) bad_record(file, line, where + "has no \"" + key + "\"");
  if (!it->is_string())
    bad_record(file, line, where + "field \"" + key + "\" is " + it->type_name() + ", expected a string");
  return it->get_ref<const std::string&>();
}

Role parse_role(const std::string& s, const std::string& where, const fs::path& file, int line) {
  for (Role r : {Role::system, Role::user, Role::assistant})
    if (s == to_string(r)) return r;
  bad_record(file, line, where + "field \"role\" is \"" + s + "\", expected system, user or assistant");
}

//! [parse_record]
Conversation parse_record(const json& j, const fs::path& file, int line) {
  if (!j.is_object()) bad_record(file, line, std::string("a record is a JSON object, this is ") + j.type_name());
  const bool chat = j.contains("messages"), alpaca = j.contains("instruction");
  if (chat == alpaca)
    bad_record(file, line,
               chat ? "a record has \"messages\" or \"instruction\", not both"
                    : "a record needs \"messages\" (a conversation) or \"instruction\" and \"output\" (an Alpaca record)");
  Conversation c;
  if (alpaca) {
    c.instruction_record = true;
    c.messages.push_back({Role::user, string_field(j, "instruction", "", file, line)});
    if (j.contains("input")) c.input = string_field(j, "input", "", file, line);
    c.messages.push_back({Role::assistant, string_field(j, "output", "", file, line)});
    return c;
  }
  const json& msgs = j.at("messages");
  if (!msgs.is_array() || msgs.empty())
    bad_record(file, line, std::string("field \"messages\" is ") + (msgs.is_array() ? "empty" : msgs.type_name()) +
                               ", expected an array of {\"role\", \"content\"} objects");
  for (std::size_t i = 0; i < msgs.size(); ++i) {
    const std::string where = "message " + std::to_string(i + 1) + " ";
    if (!msgs[i].is_object()) bad_record(file, line, where + "is " + msgs[i].type_name() + ", expected an object");
    const Role role = parse_role(string_field(msgs[i], "role", where, file, line), where, file, line);
    if (role == Role::system && i > 0) bad_record(file, line, where + "is a system message: only the first may be");
    c.messages.push_back({role, string_field(msgs[i], "content", where, file, line)});
  }
  return c;
}
//! [parse_record]

}  // namespace

std::vector<InstructRecord> read_instruct_jsonl(const fs::path& file) {
  std::ifstream in(file, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read data file " + file.string());
  std::vector<InstructRecord> records;
  std::string text;
  for (int line = 1; std::getline(in, text); ++line) {
    if (!text.empty() && text.back() == '\r') text.pop_back();
    if (line == 1 && text.rfind("\xEF\xBB\xBF", 0) == 0) text.erase(0, 3);  // a UTF-8 byte-order mark
    if (text.find_first_not_of(" \t") == std::string::npos) continue;
    json j;
    try {
      j = json::parse(text);
    } catch (const json::parse_error& e) {
      bad_record(file, line, std::string("not JSON: ") + e.what());
    }
    records.push_back({parse_record(j, file, line), line});
  }
  if (records.empty()) throw std::runtime_error("data file " + file.string() + " holds no record");
  return records;
}

std::string SkippedRecords::summary(int seq_len) const {
  if (total() == 0) return "";
  std::string s = std::to_string(total()) + (total() == 1 ? " record" : " records") + " skipped:";
  std::string sep = " ";
  auto part = [&](int n, const std::string& why) {
    if (n == 0) return;
    s += sep + std::to_string(n) + " " + why;
    sep = ", ";
  };
  part(empty_answer, "with an empty answer");
  part(no_loss, "with no assistant turn");
  part(too_long, "longer than --seq-len " + std::to_string(seq_len) + " + 1 tokens");
  s += " (line";
  s += lines.size() == 1 ? " " : "s ";
  for (std::size_t i = 0; i < lines.size(); ++i) s += (i ? ", " : "") + std::to_string(lines[i]);
  return s + (static_cast<std::size_t>(total()) > lines.size() ? ", ...)" : ")");
}

//! [make_examples]
std::vector<Example> make_examples(const std::vector<InstructRecord>& records, const Tokenizer& tok,
                                   const ExampleOptions& opt, const fs::path& file, SkippedRecords& skipped) {
  std::vector<Example> out;
  auto skip = [&](int& counter, int line) {
    ++counter;
    if (skipped.lines.size() < SkippedRecords::kMaxLines) skipped.lines.push_back(line);
  };
  for (const auto& rec : records) {
    const auto& msgs = rec.conversation.messages;
    if (std::any_of(msgs.begin(), msgs.end(),
                    [](const Message& m) { return m.role == Role::assistant && python_strip(m.content).empty(); })) {
      skip(skipped.empty_answer, rec.line);
      continue;
    }
    RenderedChat r;
    try {
      r = render_chat(opt.chat_template, rec.conversation, false);
    } catch (const std::invalid_argument& e) {
      bad_record(file, rec.line, e.what());
    }
    const TokenizedChat t = tokenize_chat(r, tok);
    Example ex;
    ex.ids = t.ids;
    ex.line = rec.line;
    ex.labels.resize(t.ids.size());
    for (std::size_t i = 0; i < t.ids.size(); ++i)
      ex.labels[i] = opt.train_on_inputs || t.assistant_mask[i] ? t.ids[i] : kIgnoreIndex;
    // labels[0] is never predicted (nothing comes before it), so it cannot count.
    if (ex.ids.size() < 2 ||
        std::all_of(ex.labels.begin() + 1, ex.labels.end(), [](int l) { return l == kIgnoreIndex; })) {
      skip(skipped.no_loss, rec.line);
      continue;
    }
    if (ex.ids.size() > static_cast<std::size_t>(opt.seq_len) + 1) {
      skip(skipped.too_long, rec.line);
      continue;
    }
    out.push_back(std::move(ex));
  }
  return out;
}
//! [make_examples]

ChatTemplate default_template(const std::vector<InstructRecord>& records) {
  const bool all_alpaca = std::all_of(records.begin(), records.end(),
                                      [](const InstructRecord& r) { return r.conversation.instruction_record; });
  return all_alpaca ? ChatTemplate::alpaca : ChatTemplate::llama2;
}

}  // namespace qlora
