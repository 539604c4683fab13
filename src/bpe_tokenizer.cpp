// Byte-level BPE from tokenizer.json (chapter 7, "Byte-level BPE"). See bpe_tokenizer.hpp.
#include "bpe_tokenizer.hpp"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <fstream>
#include <limits>
#include <stdexcept>

namespace qlora {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

// GPT-2's pre-tokenizer pattern: what ByteLevel with use_regex=true splits by.
constexpr const char* kGpt2Pattern = R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

// ---------------------------------------------------------------------------
// UTF-8

std::string utf8(char32_t c) {
  std::string s;
  if (c < 0x80) {
    s += static_cast<char>(c);
  } else if (c < 0x800) {
    s += static_cast<char>(0xC0 | (c >> 6));
    s += static_cast<char>(0x80 | (c & 0x3F));
  } else if (c < 0x10000) {
    s += static_cast<char>(0xE0 | (c >> 12));
    s += static_cast<char>(0x80 | ((c >> 6) & 0x3F));
    s += static_cast<char>(0x80 | (c & 0x3F));
  } else {
    s += static_cast<char>(0xF0 | (c >> 18));
    s += static_cast<char>(0x80 | ((c >> 12) & 0x3F));
    s += static_cast<char>(0x80 | ((c >> 6) & 0x3F));
    s += static_cast<char>(0x80 | (c & 0x3F));
  }
  return s;
}

// The UTF-8 character at s[i]: its length and whether it is valid. An invalid one's
// length is that of its "maximal subpart" (the longest start of a valid sequence, at
// least 1 byte), which Rust's from_utf8_lossy replaces by one U+FFFD.
struct Utf8Char {
  std::size_t length;
  bool valid;
};

Utf8Char utf8_char(std::string_view s, std::size_t i) {
  const auto c = static_cast<unsigned char>(s[i]);
  if (c < 0x80) return {1, true};
  std::size_t tail = 0;
  unsigned char lo = 0x80, hi = 0xBF;  // the second byte's range; later ones are 80..BF
  if (c >= 0xC2 && c <= 0xDF) {
    tail = 1;
  } else if (c >= 0xE0 && c <= 0xEF) {
    tail = 2;
    if (c == 0xE0) lo = 0xA0;  // no overlong forms
    if (c == 0xED) hi = 0x9F;  // no surrogates
  } else if (c >= 0xF0 && c <= 0xF4) {
    tail = 3;
    if (c == 0xF0) lo = 0x90;
    if (c == 0xF4) hi = 0x8F;  // nothing above U+10FFFF
  } else {
    return {1, false};
  }
  for (std::size_t k = 1; k <= tail; ++k) {
    if (i + k >= s.size()) return {k, false};
    const auto b = static_cast<unsigned char>(s[i + k]);
    if (b < (k == 1 ? lo : 0x80) || b > (k == 1 ? hi : 0xBF)) return {k, false};
  }
  return {tail + 1, true};
}

// The code point of the valid character of `length` bytes at s[i].
char32_t code_point(std::string_view s, std::size_t i, std::size_t length) {
  const auto c = static_cast<unsigned char>(s[i]);
  char32_t cp = length == 1 ? c : length == 2 ? (c & 0x1F) : length == 3 ? (c & 0x0F) : (c & 0x07);
  for (std::size_t k = 1; k < length; ++k) cp = (cp << 6) | (static_cast<unsigned char>(s[i + k]) & 0x3F);
  return cp;
}

// The offset of the first byte of `s` that is not valid UTF-8, or npos.
std::size_t first_invalid_utf8(std::string_view s) {
  for (std::size_t i = 0; i < s.size();) {
    const Utf8Char ch = utf8_char(s, i);
    if (!ch.valid) return i;
    i += ch.length;
  }
  return std::string_view::npos;
}

void require_utf8(std::string_view text) {
  if (const auto bad = first_invalid_utf8(text); bad != std::string_view::npos)
    throw std::invalid_argument("encode: the text is not valid UTF-8 at byte " + std::to_string(bad));
}

// ---------------------------------------------------------------------------
// The byte-level alphabet

// byte_level_chars() backwards: code point (all are below U+0144) → byte, or -1.
const std::array<int, 0x144>& byte_of_char() {
  static const std::array<int, 0x144> table = [] {
    std::array<int, 0x144> t;
    t.fill(-1);
    const auto& chars = byte_level_chars();
    for (int b = 0; b < 256; ++b) {
      const std::string& c = chars[static_cast<std::size_t>(b)];
      t[code_point(c, 0, c.size())] = b;
    }
    return t;
  }();
  return table;
}

// The bytes a token decodes to, as tokenizers' ByteLevel decoder: a token whose every
// character is in the byte-level alphabet is those bytes, any other token (an added
// token such as "<|eot_id|>" mostly is) is its own UTF-8 text.
std::string token_bytes(const std::string& token) {
  std::string out;
  for (std::size_t i = 0; i < token.size();) {
    const std::size_t n = utf8_char(token, i).length;
    const char32_t cp = code_point(token, i, n);
    if (cp >= byte_of_char().size() || byte_of_char()[cp] < 0) return token;
    out += static_cast<char>(byte_of_char()[cp]);
    i += n;
  }
  return out;
}

// Rust's String::from_utf8_lossy: each invalid stretch (maximal subpart) → U+FFFD.
std::string utf8_lossy(std::string_view s) {
  std::string out;
  for (std::size_t i = 0; i < s.size();) {
    const Utf8Char ch = utf8_char(s, i);
    if (ch.valid)
      out.append(s.substr(i, ch.length));
    else
      out += "\xEF\xBF\xBD";
    i += ch.length;
  }
  return out;
}

// ---------------------------------------------------------------------------
// tokenizer.json fields

json read_json(const fs::path& path, const std::string& what) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + what + " '" + path.string() + "'");
  try {
    return json::parse(in);
  } catch (const json::parse_error& e) {
    throw std::runtime_error(what + " '" + path.string() + "' is not valid JSON: " + e.what());
  }
}

