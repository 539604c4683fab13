// Batches of variable-length examples (chapter 8, "Batches"). Examples are padded on
// the right to the longest of their batch, not to --seq-len: the models take any
// T ≤ seq_len per call, so a batch of short answers costs short sequences. Padding needs
// no attention mask: attention is causal, so a real token never sees a later pad, and a
// pad carries no label. The order is transformers' group_by_length: each epoch a seeded
// permutation, cut into megabatches of up to 50 batches, each sorted longest first, so a
// batch holds examples of about one length and pads little. An epoch's order is a
// function of the seed and the epoch alone, so --resume finds micro-batch k again from
// the step count, with no generator state to save.
#pragma once
#include "instruct_data.hpp"

#include <cstdint>
#include <vector>

namespace qlora {

/// B rows of T inputs x and targets y, row-major; y is kIgnoreIndex where no loss is taken.
struct MicroBatch {
  std::vector<int> x, y;
  int B = 0, T = 0;
  std::int64_t counted = 0;  ///< targets that carry a loss
  int first_row = 0;         ///< a data-parallel rank's share: its first row in the whole micro-batch
};

/// The examples `idx` as one batch, right-padded with `pad_id` to the longest: row b
/// reads ids[0..n-1) and predicts labels[1..n), then pads with target kIgnoreIndex.
MicroBatch pad_batch(const std::vector<Example>& examples, const std::vector<int>& idx, int pad_id);

/// transformers' get_length_grouped_indices: a permutation of `lengths`' indices cut into
/// megabatches of min(n / (4·batch), 50) batches (at least one), each sorted by length,
/// longest first (ties in permutation order); the longest example overall then swaps
/// places with the first megabatch's first, so that the first batch is the largest.
std::vector<int> length_grouped_order(const std::vector<int>& lengths, int batch, const std::vector<int>& permutation);

/// The training order of a set of examples: micro-batch k is the k-th batch of `batch`
/// examples (the last of an epoch may be short) in epoch k / batches_per_epoch().
class ExampleSchedule {
 public:
  ExampleSchedule(std::vector<int> lengths, int batch, std::uint64_t seed, bool group_by_length);
  std::int64_t batches_per_epoch() const { return (static_cast<std::int64_t>(lengths_.size()) + batch_ - 1) / batch_; }
  /// The indices of micro-batch k (k ≥ 0).
  std::vector<int> batch(std::int64_t k);
  /// Epoch e's order of all indices.
  std::vector<int> epoch_order(std::int64_t e) const;

 private:
  std::vector<int> lengths_;
  int batch_;
  std::uint64_t seed_;
  bool group_;
  std::int64_t cached_epoch_ = -1;
  std::vector<int> cached_;
};

}  // namespace qlora
