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
/// decodes its block's scale on its own and makes two 2-byte stores.
__global__ void dequant4_naive_kernel(Quant4View q, __nv_bfloat16* __restrict__ out, std::int64_t byte_begin,
                                      std::int64_t byte_end) {
  const std::int64_t p = byte_begin + static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p >= byte_end) return;
  const std::uint8_t byte = q.packed[p];
  const std::int64_t i = 2 * p;  // the high nibble holds value i, the low nibble value i + 1
  const float absmax = block_absmax_d(q, q.nested_map, i >> q.log2_blocksize);
  out[i] = __float2bfloat16_rn(dequant_value_d(q.table[byte >> 4], absmax));
  if (i + 1 < q.numel) out[i + 1] = __float2bfloat16_rn(dequant_value_d(q.table[byte & 0x0f], absmax));
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

static void launch_naive(const Quant4View& v, __nv_bfloat16* out, std::int64_t byte_begin, std::int64_t byte_end,
                         cudaStream_t stream) {
  if (byte_end <= byte_begin) return;
  const auto grid = static_cast<unsigned>((byte_end - byte_begin + kThreads - 1) / kThreads);
  dequant4_naive_kernel<<<grid, kThreads, 0, stream>>>(v, out, byte_begin, byte_end);
  CUDA_CHECK_LAUNCH();
}

void dequantize4(const DeviceQuant4& q, bf16* out, DequantVersion version, cudaStream_t stream) {
  if (q.numel == 0) return;
  if (out == nullptr) throw std::invalid_argument("dequantize4: output pointer is null");
  const Quant4View v = q.view();
  auto* out_bf16 = reinterpret_cast<__nv_bfloat16*>(out);
  const std::int64_t bytes = (q.numel + 1) / 2;
  if (version == DequantVersion::naive) {
    launch_naive(v, out_bf16, 0, bytes, stream);
    return;
  }
  if (reinterpret_cast<std::uintptr_t>(out) % 16 != 0) {
    throw std::invalid_argument("dequantize4 (vectorized): the output must be 16-byte aligned");
  }
  const std::int64_t num_chunks = q.numel / kChunk;
  if (num_chunks > 0) {
    const auto grid = static_cast<unsigned>((num_chunks + kThreads * kLoadsInFlight - 1) / (kThreads * kLoadsInFlight));
    dequant4_vectorized_kernel<<<grid, kThreads, 0, stream>>>(v, reinterpret_cast<uint4*>(out), num_chunks);
    CUDA_CHECK_LAUNCH();
  }
  launch_naive(v, out_bf16, num_chunks * kChunk / 2, bytes, stream);  // the last numel % 32 values
}

}  // namespace qlora::cuda