// obj[key] when it is present and not null, else nullptr.
const json* field(const json& obj, const char* key) {
  if (!obj.is_object()) return nullptr;
  const auto it = obj.find(key);
  return it == obj.end() || it->is_null() ? nullptr : &*it;
}

bool flag(const json& obj, const char* key, bool fallback, const std::string& where) {
  const json* v = field(obj, key);
  if (!v) return fallback;
  if (!v->is_boolean()) throw std::runtime_error(where + "." + key + " is not true or false");
  return v->get<bool>();
}

std::string text_field(const json& obj, const char* key, const std::string& where) {
  const json* v = field(obj, key);
  if (!v || !v->is_string()) throw std::runtime_error(where + "." + key + " is missing or not a string");
  return v->get<std::string>();
}

// Constructs whose meaning differs between Oniguruma (the regex engine of `tokenizers`)
// and PCRE2 are refused, so a pattern that would split differently never runs:
// ^ and $ (line anchors in Oniguruma, text anchors in PCRE2), \h (a hex digit there,
// horizontal space here), \w \W \b \B (Oniguruma's word characters include marks).
void check_portable(const std::string& pattern, const std::string& where) {
  bool in_class = false;
  for (std::size_t i = 0; i < pattern.size(); ++i) {
    const char c = pattern[i];
    if (c == '\\' && i + 1 < pattern.size()) {
      const char e = pattern[++i];
      if (std::string_view("hHwWbB").find(e) != std::string_view::npos)
        throw std::runtime_error(where + ": \\" + std::string(1, e) + " in pattern '" + pattern +
                                 "' is not implemented (Oniguruma and PCRE2 read it differently)");
    } else if (in_class) {
      if (c == ']') in_class = false;
      if (c == '[' && (i + 1 >= pattern.size() || pattern[i + 1] != ':'))
        throw std::runtime_error(where + ": a nested character class in pattern '" + pattern + "' is not implemented");
    } else if (c == '[') {
      in_class = true;
      if (i + 1 < pattern.size() && pattern[i + 1] == '^') ++i;        // negation
      if (i + 1 < pattern.size() && pattern[i + 1] == ']') ++i;        // a literal ] first
    } else if (c == '^' || c == '$') {
      throw std::runtime_error(where + ": the anchor " + std::string(1, c) + " in pattern '" + pattern +
                               "' is not implemented (Oniguruma and PCRE2 read it differently)");
    }
  }
}

}  // namespace

// ---------------------------------------------------------------------------
// Regular expressions: PCRE2 in UTF mode with Unicode properties (UCP), so that \p{L},
// \p{N}, \s and (?i:...) mean what they mean to Oniguruma.

