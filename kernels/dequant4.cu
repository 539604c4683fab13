// GPU dequantization, 4-bit -> bf16 (chapter 5). See dequant4.cuh.
// CPU reference: dequantize_4bit_bf16() in src/quant4.cpp.
#include "dequant4.cuh"

#include <cuda_bf16.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace qlora::cuda {

constexpr int kThreads = 256;

//! [dequant-naive]
/// Version 1: one thread per packed byte, i.e. per pair of values. Every thread
/// decodes its block's scale on its own and makes two 2-byte stores. It handles the
/// bytes [byte_begin, byte_end); `out` holds the values from 2·byte_begin on.
__global__ void dequant4_naive_kernel(Quant4View q, __nv_bfloat16* __restrict__ out, std::int64_t byte_begin,
                                      std::int64_t byte_end) {
  const std::int64_t p = byte_begin + static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p >= byte_end) return;
  const std::uint8_t byte = q.packed[p];
  const std::int64_t i = 2 * p;  // the high nibble holds value i, the low nibble value i + 1
  const float absmax = block_absmax_d(q, q.nested_map, i >> q.log2_blocksize);
  __nv_bfloat16* o = out + (i - 2 * byte_begin);
  o[0] = __float2bfloat16_rn(dequant_value_d(q.table[byte >> 4], absmax));
  if (i + 1 < q.numel) o[1] = __float2bfloat16_rn(dequant_value_d(q.table[byte & 0x0f], absmax));
}
//! [dequant-naive]

//! [dequant-vectorized]
constexpr int kChunk = 32;          // values per 16-byte load of codes; a chunk never straddles a block (blocksize >= 32)
constexpr int kLoadsInFlight = 4;   // independent 16-byte loads per thread before the first use

/// Two values of one packed byte as a bf16 pair (the first value in the low half, at the lower address).
static __device__ __forceinline__ std::uint32_t decode_byte(std::uint32_t byte, const float* table, float absmax) {
  const __nv_bfloat162 pair = __floats2bfloat162_rn(dequant_value_d(table[byte >> 4], absmax),
                                                    dequant_value_d(table[byte & 0x0f], absmax));
  return reinterpret_cast<const std::uint32_t&>(pair);
}

