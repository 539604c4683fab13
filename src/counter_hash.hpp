// A counter-based random number: the i-th value of a stream is a hash of (seed, i), so
// any thread can make its own element with no shared generator state, and the CPU and
// the GPU make the same numbers. splitmix64 (Steele et al., 2014) is the hash: its
// finalizer mixes every input bit into every output bit. LoRA dropout masks (chapter 4)
// and the random models of `qlora bench train` (chapter 7) draw from it.
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define QLORA_HASH_HD __host__ __device__
#else
#define QLORA_HASH_HD
#endif

namespace qlora {

//! [counter-hash]
/// The i-th 64-bit value of the stream `seed` (i = 0, 1, 2, ...).
QLORA_HASH_HD inline std::uint64_t counter_hash(std::uint64_t seed, std::uint64_t i) {
  std::uint64_t z = seed + (i + 1) * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
//! [counter-hash]

//! [counter-skip]
/// The seed of the stream that starts k values further on: counter_hash(seed, i + k) ==
/// counter_hash(counter_skip(seed, k), i), since the hash reads seed + (i+1)·φ. A
/// data-parallel rank makes its rows' part of a whole batch's dropout mask with it.
QLORA_HASH_HD inline std::uint64_t counter_skip(std::uint64_t seed, std::uint64_t k) {
  return seed + k * 0x9E3779B97F4A7C15ull;
}
//! [counter-skip]

}  // namespace qlora