struct ByteLevelBpeTokenizer::Regex {
  std::unique_ptr<pcre2_code, decltype(&pcre2_code_free)> code{nullptr, pcre2_code_free};
  std::string where;  ///< the file and the pre-tokenizer step, for messages

  Regex(const std::string& pattern, const std::string& where_) : where(where_ + ": pattern '" + pattern + "'") {
    check_portable(pattern, where_);
    int error = 0;
    PCRE2_SIZE offset = 0;
    code.reset(pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(), PCRE2_UTF | PCRE2_UCP,
                             &error, &offset, nullptr));
    if (!code) {
      std::array<PCRE2_UCHAR, 256> msg{};
      pcre2_get_error_message(error, msg.data(), msg.size());
      throw std::runtime_error(where + " does not compile at offset " + std::to_string(offset) + ": " +
                               reinterpret_cast<const char*>(msg.data()));
    }
  }

  // The first match at or after `start` in `text` (valid UTF-8, checked by the caller),
  // as [begin, end); none: begin = npos. Text before `start` is seen by lookbehinds.
  std::pair<std::size_t, std::size_t> find(std::string_view text, std::size_t start) const {
    std::unique_ptr<pcre2_match_data, decltype(&pcre2_match_data_free)> m(
        pcre2_match_data_create_from_pattern(code.get(), nullptr), pcre2_match_data_free);
    const int rc = pcre2_match(code.get(), reinterpret_cast<PCRE2_SPTR>(text.data()), text.size(), start,
                               PCRE2_NO_UTF_CHECK, m.get(), nullptr);
    if (rc == PCRE2_ERROR_NOMATCH) return {std::string_view::npos, 0};
    if (rc < 0) {
      std::array<PCRE2_UCHAR, 256> msg{};
      pcre2_get_error_message(rc, msg.data(), msg.size());
      throw std::runtime_error(where + " failed at byte " + std::to_string(start) + ": " +
                               reinterpret_cast<const char*>(msg.data()));
    }
    const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(m.get());
    return {ov[0], ov[1]};
  }
};

namespace {

// tokenizers' Split with behavior Isolated: every match is a piece, and so is every
// stretch between two matches; empty pieces are dropped. Matches are found as Oniguruma's
// find_iter finds them: an empty match where the previous match ended does not count, and
// the search moves on by one character.
std::vector<std::string> split_isolated(const ByteLevelBpeTokenizer::Regex& re, std::string_view text) {
  std::vector<std::string> pieces;
  std::size_t pos = 0, piece_start = 0, last_end = std::string_view::npos;
  while (pos <= text.size()) {
    const auto [begin, end] = re.find(text, pos);
    if (begin == std::string_view::npos) break;
    if (begin == end && end == last_end) {
      if (pos == text.size()) break;
      pos += utf8_char(text, pos).length;
      continue;
    }
    if (piece_start < begin) pieces.emplace_back(text.substr(piece_start, begin - piece_start));
    if (begin < end) pieces.emplace_back(text.substr(begin, end - begin));
    piece_start = pos = last_end = end;
  }
  if (piece_start < text.size()) pieces.emplace_back(text.substr(piece_start));
  return pieces;
}

}  // namespace

// ---------------------------------------------------------------------------
// The byte-level alphabet

const std::array<std::string, 256>& byte_level_chars() {
  static const std::array<std::string, 256> table = [] {
    std::array<std::string, 256> t;
    char32_t next = 0x100;  // the first character after Latin-1
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      t[static_cast<std::size_t>(b)] = utf8(printable ? static_cast<char32_t>(b) : next++);
    }
    return t;
  }();
  return table;
}

std::string byte_level_spelling(std::string_view bytes) {
  std::string out;
  for (unsigned char b : bytes) out += byte_level_chars()[b];
  return out;
}

// ---------------------------------------------------------------------------
// Reading tokenizer.json

