// Tokenizers for the LLaMA models (chapter 7, "Tokens"). Three formats:
//  - tokenizer.model: a SentencePiece model, run by the SentencePiece library itself
//    (what Hugging Face's LlamaTokenizer does);
//  - tokenizer.bin: llama2.c's export of the same vocabulary (max_token_length int32,
//    then per token: float32 score, int32 length, the UTF-8 bytes), with llama2.c's
//    greedy BPE-merge encoder;
//  - tokenizer.json: Hugging Face's byte-level BPE (LLaMA-3), in bpe_tokenizer.hpp.
// No encoder adds BOS: the caller puts bos_id() in front (1 for LLaMA-2). The first two add SentencePiece's
// "dummy prefix" (a leading space, shown as ▁) to the text, and both fall back to the
// byte tokens <0x00>..<0xFF> (ids 3..258 in the LLaMA vocabulary) for characters that
// have no piece. How the llama2.c encoder differs from SentencePiece is spelled out
// in Llama2cTokenizer.
#pragma once

#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace qlora {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  virtual int vocab_size() const = 0;
  /// Text → ids, without BOS/EOS.
  virtual std::vector<int> encode(const std::string& text) const = 0;
  /// Ids → text (a BOS/EOS id yields nothing; the dummy-prefix space is dropped).
  virtual std::string decode(const std::vector<int>& ids) const = 0;
  /// The text one id adds after `prev` when streaming (dummy-prefix space dropped after BOS).
  virtual std::string decode_piece(int prev, int id) const = 0;
  /// Beginning and end of sequence: 1 and 2 in LLaMA-2's vocabulary, 128000 and 128001
  /// (or 128009, `<|eot_id|>`, for instruction models) in LLaMA-3's.
  virtual int bos_id() const = 0;
  virtual int eos_id() const = 0;
  /// The id of the special (control) token written `text`, e.g. `<|eot_id|>` or `</s>`.
  virtual std::optional<int> special_token_id(const std::string& text) const = 0;
  /// What it was read from, for messages: "SentencePiece model 'PATH'".
  virtual std::string describe() const = 0;
};

/// tokenizer.model through sentencepiece::SentencePieceProcessor.
class SentencePieceTokenizer final : public Tokenizer {
 public:
  /// Throws std::runtime_error naming the file when it is missing or not a SentencePiece model.
  explicit SentencePieceTokenizer(const std::filesystem::path& model_file);
  ~SentencePieceTokenizer() override;
  int vocab_size() const override;
  std::vector<int> encode(const std::string& text) const override;
  std::string decode(const std::vector<int>& ids) const override;
  std::string decode_piece(int prev, int id) const override;
  /// The model's own (1 and 2 for LLaMA); std::runtime_error when it has none.
  int bos_id() const override;
  int eos_id() const override;
  std::optional<int> special_token_id(const std::string& text) const override;
  std::string describe() const override;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

/// llama2.c's tokenizer.bin and its encoder (run.c's encode()).
/// Differences from SentencePiece's BPE:
///  - merges are chosen greedily by the score stored per piece (the merge producing the
///    highest-scoring piece first), which is SentencePiece's BPE rule too, so for the
///    LLaMA vocabulary the two agree on ordinary text; but
///  - no text normalization (SentencePiece's model applies its normalizer rules, e.g. to
///    whitespace runs), and
///  - the dummy prefix is added only to non-empty text, as run.c does.
/// The tests compare both encoders on real text.
class Llama2cTokenizer final : public Tokenizer {
 public:
  /// Throws std::runtime_error naming the file when it is missing, truncated or has
  /// impossible lengths. vocab_size must be given: the file does not store it.
  Llama2cTokenizer(const std::filesystem::path& bin_file, int vocab_size = 32000);
  int vocab_size() const override { return static_cast<int>(pieces_.size()); }
  std::vector<int> encode(const std::string& text) const override;
  std::string decode(const std::vector<int>& ids) const override;
  std::string decode_piece(int prev, int id) const override;
  /// llama2.c's vocabulary is LLaMA-2's: `<unk>`, `<s>`, `</s>` first.
  int bos_id() const override { return 1; }
  int eos_id() const override { return 2; }
  /// `<unk>`, `<s>` or `</s>`: the only special pieces of the vocabulary.
  std::optional<int> special_token_id(const std::string& text) const override;
  std::string describe() const override { return file_; }
  const std::string& piece(int id) const;
  float score(int id) const;

 private:
  std::string file_;  ///< "llama2.c tokenizer 'PATH'", for messages
  std::vector<std::string> pieces_;
  std::vector<float> scores_;
  std::vector<int> sorted_;  ///< ids sorted by piece, for lookup
  int lookup(const std::string& s) const;
};

/// Picks by file: "*.model" → SentencePiece, "*.bin" → llama2.c, "*.json" → byte-level BPE;
/// a directory → its tokenizer.model, else its tokenizer.json.
std::unique_ptr<Tokenizer> load_tokenizer(const std::filesystem::path& path);

}  // namespace qlora