/// Version 2: each thread loads kLoadsInFlight chunks of 16 code bytes (32 values)
/// with one instruction each, consecutive threads taking consecutive chunks, decodes
/// each chunk's scale once, and writes each chunk as four 16-byte stores.
__global__ void __launch_bounds__(kThreads)
    dequant4_vectorized_kernel(Quant4View q, uint4* __restrict__ out, std::int64_t num_chunks) {
  __shared__ float s_table[16];
  __shared__ float s_map[256];  // the nested map: looked up at random, so shared memory, not global
  if (threadIdx.x < 16) s_table[threadIdx.x] = q.table[threadIdx.x];
  if (q.double_quant) s_map[threadIdx.x] = q.nested_map[threadIdx.x];  // kThreads == 256
  __syncthreads();

  const auto* codes = reinterpret_cast<const uint4*>(q.packed);
  const std::int64_t first = static_cast<std::int64_t>(blockIdx.x) * kThreads * kLoadsInFlight + threadIdx.x;
  uint4 w[kLoadsInFlight];
  float absmax[kLoadsInFlight];
#pragma unroll
  for (int k = 0; k < kLoadsInFlight; ++k) {  // issue every load before using any
    const std::int64_t c = first + k * kThreads;
    if (c < num_chunks) {
      w[k] = codes[c];
      absmax[k] = block_absmax_d(q, s_map, (c * kChunk) >> q.log2_blocksize);
    }
  }
#pragma unroll
  for (int k = 0; k < kLoadsInFlight; ++k) {
    const std::int64_t c = first + k * kThreads;
    if (c >= num_chunks) continue;
    const std::uint32_t words[4] = {w[k].x, w[k].y, w[k].z, w[k].w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {  // 4 code bytes -> 8 values -> one 16-byte store
      uint4 v;
      v.x = decode_byte(words[j] & 0xff, s_table, absmax[k]);
      v.y = decode_byte((words[j] >> 8) & 0xff, s_table, absmax[k]);
      v.z = decode_byte((words[j] >> 16) & 0xff, s_table, absmax[k]);
      v.w = decode_byte(words[j] >> 24, s_table, absmax[k]);
      out[c * 4 + j] = v;
    }
  }
}
//! [dequant-vectorized]

//! [dequant-coalesced]
constexpr int kWordsPerThread = 4;  // independent 4-byte code loads per thread, all issued before any use
constexpr int kCoalescedBlocksPerSM = 6;  // caps registers at 40: 1536 threads per SM resident

/// Version 3: thread -> output mapping. Word w of the codes (4 bytes, values 8w .. 8w+7)
/// becomes output piece w (16 bytes). Thread t of a block takes words t, t + 256, ...:
/// each load instruction of a warp reads 128 contiguous bytes and each store writes 512,
/// so every 32-byte sector is read or written whole, by one instruction. A word never
/// straddles a block (blocksize >= 32), so its scale is decoded once per 8 values. All
/// loads (codes and raw scales) are issued before the tables are staged and before any
/// of them is used: the block's first memory round trip overlaps its set-up.
__global__ void __launch_bounds__(kThreads, kCoalescedBlocksPerSM)
    dequant4_coalesced_kernel(Quant4View q, uint4* __restrict__ out, std::int64_t num_words) {
  __shared__ float s_table[16];
  __shared__ float s_map[256];
  const auto* words = reinterpret_cast<const std::uint32_t*>(q.packed);
  const std::int64_t first = static_cast<std::int64_t>(blockIdx.x) * kThreads * kWordsPerThread + threadIdx.x;
  std::uint32_t w[kWordsPerThread];
  RawScale scale[kWordsPerThread];
#pragma unroll
  for (int k = 0; k < kWordsPerThread; ++k) {
    // Past the end, re-read the last word (always valid): no branch keeps the loads together.
    const std::int64_t word = min(first + k * kThreads, num_words - 1);
    w[k] = __ldg(words + word);
    scale[k] = load_scale(q, (word * 8) >> q.log2_blocksize);
  }
  if (threadIdx.x < 16) s_table[threadIdx.x] = q.table[threadIdx.x];
  if (q.double_quant) s_map[threadIdx.x] = q.nested_map[threadIdx.x];  // kThreads == 256
  __syncthreads();
#pragma unroll
  for (int k = 0; k < kWordsPerThread; ++k) {
    const std::int64_t word = first + k * kThreads;
    if (word >= num_words) break;
    const float absmax = decode_scale(q, s_map, scale[k]);
    uint4 v;  // byte j of the word -> values 8w + 2j, 8w + 2j + 1 -> 32-bit lane j of the store
    v.x = decode_byte(w[k] & 0xff, s_table, absmax);
    v.y = decode_byte((w[k] >> 8) & 0xff, s_table, absmax);
    v.z = decode_byte((w[k] >> 16) & 0xff, s_table, absmax);
    v.w = decode_byte(w[k] >> 24, s_table, absmax);
    out[word] = v;
  }
}
//! [dequant-coalesced]

static void launch_naive(const Quant4View& v, __nv_bfloat16* out, std::int64_t byte_begin, std::int64_t byte_end,
                         cudaStream_t stream) {
  if (byte_end <= byte_begin) return;
  const auto grid = static_cast<unsigned>((byte_end - byte_begin + kThreads - 1) / kThreads);
  dequant4_naive_kernel<<<grid, kThreads, 0, stream>>>(v, out, byte_begin, byte_end);
  CUDA_CHECK_LAUNCH();
}

static void require_aligned(const void* out, const char* what) {
  if (reinterpret_cast<std::uintptr_t>(out) % 16 != 0) {
    throw std::invalid_argument(std::string(what) + ": the output must be 16-byte aligned");
  }
}

void dequantize4(const DeviceQuant4& q, bf16* out, DequantVersion version, cudaStream_t stream) {
  if (q.numel == 0) return;
  if (out == nullptr) throw std::invalid_argument("dequantize4: output pointer is null");
  const Quant4View v = q.view();
  auto* out_bf16 = reinterpret_cast<__nv_bfloat16*>(out);
  const std::int64_t bytes = (q.numel + 1) / 2;
  switch (version) {
    case DequantVersion::naive: launch_naive(v, out_bf16, 0, bytes, stream); return;
    case DequantVersion::vectorized: {
      require_aligned(out, "dequantize4 (vectorized)");
      const std::int64_t num_chunks = q.numel / kChunk;
      if (num_chunks > 0) {
        const auto grid =
            static_cast<unsigned>((num_chunks + kThreads * kLoadsInFlight - 1) / (kThreads * kLoadsInFlight));
        dequant4_vectorized_kernel<<<grid, kThreads, 0, stream>>>(v, reinterpret_cast<uint4*>(out), num_chunks);
        CUDA_CHECK_LAUNCH();
      }
      // The last numel % 32 values.
      launch_naive(v, out_bf16 + num_chunks * kChunk, num_chunks * kChunk / 2, bytes, stream);
      return;
    }
    case DequantVersion::coalesced: {
      require_aligned(out, "dequantize4 (coalesced)");
      const std::int64_t num_words = q.numel / 8;
      if (num_words > 0) {
        constexpr std::int64_t per_block = kThreads * kWordsPerThread;
        const auto grid = static_cast<unsigned>((num_words + per_block - 1) / per_block);
        dequant4_coalesced_kernel<<<grid, kThreads, 0, stream>>>(v, reinterpret_cast<uint4*>(out), num_words);
        CUDA_CHECK_LAUNCH();
      }
      // The last numel % 8 values (fewer than one word) go to the naive kernel.
      launch_naive(v, out_bf16 + 8 * num_words, 4 * num_words, bytes, stream);
      return;
    }
  }
  throw std::invalid_argument("dequantize4: unknown version " + std::to_string(static_cast<int>(version)));
}

}  // namespace qlora::cuda