ByteLevelBpeTokenizer::ByteLevelBpeTokenizer(const fs::path& tokenizer_json)
    : file_("tokenizer.json '" + tokenizer_json.string() + "'") {
  const json doc = read_json(tokenizer_json, "tokenizer.json");
  if (!doc.is_object()) throw std::runtime_error(file_ + " is not a JSON object");
  // Parts that change the ids and that we do not implement. The post_processor only adds
  // BOS/EOS when asked to (add_special_tokens=True), which encode never does.
  if (const json* n = field(doc, "normalizer"))
    throw std::runtime_error(file_ + ": normalizer " + n->dump() + " is not implemented (only null)");
  for (const char* key : {"truncation", "padding"})
    if (field(doc, key)) throw std::runtime_error(file_ + ": " + key + " is set; not implemented (only null)");
  const json* decoder = field(doc, "decoder");
  if (!decoder || text_field(*decoder, "type", file_ + ": decoder") != "ByteLevel")
    throw std::runtime_error(file_ + ": decoder " + (decoder ? decoder->dump() : "null") +
                             " is not implemented (only ByteLevel)");
  const json* model = field(doc, "model");
  if (!model || !model->is_object()) throw std::runtime_error(file_ + ": model is missing");

  read_vocabulary(*model, field(doc, "added_tokens"));
  read_merges(*model);
  read_pre_tokenizer(field(doc, "pre_tokenizer"));
  read_bos_eos(tokenizer_json.parent_path());
}

void ByteLevelBpeTokenizer::place_token(const json& id_value, const std::string& token, const std::string& where) {
  const auto id = id_value.get<long long>();
  if (id < 0 || id >= std::numeric_limits<int>::max())
    throw std::runtime_error(where + ": id " + std::to_string(id) + " is out of range");
  if (static_cast<std::size_t>(id) >= tokens_.size()) {
    tokens_.resize(static_cast<std::size_t>(id) + 1);
    special_.resize(tokens_.size());
  }
  auto& slot = tokens_[static_cast<std::size_t>(id)];
  if (!slot.empty() && slot != token)
    throw std::runtime_error(where + ": id " + std::to_string(id) + " is both '" + slot + "' and '" + token + "'");
  slot = token;
}

void ByteLevelBpeTokenizer::read_vocabulary(const json& model, const json* added) {
  // The model: BPE without dropout, unknown token, subword affixes or byte fallback.
  const std::string mwhere = file_ + ": model";
  if (const std::string type = text_field(model, "type", mwhere); type != "BPE")
    throw std::runtime_error(mwhere + ".type '" + type + "' is not implemented (only BPE)");
  for (const char* key : {"dropout", "unk_token"})
    if (const json* v = field(model, key))
      throw std::runtime_error(mwhere + "." + key + " = " + v->dump() + " is not implemented (only null)");
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"})
    if (const json* v = field(model, key); v && *v != "")
      throw std::runtime_error(mwhere + "." + key + " = " + v->dump() + " is not implemented (only null)");
  if (flag(model, "byte_fallback", false, mwhere))
    throw std::runtime_error(mwhere + ".byte_fallback = true is not implemented");
  ignore_merges_ = flag(model, "ignore_merges", false, mwhere);

  // The vocabulary and the added tokens fill the ids 0..N-1, each exactly once (an added
  // token that is also in the vocabulary must have the vocabulary's id).
  const json* vocab = field(model, "vocab");
  if (!vocab || !vocab->is_object()) throw std::runtime_error(mwhere + ".vocab is missing or not an object");
  for (const auto& [token, id] : vocab->items()) {
    if (!id.is_number_integer() || token.empty())
      throw std::runtime_error(mwhere + ".vocab: entry '" + token + "' is not a non-empty token with an integer id");
    place_token(id, token, mwhere + ".vocab");
    vocab_.emplace(token, id.get<int>());
  }
  if (added && !added->is_array()) throw std::runtime_error(file_ + ": added_tokens is not a list");
  for (const json& t : added ? *added : json::array()) {
    const std::string where = file_ + ": added_tokens entry " + t.dump();
    const json* id = field(t, "id");
    if (!id || !id->is_number_integer()) throw std::runtime_error(where + " has no integer id");
    const std::string content = text_field(t, "content", where);
    if (content.empty()) throw std::runtime_error(where + " has empty content");
    for (const char* key : {"lstrip", "rstrip", "single_word"})
      if (flag(t, key, false, where)) throw std::runtime_error(where + ": " + key + " = true is not implemented");
    if (const auto it = vocab_.find(content); it != vocab_.end() && it->second != id->get<long long>())
      throw std::runtime_error(where + ": the vocabulary has '" + content + "' as id " + std::to_string(it->second));
    place_token(*id, content, where);
    special_[static_cast<std::size_t>(id->get<int>())] = flag(t, "special", false, where);
    // tokenizers' default for a missing "normalized" is true (AddedToken::default).
    (flag(t, "normalized", true, where) ? added_normalized_ : added_raw_).push_back({content, id->get<int>()});
  }
  for (std::size_t id = 0; id < tokens_.size(); ++id)
    if (tokens_[id].empty()) throw std::runtime_error(file_ + ": no token has id " + std::to_string(id));
  // At one position the longest added token wins: try them longest first.
  for (auto* set : {&added_raw_, &added_normalized_}) {
    std::stable_sort(set->begin(), set->end(), [](const Added& a, const Added& b) { return a.content.size() > b.content.size(); });
    for (const Added& a : *set) added_first_byte_[static_cast<unsigned char>(a.content[0])] = true;
  }
  bytes_.reserve(tokens_.size());
  for (const auto& t : tokens_) bytes_.push_back(token_bytes(t));
}

