// Inputs shared by the chapter 8 tests: a made-up tokenizer (a few pieces, longest match
// first, a SentencePiece-like dummy-prefix space and byte tokens for the rest: small
// enough to put a token where a test wants it, across a prompt/answer boundary, say), and
// examples of given lengths whose first part is prompt.
#pragma once

#include "instruct_data.hpp"
#include "model_helpers.hpp"
#include "tokenizer.hpp"

#include <algorithm>
#include <cctype>
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace qlora::test {

/// Ids 0..2 are <unk>, <s>, </s>; then the pieces; then the 256 bytes. `lowercase` makes
/// a normalizing tokenizer, whose pieces do not spell the text back.
class PieceTokenizer final : public Tokenizer {
 public:
  explicit PieceTokenizer(std::vector<std::string> pieces, bool lowercase = false)
      : pieces_(std::move(pieces)), lowercase_(lowercase) {
    pieces_.insert(pieces_.begin(), {"<unk>", "<s>", "</s>"});
  }
  int vocab_size() const override { return static_cast<int>(pieces_.size()) + 256; }
  std::vector<int> encode(const std::string& text) const override {
    std::string s = " " + text;
    if (lowercase_) std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
    std::vector<int> ids;
    for (std::size_t i = 0; i < s.size();) {
      int best = -1;
      std::size_t len = 0;
      for (std::size_t p = 3; p < pieces_.size(); ++p)
        if (pieces_[p].size() > len && s.compare(i, pieces_[p].size(), pieces_[p]) == 0) {
          best = static_cast<int>(p);
          len = pieces_[p].size();
        }
      if (best < 0) {  // one byte, as a byte token
        ids.push_back(static_cast<int>(pieces_.size()) + static_cast<unsigned char>(s[i]));
        ++i;
      } else {
        ids.push_back(best);
        i += len;
      }
    }
    return ids;
  }
  std::string decode(const std::vector<int>& ids) const override {
    std::string s;
    int prev = bos_id();
    for (int id : ids) {
      s += decode_piece(prev, id);
      prev = id;
    }
    return s;
  }
  std::string decode_piece(int prev, int id) const override {
    if (id < 3) return "";
    std::string p = id >= static_cast<int>(pieces_.size())
                        ? std::string(1, static_cast<char>(id - static_cast<int>(pieces_.size())))
                        : pieces_[static_cast<std::size_t>(id)];
    if (prev == bos_id() && !p.empty() && p[0] == ' ') p.erase(0, 1);
    return p;
  }
  int bos_id() const override { return 1; }
  int eos_id() const override { return 2; }
  std::optional<int> special_token_id(const std::string& text) const override {
    for (int id = 0; id < 3; ++id)
      if (pieces_[static_cast<std::size_t>(id)] == text) return id;
    return std::nullopt;
  }
  std::string describe() const override { return "the tests' piece tokenizer"; }

 private:
  std::vector<std::string> pieces_;
  bool lowercase_;
};

/// Examples of the given lengths with seeded ids in [0, vocab); the first
/// prompt_fraction of each is prompt (label kIgnoreIndex), the rest answer.
inline std::vector<Example> labelled_examples(const std::vector<int>& lengths, int vocab, std::uint64_t seed,
                                              double prompt_fraction) {
  std::vector<Example> out;
  for (std::size_t i = 0; i < lengths.size(); ++i) {
    Example e;
    e.ids = random_tokens(lengths[i], vocab, seed + i);
    e.labels = e.ids;
    const auto prompt = static_cast<std::size_t>(prompt_fraction * lengths[i]);
    std::fill(e.labels.begin(), e.labels.begin() + static_cast<std::ptrdiff_t>(prompt), kIgnoreIndex);
    e.line = static_cast<int>(i) + 1;
    out.push_back(std::move(e));
  }
  return out;
}

}  // namespace qlora::test
