// Batches of variable-length examples (chapter 8, "Batches"). See example_batches.hpp.
#include "example_batches.hpp"

#include <algorithm>
#include <random>
#include <stdexcept>

namespace qlora {

//! [pad_batch]
MicroBatch pad_batch(const std::vector<Example>& examples, const std::vector<int>& idx, int pad_id) {
  MicroBatch mb;
  mb.B = static_cast<int>(idx.size());
  for (int i : idx) mb.T = std::max(mb.T, static_cast<int>(examples.at(static_cast<std::size_t>(i)).ids.size()) - 1);
  if (mb.B == 0 || mb.T < 1) throw std::invalid_argument("pad_batch: no example with two tokens or more");
  const auto T = static_cast<std::size_t>(mb.T);
  mb.x.assign(idx.size() * T, pad_id);
  mb.y.assign(idx.size() * T, kIgnoreIndex);
  for (std::size_t b = 0; b < idx.size(); ++b) {
    const Example& e = examples[static_cast<std::size_t>(idx[b])];
    for (std::size_t t = 0; t + 1 < e.ids.size(); ++t) {
      mb.x[b * T + t] = e.ids[t];
      mb.y[b * T + t] = e.labels[t + 1];
      mb.counted += e.labels[t + 1] != kIgnoreIndex;
    }
  }
  return mb;
}
//! [pad_batch]

//! [length_grouped]
std::vector<int> length_grouped_order(const std::vector<int>& lengths, int batch, const std::vector<int>& permutation) {
  const auto n = static_cast<std::ptrdiff_t>(permutation.size());
  const std::ptrdiff_t mult = std::max<std::ptrdiff_t>(1, std::min<std::ptrdiff_t>(n / (4 * batch), 50));
  const std::ptrdiff_t mega = mult * batch;
  std::vector<int> order = permutation;
  auto longer = [&](int a, int b) { return lengths[static_cast<std::size_t>(a)] > lengths[static_cast<std::size_t>(b)]; };
  std::ptrdiff_t longest_mega = 0;
  for (std::ptrdiff_t m = 0; m < n; m += mega) {
    std::stable_sort(order.begin() + m, order.begin() + std::min(n, m + mega), longer);
    if (longer(order[static_cast<std::size_t>(m)], order[static_cast<std::size_t>(longest_mega)])) longest_mega = m;
  }
  if (n > 0) std::swap(order[0], order[static_cast<std::size_t>(longest_mega)]);
  return order;
}
//! [length_grouped]

ExampleSchedule::ExampleSchedule(std::vector<int> lengths, int batch, std::uint64_t seed, bool group_by_length)
    : lengths_(std::move(lengths)), batch_(batch), seed_(seed), group_(group_by_length) {
  if (lengths_.empty()) throw std::invalid_argument("ExampleSchedule: no examples");
  if (batch_ < 1) throw std::invalid_argument("ExampleSchedule: batch must be >= 1");
}

std::vector<int> ExampleSchedule::epoch_order(std::int64_t e) const {
  // Fisher–Yates from a generator seeded by (seed, epoch) only: the same order on every
  // platform (std::shuffle's draws are the library's own), and on every resume.
  std::mt19937_64 rng(seed_ ^ (0x9E3779B97F4A7C15ull * static_cast<std::uint64_t>(e + 1)));
  std::vector<int> perm(lengths_.size());
  for (std::size_t i = 0; i < perm.size(); ++i) perm[i] = static_cast<int>(i);
  for (std::size_t i = perm.size(); i > 1; --i) std::swap(perm[i - 1], perm[rng() % i]);
  return group_ ? length_grouped_order(lengths_, batch_, perm) : perm;
}

std::vector<int> ExampleSchedule::batch(std::int64_t k) {
  const std::int64_t e = k / batches_per_epoch();
  if (e != cached_epoch_) {
    cached_ = epoch_order(e);
    cached_epoch_ = e;
  }
  const auto first = static_cast<std::size_t>((k % batches_per_epoch()) * batch_);
  const auto last = std::min(cached_.size(), first + static_cast<std::size_t>(batch_));
  return {cached_.begin() + static_cast<std::ptrdiff_t>(first), cached_.begin() + static_cast<std::ptrdiff_t>(last)};
}

}  // namespace qlora