void ByteLevelBpeTokenizer::read_merges(const json& model) {
  // In rank order: "left right" strings (tokenizers before 0.20) or [left, right] pairs.
  const std::string mwhere = file_ + ": model";
  const json* merges = field(model, "merges");
  if (!merges || !merges->is_array()) throw std::runtime_error(mwhere + ".merges is missing or not a list");
  for (std::size_t rank = 0; rank < merges->size(); ++rank) {
    const json& m = (*merges)[rank];
    const std::string where = mwhere + ".merges[" + std::to_string(rank) + "] " + m.dump();
    std::string left, right;
    if (m.is_string()) {
      const std::string s = m.get<std::string>();
      const auto space = s.find(' ');
      if (space == std::string::npos || s.find(' ', space + 1) != std::string::npos)
        throw std::runtime_error(where + " is not two tokens separated by one space");
      left = s.substr(0, space);
      right = s.substr(space + 1);
    } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
      left = m[0].get<std::string>();
      right = m[1].get<std::string>();
    } else {
      throw std::runtime_error(where + " is neither \"left right\" nor [left, right]");
    }
    const auto l = vocab_.find(left), r = vocab_.find(right), merged = vocab_.find(left + right);
    if (l == vocab_.end() || r == vocab_.end() || merged == vocab_.end())
      throw std::runtime_error(where + ": '" + left + "', '" + right + "' or '" + left + right +
                               "' is not in the vocabulary");
    const auto key = (static_cast<std::uint64_t>(l->second) << 32) | static_cast<std::uint32_t>(r->second);
    if (!merges_.emplace(key, std::pair{static_cast<int>(rank), merged->second}).second)
      throw std::runtime_error(where + " repeats an earlier merge");
  }
}

void ByteLevelBpeTokenizer::read_pre_tokenizer(const json* pre) {
  // Split(Regex, Isolated) and ByteLevel steps, alone or in a Sequence, with exactly one ByteLevel.
  if (!pre) throw std::runtime_error(file_ + ": pre_tokenizer is null; only byte-level pre-tokenizers are implemented");
  const std::string pwhere = file_ + ": pre_tokenizer";
  const bool sequence = text_field(*pre, "type", pwhere) == "Sequence";
  const json* steps = sequence ? field(*pre, "pretokenizers") : pre;
  if (!steps || (sequence && !steps->is_array())) throw std::runtime_error(pwhere + ".pretokenizers is not a list");
  for (const json& step : sequence ? *steps : json::array({*pre})) {
    const std::string type = text_field(step, "type", pwhere);
    const std::string where = pwhere + " " + type;
    PreStep s;
    if (type == "Split") {
      const json* pattern = field(step, "pattern");
      const json* regex = pattern ? field(*pattern, "Regex") : nullptr;
      if (!regex || !regex->is_string())
        throw std::runtime_error(where + ".pattern " + (pattern ? pattern->dump() : "null") +
                                 " is not implemented (only {\"Regex\": ...})");
      if (const std::string behavior = text_field(step, "behavior", where); behavior != "Isolated")
        throw std::runtime_error(where + ".behavior '" + behavior + "' is not implemented (only Isolated)");
      if (flag(step, "invert", false, where)) throw std::runtime_error(where + ".invert = true is not implemented");
      s.regex = std::make_shared<const Regex>(regex->get<std::string>(), where);
    } else if (type == "ByteLevel") {
      const json* prefix = field(step, "add_prefix_space");
      if (!prefix || !prefix->is_boolean()) throw std::runtime_error(where + ".add_prefix_space is missing");
      if (prefix->get<bool>()) throw std::runtime_error(where + ".add_prefix_space = true is not implemented");
      if (flag(step, "use_regex", true, where)) s.regex = std::make_shared<const Regex>(kGpt2Pattern, where);
      s.byte_level = true;
    } else {
      throw std::runtime_error(where + " is not implemented (only Split, ByteLevel and a Sequence of them)");
    }
    pre_steps_.push_back(s);
  }
  if (std::count_if(pre_steps_.begin(), pre_steps_.end(), [](const PreStep& s) { return s.byte_level; }) != 1)
    throw std::runtime_error(pwhere + " must have exactly one ByteLevel step");
}

