// Byte-level BPE from a Hugging Face tokenizer.json (chapter 7, "Byte-level BPE"): the
// tokenizer of LLaMA-3 and GPT-2, encoding exactly as the `tokenizers` library does with
// add_special_tokens=False. The steps, in order:
//  1. added tokens (<|begin_of_text|>, <|eot_id|>, ...) are cut out of the text first, the
//     leftmost match first and the longest at a position;
//  2. the rest is pre-tokenized: split by regular expressions (LLaMA-3's Split, or the
//     GPT-2 pattern of ByteLevel with use_regex), each piece's UTF-8 bytes then spelled
//     with GPT-2's byte-to-character map (a space is "Ġ");
//  3. each piece becomes tokens by BPE: a piece that is itself in the vocabulary is one
//     token when ignore_merges is set, else its characters are merged pairwise, always
//     the pair of lowest merge rank (the leftmost of equals) first.
// Every field of tokenizer.json that would change the ids and is not implemented here is
// refused by name: a normalizer, other models, pre-tokenizers and decoders, dropout,
// byte_fallback, added-token stripping flags, truncation and padding.
#pragma once

#include "tokenizer.hpp"

#include <nlohmann/json_fwd.hpp>

#include <array>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace qlora {

/// GPT-2's byte-to-character map, as UTF-8: the printable bytes '!'..'~', '¡'..'¬' and
/// '®'..'ÿ' are their own Latin-1 character; the other 68 bytes (controls, space, DEL,
/// NBSP, soft hyphen) become U+0100, U+0101, ... in byte order, so that every token is
/// printable text without spaces. Space (0x20) is U+0120 "Ġ", newline U+010A "Ċ".
const std::array<std::string, 256>& byte_level_chars();

/// `bytes` spelled with byte_level_chars().
std::string byte_level_spelling(std::string_view bytes);

class ByteLevelBpeTokenizer final : public Tokenizer {
 public:
  /// Reads tokenizer.json, and BOS/EOS from tokenizer_config.json beside it (bos_token,
  /// eos_token: the token's text, or an object with "content"), else from config.json
  /// beside it (bos_token_id, eos_token_id: an id or a list of ids, the first taken).
  /// Throws std::runtime_error naming the file and field when a file is missing or bad,
  /// or when tokenizer.json uses something not implemented here.
  explicit ByteLevelBpeTokenizer(const std::filesystem::path& tokenizer_json);
  ~ByteLevelBpeTokenizer() override;

  int vocab_size() const override { return static_cast<int>(tokens_.size()); }
  /// Text (valid UTF-8, else std::invalid_argument) → ids, as tokenizers' encode(text,
  /// add_special_tokens=False): added tokens in the text are matched, nothing is added.
  std::vector<int> encode(const std::string& text) const override;
  /// Ids → text, special tokens skipped (decode(ids, skip_special_tokens=True)); bytes
  /// that are not valid UTF-8 become U+FFFD, as Rust's String::from_utf8_lossy does.
  std::string decode(const std::vector<int>& ids) const override;
  /// The bytes of `id` (none for a special token). They may end inside a UTF-8
  /// character that the next piece completes. `prev` does not matter: no dummy prefix.
  std::string decode_piece(int prev, int id) const override;
  /// From tokenizer_config.json or config.json; std::runtime_error when neither gives one.
  int bos_id() const override;
  int eos_id() const override;
  std::optional<int> special_token_id(const std::string& text) const override;
  std::string describe() const override { return file_; }

  /// Step 2 alone: the pieces of `text` (no added tokens in it), byte-level spelled.
  std::vector<std::string> pre_tokenize(const std::string& text) const;
  /// The vocabulary entry of `id` (byte-level spelled; an added token's text).
  const std::string& token(int id) const;

  struct Regex;  ///< a compiled PCRE2 pattern (bpe_tokenizer.cpp)

 private:
  /// One step of the pre-tokenizer: split by `regex` (null: none), then spell the pieces
  /// byte-level if `byte_level`.
  struct PreStep {
    std::shared_ptr<const Regex> regex;
    bool byte_level = false;
  };
  struct Added {
    std::string content;
    int id = 0;
  };
  /// A stretch of the text being encoded: an added token, or text still to pre-tokenize.
  struct Segment {
    std::string text;
    int id;  ///< the added token's id, or -1 for text
  };

  std::string file_;                          ///< "tokenizer.json 'PATH'", for messages
  std::vector<std::string> tokens_;           ///< id → token
  std::vector<std::string> bytes_;            ///< id → the bytes it decodes to
  std::vector<bool> special_;                 ///< id → skipped by decode
  std::unordered_map<std::string, int> vocab_;  ///< the model's token → id
  std::unordered_map<std::uint64_t, std::pair<int, int>> merges_;  ///< (left id, right id) → (rank, merged id)
  bool ignore_merges_ = false;
  std::vector<PreStep> pre_steps_;
  std::vector<Added> added_raw_;         ///< matched on the text as it is
  std::vector<Added> added_normalized_;  ///< matched next (the normalizer is null)
  std::array<bool, 256> added_first_byte_{};  ///< the bytes an added token starts with
  std::optional<int> bos_, eos_;
  std::string bos_source_, eos_source_;  ///< where BOS/EOS were looked for, for the error

  // The constructor's parts, in order; each throws naming file_ and the field.
  void place_token(const nlohmann::json& id, const std::string& token, const std::string& where);
  void read_vocabulary(const nlohmann::json& model, const nlohmann::json* added_tokens);
  void read_merges(const nlohmann::json& model);
  void read_pre_tokenizer(const nlohmann::json* pre_tokenizer);
  void read_bos_eos(const std::filesystem::path& dir);
  /// Step 1 for one set of added tokens: cuts them out of the text segments.
  std::vector<Segment> cut_out(const std::vector<Segment>& segments, const std::vector<Added>& set) const;
  std::vector<int> bpe(const std::string& piece) const;
};

}  // namespace qlora
