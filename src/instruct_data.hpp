// Instruction data (chapter 8, "Records" and "Labels"): JSONL files of Alpaca records
// ({"instruction", "input"?, "output"}) or conversations ({"messages": [{"role",
// "content"}, ...]}, the OASST / ShareGPT / TRL shape), one per line, rendered through a
// prompt template (chat_template.hpp) into examples: token ids and labels, the ids
// where a loss is taken and −100 elsewhere, as transformers' collators mark them.
//
// Bad input. A record the file gets wrong (not JSON, a missing or mistyped field, an
// unknown role, a turn order the template cannot render) stops the load with an error
// naming FILE:LINE and the field: a silently dropped record would hide the bug. A
// well-formed record that cannot teach anything is skipped, counted and reported with
// its line: an empty (blank) assistant turn, no token left to learn from, or more than
// seq_len + 1 tokens. Long records are skipped rather than truncated: cut at the end, an
// answer loses its EOS and teaches the model to stop mid-sentence; cut at the start, the
// question is gone.
#pragma once
#include "chat_template.hpp"
#include "tokenizer.hpp"

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

namespace qlora {

/// transformers' ignore index: a label that carries no loss.
constexpr int kIgnoreIndex = -100;

/// One record of a JSONL file and the line it came from.
struct InstructRecord {
  Conversation conversation;
  int line = 0;
};

/// Reads a JSONL file of records (blank lines ignored). Throws std::runtime_error
/// "FILE:LINE: ..." naming the field for a malformed record, or naming the file when it
/// cannot be read or holds no record.
std::vector<InstructRecord> read_instruct_jsonl(const std::filesystem::path& file);

/// One training example: ids[0..n) and labels[0..n) (labels[i] = ids[i] where the loss
/// counts, kIgnoreIndex elsewhere); the model reads ids[0..n-1) and predicts labels[1..n).
struct Example {
  std::vector<int> ids;
  std::vector<int> labels;
  int line = 0;  ///< the record's line in its file
};

/// Records left out of the examples, by reason, with the first few of their lines.
struct SkippedRecords {
  int empty_answer = 0;  ///< an assistant turn (or Alpaca output) that is blank
  int no_loss = 0;       ///< not a single label left (no assistant turn)
  int too_long = 0;      ///< more than seq_len + 1 tokens
  std::vector<int> lines;  ///< the first kMaxLines skipped lines, in file order
  static constexpr std::size_t kMaxLines = 8;
  int total() const { return empty_answer + no_loss + too_long; }
  /// "12 records skipped: 3 with an empty answer, 9 longer than --seq-len 64 (lines 4, 17, ...)",
  /// or "" when none were.
  std::string summary(int seq_len) const;
};

struct ExampleOptions {
  ChatTemplate chat_template = ChatTemplate::llama2;
  bool train_on_inputs = false;  ///< labels on every token, prompt included (still none on padding)
  int seq_len = 64;              ///< an example may have at most seq_len + 1 tokens
};

/// Renders and tokenizes records into examples, skipping (and counting in `skipped`) those
/// described above. Throws std::runtime_error "FILE:LINE: ..." when the template cannot
/// render a record; `file` names the records' file.
std::vector<Example> make_examples(const std::vector<InstructRecord>& records, const Tokenizer& tok,
                                   const ExampleOptions& opt, const std::filesystem::path& file,
                                   SkippedRecords& skipped);

/// The template a file's records get without --template: alpaca when every record is an
/// Alpaca record, else llama2 (the chat format of the LLaMA-2 vocabulary's models).
ChatTemplate default_template(const std::vector<InstructRecord>& records);

}  // namespace qlora