void ByteLevelBpeTokenizer::read_bos_eos(const fs::path& dir) {
  // tokenizer_config.json's token texts, else config.json's ids.
  const fs::path tok_config = dir / "tokenizer_config.json", config = dir / "config.json";
  const std::string tc_where = "tokenizer_config.json '" + tok_config.string() + "'";
  const std::string mc_where = "config.json '" + config.string() + "'";
  const json tc = fs::exists(tok_config) ? read_json(tok_config, "tokenizer_config.json") : json::object();
  const json mc = fs::exists(config) ? read_json(config, "config.json") : json::object();
  auto find = [&](const char* token_key, const char* id_key, std::string& source) -> std::optional<int> {
    source = tc_where + " has no " + token_key + " and " + mc_where + " no " + id_key;
    if (const json* t = field(tc, token_key)) {
      const json* content = t->is_object() ? field(*t, "content") : t;
      if (!content || !content->is_string())
        throw std::runtime_error(tc_where + ": " + token_key + " " + t->dump() + " is not a token's text");
      const std::string text = content->get<std::string>();
      if (auto id = special_token_id(text)) return id;
      if (const auto it = vocab_.find(text); it != vocab_.end()) return it->second;
      throw std::runtime_error(tc_where + ": " + token_key + " '" + text + "' is not a token of " + file_);
    }
    if (const json* v = field(mc, id_key)) {
      const json& id = v->is_array() && !v->empty() ? (*v)[0] : *v;
      if (!id.is_number_integer() || id.get<long long>() < 0 || id.get<long long>() >= vocab_size())
        throw std::runtime_error(mc_where + ": " + id_key + " " + v->dump() + " is not an id of " + file_);
      return id.get<int>();
    }
    return std::nullopt;
  };
  bos_ = find("bos_token", "bos_token_id", bos_source_);
  eos_ = find("eos_token", "eos_token_id", eos_source_);
}

ByteLevelBpeTokenizer::~ByteLevelBpeTokenizer() = default;

int ByteLevelBpeTokenizer::bos_id() const {
  if (!bos_) throw std::runtime_error(file_ + ": no BOS token known: " + bos_source_);
  return *bos_;
}

int ByteLevelBpeTokenizer::eos_id() const {
  if (!eos_) throw std::runtime_error(file_ + ": no EOS token known: " + eos_source_);
  return *eos_;
}

std::optional<int> ByteLevelBpeTokenizer::special_token_id(const std::string& text) const {
  for (const auto* set : {&added_raw_, &added_normalized_})
    for (const Added& a : *set)
      if (a.content == text) return a.id;
  return std::nullopt;
}

const std::string& ByteLevelBpeTokenizer::token(int id) const {
  if (id < 0 || id >= vocab_size()) throw std::out_of_range("token id " + std::to_string(id) + " out of range");
  return tokens_[static_cast<std::size_t>(id)];
}

// ---------------------------------------------------------------------------
// Encoding

std::vector<std::string> ByteLevelBpeTokenizer::pre_tokenize(const std::string& text) const {
  require_utf8(text);
  std::vector<std::string> pieces{text};
  for (const PreStep& step : pre_steps_) {
    if (step.regex) {
      std::vector<std::string> split;
      for (const auto& p : pieces)
        for (auto& q : split_isolated(*step.regex, p)) split.push_back(std::move(q));
      pieces = std::move(split);
    }
    if (step.byte_level)
      for (auto& p : pieces) p = byte_level_spelling(p);
  }
  std::erase_if(pieces, [](const std::string& p) { return p.empty(); });
  return pieces;
}

