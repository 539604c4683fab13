// GPU dequantization of a 4-bit tensor (NF4 or FP4, with or without double
// quantization) to bf16 (chapter 5, "BF16 dequant-matmul on the GPU"). CPU
// reference: dequantize_4bit_bf16() in src/quant4.cpp; every version is
// byte-identical to it (tests/test_ch05_gpu_kernels.cpp).
//
// Version 1 is the obvious kernel: one thread per packed byte. Version 2 reads
// 16 bytes of codes per thread and keeps the tables in shared memory, but each
// thread writes its 64 output bytes itself, so every store instruction of a warp
// covers only half of each 32-byte sector it touches (as do version 1's 2-byte
// stores). Version 3 maps threads to *output*: consecutive lanes write consecutive
// 16-byte pieces, so a warp's store fills 512 contiguous bytes, and each thread
// reads the 4 code bytes behind its piece (a warp's load: 128 contiguous bytes).
#pragma once

#include "quant4_device.cuh"

#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace qlora::cuda {

enum class DequantVersion { naive = 1, vectorized = 2, coalesced = 3 };

/// out[i] = bf16(table[code_i] * absmax[i / blocksize]) for all q.numel values.
/// `out` is device memory for q.numel bf16 values (16-byte aligned for versions 2
/// and 3). Asynchronous on `stream`.
void dequantize4(const DeviceQuant4& q, bf16* out, DequantVersion version = DequantVersion::coalesced,
                 cudaStream_t stream = nullptr);

}  // namespace qlora::cuda

#ifdef __CUDACC__
namespace qlora::cuda {

//! [scale-split]
/// A block scale split in two halves: the loads (issued early, with the code loads)
/// and the arithmetic (done once the loads have landed and the nested map is in
/// shared memory). Together they are block_absmax_d(), operation for operation.
struct RawScale {
  float value = 0.0f;       ///< absmax[b] (no double quantization) or nested_absmax[b / 256]
  std::uint32_t code = 0;  ///< absmax_code[b] (double quantization)
};

__device__ __forceinline__ RawScale load_scale(const Quant4View& q, std::int64_t block) {
  RawScale s;
  if (q.double_quant) {
    s.code = __ldg(q.absmax_code + block);
    s.value = __ldg(q.nested_absmax + (block >> 8));
  } else {
    s.value = __ldg(q.absmax + block);
  }
  return s;
}

__device__ __forceinline__ float decode_scale(const Quant4View& q, const float* nested_map, RawScale s) {
  if (!q.double_quant) return s.value;
  return __fadd_rn(flush_subnormal_d(__fmul_rn(nested_map[s.code], s.value)), q.offset);
}
//! [scale-split]

/// The same two halves with q.double_quant known at compile time (kDoubleQuant must equal it), for
/// a kernel whose inner loop cannot afford both ways predicated.
template <bool kDoubleQuant>
__device__ __forceinline__ RawScale load_scale_as(const Quant4View& q, std::int64_t block) {
  Quant4View known = q;
  known.double_quant = kDoubleQuant;
  return load_scale(known, block);
}
template <bool kDoubleQuant>
__device__ __forceinline__ float decode_scale_as(const Quant4View& q, const float* nested_map, RawScale s) {
  Quant4View known = q;
  known.double_quant = kDoubleQuant;
  return decode_scale(known, nested_map, s);
}

/// An output value of the matmul kernels (GEMV, tensor-core matmul), stored as bf16 or as
/// float32 (the model adds its LoRA path to a float32 y).
__device__ __forceinline__ void store_y(__nv_bfloat16* y, std::int64_t i, float v) { y[i] = __float2bfloat16_rn(v); }
__device__ __forceinline__ void store_y(float* y, std::int64_t i, float v) { y[i] = v; }

}  // namespace qlora::cuda
#endif
