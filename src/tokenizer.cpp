// Tokenizers (chapter 7, "Tokens"). See tokenizer.hpp.
#include "tokenizer.hpp"

#include "bpe_tokenizer.hpp"

#include <sentencepiece_processor.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <stdexcept>

namespace qlora {

namespace {

// The text of one piece when streaming, as llama2.c's decode() renders it: the
// dummy-prefix space after BOS is dropped and a byte token <0xNN> is that byte.
// `piece` already has SentencePiece's ▁ replaced by a space.
std::string render_piece(std::string piece, bool after_bos) {
  if (after_bos && !piece.empty() && piece[0] == ' ') piece.erase(0, 1);
  unsigned byte = 0;
  char tail = 0;
  if (piece.size() == 6 && std::sscanf(piece.c_str(), "<0x%02X>%c", &byte, &tail) == 1)
    return std::string(1, static_cast<char>(byte));
  return piece;
}

std::string replace_all(std::string s, const std::string& from, const std::string& to) {
  for (std::size_t i = s.find(from); i != std::string::npos; i = s.find(from, i + to.size())) s.replace(i, from.size(), to);
  return s;
}

}  // namespace

// ---------------------------------------------------------------------------
// SentencePiece

struct SentencePieceTokenizer::Impl {
  sentencepiece::SentencePieceProcessor sp;
  std::string file;  ///< "SentencePiece model 'PATH'", for messages
};

SentencePieceTokenizer::SentencePieceTokenizer(const std::filesystem::path& model_file) : impl_(std::make_unique<Impl>()) {
  if (!std::filesystem::is_regular_file(model_file))
    throw std::runtime_error("tokenizer model '" + model_file.string() + "' not found");
  const auto status = impl_->sp.Load(model_file.string());
  if (!status.ok())
    throw std::runtime_error("cannot load SentencePiece model '" + model_file.string() + "': " + status.ToString());
  impl_->file = "SentencePiece model '" + model_file.string() + "'";
}

SentencePieceTokenizer::~SentencePieceTokenizer() = default;

int SentencePieceTokenizer::vocab_size() const { return impl_->sp.GetPieceSize(); }

std::vector<int> SentencePieceTokenizer::encode(const std::string& text) const {
  std::vector<int> ids;
  const auto status = impl_->sp.Encode(text, &ids);
  if (!status.ok()) throw std::runtime_error("SentencePiece encode failed: " + status.ToString());
  return ids;
}

std::string SentencePieceTokenizer::decode(const std::vector<int>& ids) const {
  for (int id : ids)
    if (id < 0 || id >= vocab_size()) throw std::out_of_range("decode: token id " + std::to_string(id) + " out of range");
  std::string text;
  const auto status = impl_->sp.Decode(ids, &text);
  if (!status.ok()) throw std::runtime_error("SentencePiece decode failed: " + status.ToString());
  return text;
}

std::string SentencePieceTokenizer::decode_piece(int prev, int id) const {
  if (id < 0 || id >= vocab_size()) throw std::out_of_range("decode: token id " + std::to_string(id) + " out of range");
  if (impl_->sp.IsControl(id)) return "";
  return render_piece(replace_all(impl_->sp.IdToPiece(id), "\u2581", " "), prev == bos_id());
}

int SentencePieceTokenizer::bos_id() const {
  if (const int id = impl_->sp.bos_id(); id >= 0) return id;
  throw std::runtime_error("the SentencePiece model has no BOS piece");
}

int SentencePieceTokenizer::eos_id() const {
  if (const int id = impl_->sp.eos_id(); id >= 0) return id;
  throw std::runtime_error("the SentencePiece model has no EOS piece");
}

std::optional<int> SentencePieceTokenizer::special_token_id(const std::string& text) const {
  const int id = impl_->sp.PieceToId(text);  // the unknown piece's id when there is no such piece
  if (impl_->sp.IdToPiece(id) != text || !(impl_->sp.IsControl(id) || impl_->sp.IsUnknown(id))) return std::nullopt;
  return id;
}

std::string SentencePieceTokenizer::describe() const { return impl_->file; }

// ---------------------------------------------------------------------------
// llama2.c tokenizer.bin

Llama2cTokenizer::Llama2cTokenizer(const std::filesystem::path& bin_file, int vocab_size)
    : file_("llama2.c tokenizer '" + bin_file.string() + "'") {
  std::ifstream in(bin_file, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + file_);
  if (vocab_size <= 0) throw std::invalid_argument(file_ + ": vocab_size must be positive");
  std::int32_t max_len = 0;
  if (!in.read(reinterpret_cast<char*>(&max_len), sizeof max_len)) throw std::runtime_error(file_ + ": empty file");
  if (max_len <= 0 || max_len > 1024) throw std::runtime_error(file_ + ": impossible max_token_length " + std::to_string(max_len));
  pieces_.resize(static_cast<std::size_t>(vocab_size));
  scores_.resize(static_cast<std::size_t>(vocab_size));
  for (int i = 0; i < vocab_size; ++i) {
    std::int32_t len = 0;
    if (!in.read(reinterpret_cast<char*>(&scores_[i]), sizeof(float)) || !in.read(reinterpret_cast<char*>(&len), sizeof len))
      throw std::runtime_error(file_ + ": truncated at token " + std::to_string(i) + " of " + std::to_string(vocab_size));
    if (len < 0 || len > max_len)
      throw std::runtime_error(file_ + ": token " + std::to_string(i) + " has length " + std::to_string(len) +
                               " (max_token_length " + std::to_string(max_len) + ")");
    pieces_[i].resize(static_cast<std::size_t>(len));
    if (!in.read(pieces_[i].data(), len))
      throw std::runtime_error(file_ + ": truncated in the bytes of token " + std::to_string(i));
  }
  if (in.peek() != std::char_traits<char>::eof())
    throw std::runtime_error(file_ + ": bytes left after " + std::to_string(vocab_size) + " tokens (wrong vocab_size?)");
  sorted_.resize(pieces_.size());
  for (std::size_t i = 0; i < sorted_.size(); ++i) sorted_[i] = static_cast<int>(i);
  std::stable_sort(sorted_.begin(), sorted_.end(), [&](int a, int b) { return pieces_[a] < pieces_[b]; });
}

const std::string& Llama2cTokenizer::piece(int id) const {
  if (id < 0 || id >= vocab_size()) throw std::out_of_range("token id " + std::to_string(id) + " out of range");
  return pieces_[static_cast<std::size_t>(id)];
}

float Llama2cTokenizer::score(int id) const {
  piece(id);  // range check
  return scores_[static_cast<std::size_t>(id)];
}

int Llama2cTokenizer::lookup(const std::string& s) const {
  const auto it = std::lower_bound(sorted_.begin(), sorted_.end(), s, [&](int id, const std::string& key) {
    return pieces_[static_cast<std::size_t>(id)] < key;
  });
  return it != sorted_.end() && pieces_[static_cast<std::size_t>(*it)] == s ? *it : -1;
}

std::optional<int> Llama2cTokenizer::special_token_id(const std::string& text) const {
  const int id = lookup(text);
  if (id < 0 || id > eos_id()) return std::nullopt;
  return id;
}

//! [llama2c-encode]
std::vector<int> Llama2cTokenizer::encode(const std::string& text) const {
  std::vector<int> ids;
  if (text.empty()) return ids;
  // SentencePiece's dummy prefix: the text is encoded as if it began with a space.
  if (int sp = lookup(" "); sp >= 0) ids.push_back(sp);
  // 1. One token per UTF-8 character; a character with no piece falls back to its
  //    bytes, token <0xNN> = id NN + 3 (after <unk>, <s>, </s>).
  for (std::size_t i = 0; i < text.size();) {
    std::size_t n = 1;
    while (i + n < text.size() && n < 4 && (static_cast<unsigned char>(text[i + n]) & 0xC0) == 0x80) ++n;
    const std::string ch = text.substr(i, n);
    if (int id = lookup(ch); id >= 0)
      ids.push_back(id);
    else
      for (unsigned char b : ch) ids.push_back(static_cast<int>(b) + 3);
    i += n;
  }
  // 2. Repeatedly merge the adjacent pair whose concatenation is the highest-scoring piece.
  while (true) {
    float best = -1e30f;
    int best_id = -1;
    std::size_t best_i = 0;
    for (std::size_t i = 0; i + 1 < ids.size(); ++i) {
      const int id = lookup(pieces_[static_cast<std::size_t>(ids[i])] + pieces_[static_cast<std::size_t>(ids[i + 1])]);
      if (id >= 0 && scores_[static_cast<std::size_t>(id)] > best) {
        best = scores_[static_cast<std::size_t>(id)];
        best_id = id;
        best_i = i;
      }
    }
    if (best_id < 0) break;
    ids[best_i] = best_id;
    ids.erase(ids.begin() + static_cast<std::ptrdiff_t>(best_i) + 1);
  }
  return ids;
}
//! [llama2c-encode]

std::string Llama2cTokenizer::decode_piece(int prev, int id) const {
  if (id == bos_id() || id == eos_id()) return "";
  return render_piece(piece(id), prev == bos_id());
}

std::string Llama2cTokenizer::decode(const std::vector<int>& ids) const {
  std::string text;
  int prev = bos_id();  // the first piece's dummy-prefix space is dropped, as SentencePiece does
  for (int id : ids) {
    text += decode_piece(prev, id);
    prev = id;
  }
  return text;
}

std::unique_ptr<Tokenizer> load_tokenizer(const std::filesystem::path& path) {
  if (std::filesystem::is_directory(path)) {
    if (std::filesystem::exists(path / "tokenizer.model") || !std::filesystem::exists(path / "tokenizer.json"))
      return std::make_unique<SentencePieceTokenizer>(path / "tokenizer.model");
    return std::make_unique<ByteLevelBpeTokenizer>(path / "tokenizer.json");
  }
  if (path.extension() == ".bin") return std::make_unique<Llama2cTokenizer>(path);
  if (path.extension() == ".json") return std::make_unique<ByteLevelBpeTokenizer>(path);
  return std::make_unique<SentencePieceTokenizer>(path);
}

}  // namespace qlora