//! [bpe-merge]
std::vector<int> ByteLevelBpeTokenizer::bpe(const std::string& piece) const {
  // LLaMA-3's ignore_merges: a piece that is a token is that token, even where the
  // merges would build it differently.
  if (ignore_merges_)
    if (const auto it = vocab_.find(piece); it != vocab_.end()) return {it->second};
  // One token per character (each byte-level character is a token of the vocabulary).
  std::vector<int> ids;
  for (std::size_t i = 0; i < piece.size();) {
    const std::size_t n = utf8_char(piece, i).length;
    const auto it = vocab_.find(piece.substr(i, n));
    if (it == vocab_.end())
      throw std::runtime_error(file_ + ": the vocabulary has no token for the byte-level character '" +
                               piece.substr(i, n) + "'");
    ids.push_back(it->second);
    i += n;
  }
  // Merge the adjacent pair of lowest rank, the leftmost of equals, until none merges.
  while (ids.size() > 1) {
    int best_rank = std::numeric_limits<int>::max(), best_id = -1;
    std::size_t best_i = 0;
    for (std::size_t i = 0; i + 1 < ids.size(); ++i) {
      const auto key = (static_cast<std::uint64_t>(ids[i]) << 32) | static_cast<std::uint32_t>(ids[i + 1]);
      if (const auto it = merges_.find(key); it != merges_.end() && it->second.first < best_rank) {
        best_rank = it->second.first;
        best_id = it->second.second;
        best_i = i;
      }
    }
    if (best_id < 0) break;
    ids[best_i] = best_id;
    ids.erase(ids.begin() + static_cast<std::ptrdiff_t>(best_i) + 1);
  }
  return ids;
}
//! [bpe-merge]

std::vector<ByteLevelBpeTokenizer::Segment> ByteLevelBpeTokenizer::cut_out(const std::vector<Segment>& segments,
                                                                          const std::vector<Added>& set) const {
  std::vector<Segment> out;
  for (const Segment& seg : segments) {
    if (seg.id >= 0) {
      out.push_back(seg);
      continue;
    }
    // The leftmost match, the longest there: the set is sorted longest first.
    std::size_t start = 0;
    for (std::size_t i = 0; i < seg.text.size();) {
      const auto at = std::string_view(seg.text).substr(i);
      const auto hit = !added_first_byte_[static_cast<unsigned char>(at[0])]
                           ? set.end()
                           : std::find_if(set.begin(), set.end(), [&](const Added& a) { return at.starts_with(a.content); });
      if (hit == set.end()) {
        ++i;
        continue;
      }
      if (start < i) out.push_back({seg.text.substr(start, i - start), -1});
      out.push_back({hit->content, hit->id});
      start = i += hit->content.size();
    }
    if (start < seg.text.size()) out.push_back({seg.text.substr(start), -1});
  }
  return out;
}

//! [bpe-encode]
std::vector<int> ByteLevelBpeTokenizer::encode(const std::string& text) const {
  require_utf8(text);
  // 1. Cut out the added tokens: those matched on the raw text first, then the
  //    "normalized" ones in what is left (the normalizer is null, so they match as written).
  const auto segments = cut_out(cut_out({{text, -1}}, added_raw_), added_normalized_);
  // 2. and 3. Pre-tokenize each stretch of text, then BPE each piece.
  std::vector<int> ids;
  for (const Segment& seg : segments) {
    if (seg.id >= 0) {
      ids.push_back(seg.id);
      continue;
    }
    for (const auto& piece : pre_tokenize(seg.text)) {
      const auto part = bpe(piece);
      ids.insert(ids.end(), part.begin(), part.end());
    }
  }
  return ids;
}
//! [bpe-encode]

// ---------------------------------------------------------------------------
// Decoding

std::string ByteLevelBpeTokenizer::decode_piece(int, int id) const {
  token(id);  // range check
  return special_[static_cast<std::size_t>(id)] ? std::string() : bytes_[static_cast<std::size_t>(id)];
}

std::string ByteLevelBpeTokenizer::decode(const std::vector<int>& ids) const {
  std::string bytes;
  for (int id : ids) bytes += decode_piece(0, id);
  return utf8_lossy(bytes);
}

}  // namespace qlora
