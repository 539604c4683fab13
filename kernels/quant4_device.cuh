// A 4-bit tensor in device memory (chapter 5, "BF16 dequant-matmul on the GPU"):
// the same format as Quant4Tensor (src/quant4.hpp, chapter 3), with each array in
// its own device buffer, and the per-element arithmetic that every GPU kernel of
// chapter 5 shares. Those device functions repeat, operation for operation, what
// block_absmax() and dequantize_4bit_f32() in src/quant4.cpp do, so the GPU bytes
// equal the CPU bytes.
#pragma once

#include "device_buffer.cuh"
#include "quant4.hpp"

#include <cstdint>
#include <vector>

namespace qlora::cuda {

/// What a kernel needs to read a 4-bit tensor: raw device pointers, passed by value.
struct Quant4View {
  const std::uint8_t* packed = nullptr;       ///< (numel + 1) / 2 bytes, first element in the high nibble
  const float* absmax = nullptr;              ///< float32 per block (without double quantization)
  const std::uint8_t* absmax_code = nullptr;  ///< uint8 code per block (with double quantization)
  const float* nested_absmax = nullptr;       ///< float32 per 256 codes (with double quantization)
  const float* table = nullptr;               ///< the 16 values of the 4-bit type (NF4 or FP4)
  const float* nested_map = nullptr;          ///< the 256 values of the signed dynamic map
  float offset = 0.0f;                        ///< the mean removed before double quantization
  std::int64_t numel = 0;
  int blocksize = 64;
  int log2_blocksize = 6;
  bool double_quant = false;
};

/// The owner of a 4-bit tensor's device arrays. Copies are explicit (clone()).
class DeviceQuant4 {
 public:
  QuantType type = QuantType::nf4;
  int blocksize = 64;
  std::vector<std::int64_t> shape;
  std::int64_t numel = 0;
  bool double_quant = false;
  float offset = 0.0f;

  DeviceBuffer<std::uint8_t> packed;
  DeviceBuffer<float> absmax;             ///< without double quantization
  DeviceBuffer<std::uint8_t> absmax_code;  ///< with double quantization
  DeviceBuffer<float> nested_absmax;       ///< with double quantization
  DeviceBuffer<float> table;               ///< 16 values: nf4_table or fp4_table
  DeviceBuffer<float> nested_map;          ///< 256 values: dynamic_map(true)

  /// Device arrays of the right sizes for this format, contents undefined (the
  /// tests poison them); the two value tables are filled in.
  static DeviceQuant4 allocate(QuantType type, int blocksize, std::vector<std::int64_t> shape, bool double_quant);
  /// Copies a CPU-quantized tensor to the device. Throws std::invalid_argument
  /// when its arrays do not have the sizes its format implies.
  static DeviceQuant4 upload(const Quant4Tensor& q);
  /// Copies the tensor back into the CPU format (synchronous).
  Quant4Tensor download() const;
  /// A deep copy in fresh device buffers (the benchmark rotates copies to defeat the L2 cache).
  DeviceQuant4 clone() const;

  std::int64_t num_blocks() const { return (numel + blocksize - 1) / blocksize; }
  /// Bytes a full read of the tensor moves: packed codes plus the stored scales.
  std::int64_t storage_bytes() const;
  /// Rows and columns of a 2-D weight; throws std::invalid_argument naming `what` otherwise.
  std::int64_t rows(const char* what) const;
  std::int64_t cols(const char* what) const;

  Quant4View view() const;
};

}  // namespace qlora::cuda

#ifdef __CUDACC__
#include <cfloat>

namespace qlora::cuda {

/// flush_subnormal() of src/quant_basics.cpp: bitsandbytes' fast-math build flushes
/// subnormal float32 values to signed zero, so the reference does, so we do.
__device__ __forceinline__ float flush_subnormal_d(float x) { return fabsf(x) < FLT_MIN ? copysignf(0.0f, x) : x; }

//! [device-block-absmax]
/// block_absmax() of src/quant4.cpp for block b: with double quantization the
/// 8-bit code is dequantized (a float32 multiply, flushed) and the offset added
/// in a separate float32 add. The _rn intrinsics keep nvcc from fusing the two
/// into one FMA, which would round once instead of twice and change the bytes.
__device__ __forceinline__ float block_absmax_d(const Quant4View& q, const float* nested_map, std::int64_t b) {
  if (!q.double_quant) return q.absmax[b];
  const float scaled = flush_subnormal_d(__fmul_rn(nested_map[q.absmax_code[b]], q.nested_absmax[b >> 8]));
  return __fadd_rn(scaled, q.offset);
}

/// dequantize_4bit_f32(): table value times block absmax, one float32 multiply.
__device__ __forceinline__ float dequant_value_d(float table_value, float absmax) {
  return flush_subnormal_d(__fmul_rn(table_value, absmax));
}
//! [device-block-absmax]

}  // namespace qlora::cuda
#endif
