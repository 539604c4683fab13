// Chapter 7: byte-level BPE from tokenizer.json (LLaMA-3, GPT-2). Hand-derived cases on a
// tiny hand-made tokenizer (GPT-2's byte map, LLaMA-3's regex split, merge order,
// ignore_merges, added tokens, decoding, BOS/EOS), a refusal by name for every field not
// implemented, and ids and text identical to Hugging Face `tokenizers` on the fixtures of
// tools/make_bpe_fixtures.py (tests/fixtures/bpe: LLaMA-3's layout; bpe/gpt2: GPT-2's).
#include "bpe_tokenizer.hpp"
#include "file_helpers.hpp"
#include "tokenizer.hpp"

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <fstream>
#include <functional>
#include <set>

using namespace qlora;
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

const char* kLlama3Pattern =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

json llama3_pre_tokenizer() {
  return {{"type", "Sequence"},
          {"pretokenizers",
           {{{"type", "Split"}, {"pattern", {{"Regex", kLlama3Pattern}}}, {"behavior", "Isolated"}, {"invert", false}},
            {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", false}}}}};
}

json added_token(int id, const std::string& content, bool special, bool normalized) {
  return {{"id", id},          {"content", content},     {"single_word", false}, {"lstrip", false},
          {"rstrip", false},   {"normalized", normalized}, {"special", special}};
}

// A tokenizer.json small enough to derive every id by hand. "Ġ" is the space, "Ċ" the
// newline, "Ã" and "©" the two bytes of "é"; "ca" has no merge (only ignore_merges makes it).
json tiny_tokenizer() {
  return {{"version", "1.0"},
          {"truncation", nullptr},
          {"padding", nullptr},
          {"added_tokens",
           {added_token(13, "<|bos|>", true, false), added_token(14, "<|eot|>", true, false),
            added_token(15, "<|e", false, false), added_token(16, "a<|", false, true)}},
          {"normalizer", nullptr},
          {"pre_tokenizer", llama3_pre_tokenizer()},
          {"post_processor", {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", false}}},
          {"decoder", {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", true}, {"use_regex", true}}},
          {"model",
           {{"type", "BPE"},
            {"dropout", nullptr},
            {"unk_token", nullptr},
            {"continuing_subword_prefix", nullptr},
            {"end_of_word_suffix", nullptr},
            {"fuse_unk", false},
            {"byte_fallback", false},
            {"ignore_merges", true},
            {"vocab",
             {{"a", 0}, {"b", 1}, {"c", 2}, {"Ġ", 3}, {"ab", 4}, {"abc", 5}, {"Ġa", 6}, {"bc", 7}, {"Ċ", 8}, {"!", 9},
              {"ca", 10}, {"Ã", 11}, {"©", 12}}},
            {"merges", json::array({json::array({"a", "b"}), json::array({"ab", "c"}), json::array({"Ġ", "a"}),
                                    json::array({"b", "c"})})}}}};
}

// Writes `tok` (and, when given, a tokenizer_config.json and a config.json) into a fresh
// folder and returns the tokenizer.json path.
fs::path write_folder(const json& tok, const json& tok_config = nullptr, const json& config = nullptr) {
  static int n = 0;
  const fs::path dir = test::temp_path("test_ch07_bpe", "folder" + std::to_string(n++));
  fs::create_directories(dir);
  std::ofstream(dir / "tokenizer.json") << tok.dump(1);
  if (!tok_config.is_null()) std::ofstream(dir / "tokenizer_config.json") << tok_config.dump(1);
  if (!config.is_null()) std::ofstream(dir / "config.json") << config.dump(1);
  return dir / "tokenizer.json";
}

ByteLevelBpeTokenizer tiny(const json& tok = tiny_tokenizer()) { return ByteLevelBpeTokenizer(write_folder(tok)); }

std::vector<std::string> pieces(const ByteLevelBpeTokenizer& t, const std::string& text) { return t.pre_tokenize(text); }

json read_json_file(const fs::path& p) {
  std::ifstream in(p);
  return json::parse(in);
}

const char* kFixtureHelp = "run `python3 tools/make_bpe_fixtures.py --out tests/fixtures/bpe` where Hugging Face "
                           "tokenizers is installed, and commit tests/fixtures/bpe";

// A case's text: held in the fixture, or a piece of a shared data file that the fixture
// names (tinyshakespeare.txt is read through the data search path, never copied in).
std::string case_text(const json& c) {
  if (!c.contains("text_from")) return c.at("text").get<std::string>();
  const json& r = c.at("text_from");
  const fs::path file = qlora::require_data(r.at("file").get<std::string>());
  std::ifstream in(file, std::ios::binary);
  std::string text(r.at("length").get<std::size_t>(), '\0');
  in.seekg(r.at("offset").get<std::streamoff>());
  in.read(text.data(), static_cast<std::streamsize>(text.size()));
  REQUIRE(in.gcount() == static_cast<std::streamsize>(text.size()));
  return text;
}

}  // namespace

TEST_CASE("byte-level BPE: GPT-2's byte-to-character map", "[ch07][bpe]") {
  const auto& m = byte_level_chars();
  CHECK(m[' '] == "\u0120");  // Ġ
  CHECK(m['\n'] == "\u010A");  // Ċ
  CHECK(m[0x00] == "\u0100");
  CHECK(m['\t'] == "\u0109");
  CHECK(m['A'] == "A");
  CHECK(m['!'] == "!");
  CHECK(m[0x7F] == "\u0121");  // after the 33 bytes 0x00..0x20
  CHECK(m[0x80] == "\u0122");
  CHECK(m[0xA0] == "\u0142");
  CHECK(m[0xA1] == "\u00A1");
  CHECK(m[0xAD] == "\u0143");  // the soft hyphen, the 68th and last moved byte
  CHECK(m[0xE9] == "\u00E9");
  CHECK(std::set<std::string>(m.begin(), m.end()).size() == 256);
  CHECK(byte_level_spelling("a b\n\xC3\xA9") == "a\u0120b\u010A\u00C3\u00A9");
}

TEST_CASE("byte-level BPE: LLaMA-3's regex splits as derived by hand", "[ch07][bpe]") {
  const auto t = tiny();
  using V = std::vector<std::string>;
  CHECK(pieces(t, "Hello world") == V{"Hello", "Ġworld"});
  // Digits go in threes, apart from the space before them (which \s+ takes alone).
  CHECK(pieces(t, "I'm 12345 ok") == V{"I", "'m", "Ġ", "123", "45", "Ġok"});
  // A space run keeps its last space for the next word: \s+(?!\S) backs off by one.
  CHECK(pieces(t, "a  b") == V{"a", "Ġ", "Ġb"});
  CHECK(pieces(t, "x\n\n  y") == V{"x", "ĊĊ", "Ġ", "Ġy"});
  CHECK(pieces(t, "end   ") == V{"end", "ĠĠĠ"});
  // Contractions in any case, through (?i:...).
  CHECK(pieces(t, "DON'T don't it's.") == V{"DON", "'T", "Ġdon", "'t", "Ġit", "'s", "."});
  CHECK(pieces(t, "hello!!! (abc") == V{"hello", "!!!", "Ġ(", "abc"});
  CHECK(pieces(t, "") == V{});
}

TEST_CASE("byte-level BPE: GPT-2's ByteLevel regex splits as derived by hand", "[ch07][bpe]") {
  json j = tiny_tokenizer();
  j["pre_tokenizer"] = {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", true}};
  const auto t = tiny(j);
  using V = std::vector<std::string>;
  CHECK(pieces(t, "Hello world") == V{"Hello", "Ġworld"});
  CHECK(pieces(t, "a  b 12345") == V{"a", "Ġ", "Ġb", "Ġ12345"});
  // GPT-2's contractions are lower case only: "'M" is punctuation, then a word.
  CHECK(pieces(t, "I'M I'm") == V{"I", "'", "M", "ĠI", "'m"});
}

TEST_CASE("byte-level BPE: merges by rank, ignore_merges, added tokens (hand-derived ids)", "[ch07][bpe]") {
  const auto t = tiny();
  CHECK(t.vocab_size() == 17);
  using V = std::vector<int>;
  CHECK(t.encode("abc") == V{5});       // a b c → ab c → abc
  CHECK(t.encode(" abc") == V{3, 5});   // Ġ a b c → Ġ ab c → Ġ abc (no merge Ġ+abc)
  CHECK(t.encode("bca") == V{7, 0});    // b c a → bc a
  // The lowest rank first, not the leftmost pair: Ġ a b → Ġ ab (rank 0), where the
  // leftmost pair Ġ a (rank 2) would give Ġa b.
  CHECK(t.encode(" ab") == V{3, 4});
  CHECK(t.encode("ca") == V{10});       // whole, through ignore_merges
  CHECK(t.encode("cab") == V{2, 4});    // not a token: merged
  CHECK(t.encode("é") == V{11, 12});    // two bytes, two tokens
  CHECK(t.encode("a\n\nb") == V{0, 8, 8, 1});
  CHECK(t.encode("") == V{});
  // Added tokens are cut out first, the longest at the leftmost position.
  CHECK(t.encode("a<|eot|>b") == V{0, 14, 1});
  CHECK(t.encode("<|e!") == V{15, 9});
  CHECK(t.encode("<|bos|><|eot|>") == V{13, 14});
  // "Normalized" added tokens are matched only after the others: "a<|" (normalized)
  // starts further left than "<|eot|>" but loses to it.
  CHECK(t.encode("a<|eot|>") == V{0, 14});
  CHECK(t.encode("a<|b") == V{16, 1});

  json off = tiny_tokenizer();
  off["model"]["ignore_merges"] = false;
  CHECK(tiny(off).encode("ca") == V{2, 0});
  CHECK(tiny(off).encode("abc") == V{5});
}

TEST_CASE("byte-level BPE: decoding skips special tokens and replaces broken UTF-8", "[ch07][bpe]") {
  const auto t = tiny();
  CHECK(t.decode({3, 5}) == " abc");
  CHECK(t.decode({13, 0, 14}) == "a");       // BOS and EOS are special: skipped
  CHECK(t.decode({15, 9}) == "<|e!");        // a non-special added token is text
  CHECK(t.decode({11, 12}) == "é");
  CHECK(t.decode({11}) == "\uFFFD");         // half a character
  CHECK(t.decode({11, 0}) == "\uFFFDa");
  CHECK(t.decode_piece(0, 11) == "\xC3");    // streaming: the raw byte, completed by the next piece
  CHECK(t.decode_piece(0, 13).empty());
  CHECK_THROWS_AS(t.decode({17}), std::out_of_range);
  for (const std::string s : {"abc", " ab ca\n!", "é<|eot|>a<|b", "<|e"}) {
    std::string streamed;
    for (int id : t.encode(s)) streamed += t.decode_piece(0, id);
    CHECK(streamed == (s == "é<|eot|>a<|b" ? "éa<|b" : s));
  }
  CHECK_THROWS_WITH(t.encode("a\xC3"), Catch::Contains("not valid UTF-8 at byte 1"));
}

TEST_CASE("byte-level BPE: BOS and EOS from tokenizer_config.json, else config.json", "[ch07][bpe]") {
  const json tc = {{"bos_token", "<|bos|>"}, {"eos_token", {{"content", "<|eot|>"}, {"lstrip", false}}}};
  const ByteLevelBpeTokenizer a(write_folder(tiny_tokenizer(), tc));
  CHECK(a.bos_id() == 13);
  CHECK(a.eos_id() == 14);
  CHECK(a.special_token_id("<|eot|>") == 14);
  CHECK(a.special_token_id("<|e") == 15);
  CHECK_FALSE(a.special_token_id("abc").has_value());

  // config.json's ids; a list of EOS ids gives the first.
  const ByteLevelBpeTokenizer b(write_folder(tiny_tokenizer(), nullptr, {{"bos_token_id", 13}, {"eos_token_id", {14, 13}}}));
  CHECK(b.bos_id() == 13);
  CHECK(b.eos_id() == 14);
  // tokenizer_config.json wins where it has the field.
  const ByteLevelBpeTokenizer c(write_folder(tiny_tokenizer(), {{"eos_token", "<|bos|>"}}, {{"bos_token_id", 14}, {"eos_token_id", 13}}));
  CHECK(c.bos_id() == 14);
  CHECK(c.eos_id() == 13);

  const auto none = tiny();
  CHECK_THROWS_WITH(none.bos_id(), Catch::Contains("no BOS token known") && Catch::Contains("bos_token_id"));
  CHECK_THROWS_WITH(none.eos_id(), Catch::Contains("no EOS token known") && Catch::Contains("eos_token"));
  CHECK_THROWS_WITH(ByteLevelBpeTokenizer(write_folder(tiny_tokenizer(), {{"bos_token", "<s>"}})),
                    Catch::Contains("tokenizer_config.json") && Catch::Contains("bos_token '<s>'"));
  CHECK_THROWS_WITH(ByteLevelBpeTokenizer(write_folder(tiny_tokenizer(), nullptr, {{"eos_token_id", 17}})),
                    Catch::Contains("config.json") && Catch::Contains("eos_token_id 17"));
}

TEST_CASE("byte-level BPE: load_tokenizer takes a folder's tokenizer.model, else its tokenizer.json", "[ch07][bpe]") {
  const fs::path file = write_folder(tiny_tokenizer(), {{"bos_token", "<|bos|>"}, {"eos_token", "<|eot|>"}});
  for (const fs::path& p : {file, file.parent_path()}) {
    const auto tok = load_tokenizer(p);
    REQUIRE(dynamic_cast<const ByteLevelBpeTokenizer*>(tok.get()) != nullptr);
    CHECK(tok->encode(" abc") == std::vector<int>{3, 5});
    CHECK(tok->bos_id() == 13);
  }
  // A folder with both: tokenizer.model is taken.
  if (const auto sp = test::model_or_fail("tokenizer.model")) {
    fs::copy_file(*sp, file.parent_path() / "tokenizer.model");
    CHECK(dynamic_cast<const SentencePieceTokenizer*>(load_tokenizer(file.parent_path()).get()) != nullptr);
  }
}

TEST_CASE("byte-level BPE: every field not implemented is refused by name", "[ch07][bpe]") {
  struct Case {
    std::string what;
    std::function<void(json&)> change;
    std::string message;  // a part of the error
  };
  auto split = [](json& j) -> json& { return j["pre_tokenizer"]["pretokenizers"][0]; };
  auto byte_level = [](json& j) -> json& { return j["pre_tokenizer"]["pretokenizers"][1]; };
  const std::vector<Case> cases = {
      {"normalizer", [](json& j) { j["normalizer"] = {{"type", "NFC"}}; }, "normalizer {\"type\":\"NFC\"}"},
      {"truncation", [](json& j) { j["truncation"] = {{"max_length", 8}}; }, "truncation"},
      {"padding", [](json& j) { j["padding"] = {{"strategy", "BatchLongest"}}; }, "padding"},
      {"decoder", [](json& j) { j["decoder"] = {{"type", "WordPiece"}}; }, "decoder"},
      {"no decoder", [](json& j) { j["decoder"] = nullptr; }, "decoder null"},
      {"model.type", [](json& j) { j["model"]["type"] = "WordPiece"; }, "model.type 'WordPiece'"},
      {"dropout", [](json& j) { j["model"]["dropout"] = 0.1; }, "model.dropout"},
      {"unk_token", [](json& j) { j["model"]["unk_token"] = "a"; }, "model.unk_token"},
      {"prefix", [](json& j) { j["model"]["continuing_subword_prefix"] = "##"; }, "model.continuing_subword_prefix"},
      {"suffix", [](json& j) { j["model"]["end_of_word_suffix"] = "</w>"; }, "model.end_of_word_suffix"},
      {"byte_fallback", [](json& j) { j["model"]["byte_fallback"] = true; }, "model.byte_fallback"},
      {"no pre_tokenizer", [](json& j) { j["pre_tokenizer"] = nullptr; }, "pre_tokenizer is null"},
      {"Whitespace", [](json& j) { j["pre_tokenizer"] = {{"type", "Whitespace"}}; }, "pre_tokenizer Whitespace"},
      {"Metaspace step", [&](json& j) { byte_level(j) = {{"type", "Metaspace"}}; }, "pre_tokenizer Metaspace"},
      {"Split behavior", [&](json& j) { split(j)["behavior"] = "Removed"; }, "Split.behavior 'Removed'"},
      {"Split invert", [&](json& j) { split(j)["invert"] = true; }, "Split.invert"},
      {"Split string", [&](json& j) { split(j)["pattern"] = {{"String", " "}}; }, "Split.pattern"},
      {"add_prefix_space", [&](json& j) { byte_level(j)["add_prefix_space"] = true; }, "ByteLevel.add_prefix_space"},
      {"no ByteLevel", [&](json& j) { j["pre_tokenizer"]["pretokenizers"].erase(1); }, "exactly one ByteLevel"},
      {"two ByteLevel", [&](json& j) { j["pre_tokenizer"]["pretokenizers"].push_back(byte_level(j)); },
       "exactly one ByteLevel"},
      {"anchor", [&](json& j) { split(j)["pattern"]["Regex"] = "^\\s+"; }, "anchor ^"},
      {"\\w", [&](json& j) { split(j)["pattern"]["Regex"] = "\\w+"; }, "\\w in pattern"},
      {"bad regex", [&](json& j) { split(j)["pattern"]["Regex"] = "(a"; }, "does not compile"},
      {"lstrip", [](json& j) { j["added_tokens"][0]["lstrip"] = true; }, "lstrip = true"},
      {"rstrip", [](json& j) { j["added_tokens"][0]["rstrip"] = true; }, "rstrip = true"},
      {"single_word", [](json& j) { j["added_tokens"][0]["single_word"] = true; }, "single_word = true"},
      {"empty added", [](json& j) { j["added_tokens"][0]["content"] = ""; }, "empty content"},
      {"added id clash", [](json& j) { j["added_tokens"][0]["content"] = "abc"; }, "the vocabulary has 'abc' as id 5"},
      {"id twice", [](json& j) { j["model"]["vocab"]["ca"] = 9; }, "is both"},
      {"id hole", [](json& j) { j["model"]["vocab"].erase("ca"); }, "no token has id 10"},
      {"merge token", [](json& j) { j["model"]["merges"].push_back(json::array({"c", "b"})); }, "merges[4]"},
      {"merge string", [](json& j) { j["model"]["merges"][0] = "a b c"; }, "merges[0]"},
      {"merge twice", [](json& j) { j["model"]["merges"].push_back(json::array({"a", "b"})); }, "repeats an earlier merge"},
  };
  for (const auto& c : cases) {
    INFO(c.what);
    json j = tiny_tokenizer();
    c.change(j);
    const fs::path p = write_folder(j);
    CHECK_THROWS_WITH(ByteLevelBpeTokenizer(p), Catch::Contains(c.message) && Catch::Contains(p.string()));
  }
  // The "a b" merge spelling of tokenizers before 0.20 reads like the pair.
  json strings = tiny_tokenizer();
  for (auto& m : strings["model"]["merges"]) m = m[0].get<std::string>() + " " + m[1].get<std::string>();
  CHECK(tiny(strings).encode(" ab") == std::vector<int>{3, 4});

  const fs::path missing = test::temp_path("test_ch07_bpe", "missing") / "tokenizer.json";
  CHECK_THROWS_WITH(ByteLevelBpeTokenizer(missing), Catch::Contains("cannot open") && Catch::Contains(missing.string()));
  const fs::path garbage = test::temp_path("test_ch07_bpe", "garbage.json");
  std::ofstream(garbage) << "{\"model\": ";
  CHECK_THROWS_WITH(ByteLevelBpeTokenizer(garbage), Catch::Contains("not valid JSON") && Catch::Contains(garbage.string()));
}

TEST_CASE("byte-level BPE: ids and text identical to Hugging Face tokenizers (fixtures)", "[ch07][bpe]") {
  const fs::path root = fs::path(QLORA_FIXTURES_DIR) / "bpe";
  for (const std::string layout : {"llama3", "gpt2"}) {
    const fs::path dir = layout == "llama3" ? root : root / "gpt2";
    INFO("layout " << layout << " in " << dir.string());
    INFO("missing fixture? " << kFixtureHelp);
    REQUIRE(fs::exists(dir / "tokenizer.json"));
    REQUIRE(fs::exists(dir / "cases.json"));
    const ByteLevelBpeTokenizer tok(dir / "tokenizer.json");
    const json fixture = read_json_file(dir / "cases.json");
    const json& cases = fixture.at("cases");
    REQUIRE(cases.size() > 300);
    int compared = 0;
    for (const json& c : cases) {
      INFO("case " << c.at("name").get<std::string>());
      const auto text = case_text(c);
      const auto ids = tok.encode(text);
      CHECK(ids == c.at("ids").get<std::vector<int>>());
      CHECK(tok.decode(c.at("ids").get<std::vector<int>>()) == c.value("decoded", text));
      ++compared;
    }
    CHECK(compared == static_cast<int>(cases.size()));
    // Every id alone, special ones included (nothing) and half characters (U+FFFD).
    const json& single = fixture.at("single_ids");
    REQUIRE(static_cast<int>(single.size()) == tok.vocab_size());
    for (int id = 0; id < tok.vocab_size(); ++id) {
      INFO("id " << id);
      CHECK(tok.decode({id}) == single[static_cast<std::size_t>(id)].get<std::string>());
    }
  }
}

TEST_CASE("byte-level BPE: the LLaMA-3 fixture has LLaMA-3's special tokens and needs ignore_merges",
          "[ch07][bpe]") {
  const fs::path dir = fs::path(QLORA_FIXTURES_DIR) / "bpe";
  INFO("missing fixture? " << kFixtureHelp);
  REQUIRE(fs::exists(dir / "tokenizer.json"));
  const ByteLevelBpeTokenizer tok(dir / "tokenizer.json");
  const auto bot = tok.special_token_id("<|begin_of_text|>"), eot = tok.special_token_id("<|eot_id|>");
  REQUIRE(bot.has_value());
  REQUIRE(eot.has_value());
  CHECK(tok.bos_id() == *bot);  // from tokenizer_config.json
  CHECK(tok.eos_id() == *eot);
  CHECK(tok.special_token_id("<|start_header_id|>").has_value());
  CHECK(tok.encode("<|begin_of_text|>Hi<|eot_id|>").front() == *bot);

  // Without ignore_merges some fixture cases must come out differently: the fixture
  // tests the flag.
  json j = read_json_file(dir / "tokenizer.json");
  REQUIRE(j.at("model").at("ignore_merges") == true);
  j["model"]["ignore_merges"] = false;
  const ByteLevelBpeTokenizer plain(write_folder(j));
  const json fixture = read_json_file(dir / "cases.json");
  int differ = 0;
  for (const json& c : fixture.at("cases"))
    if (plain.encode(case_text(c)) != c.at("ids").get<std::vector<int>>()) ++differ;
  CHECK(differ > 0);
}
