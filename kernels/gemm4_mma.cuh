// The fused 4-bit matmul on tensor cores (chapter 5, "BF16 dequant-matmul on the GPU"):
// Y = X · deq(W)ᵀ for any number of tokens, with W (out × in) in 4 bits (NF4 or FP4,
// with or without double quantization) read straight from its bitsandbytes layout,
// decoded to bf16 in registers and multiplied with mma.sync.m16n8k16 (bf16 inputs,
// float32 accumulation). The weights sit on the M side of the instruction (16 output
// features per tile) and the tokens on the N side (8 per tile), so one to eight tokens
// use a whole instruction's worth of weights and waste only token columns.
// CPU reference: matmul_xwt_ref() (src/matmul.cpp, double accumulation) on
// dequantize_4bit_bf16()'s weights; in version 1 every weight the kernel multiplies is
// bit-identical to that reference's bf16 value, versions 2 and 3 trade that for speed
// (tests/test_ch05_gpu_kernels.cpp argues the bounds).
#pragma once

#include "linear4.cuh"
#include "quant4_device.cuh"

#include <cuda_runtime.h>

#include <string>

namespace qlora::cuda {

/// The three numbered versions. exact (1): every weight multiplied is dequantize_4bit_bf16()'s,
/// bit for bit (table value times absmax in float32, rounded to bf16). register_table (2): the
/// table lookup in registers and the block scale applied to each 64-wide tile's partial sums,
/// so the weight multiplied is bf16(table value)·absmax: fewer instructions per weight, a
/// bf16-sized difference per weight from version 1 (tests/test_ch05_gpu_kernels.cpp bounds it).
/// pair_table (3): version 2's arithmetic, with each code byte looked up as its bf16 pair in a
/// per-lane table in shared memory, and the units of work spread evenly over every warp of the GPU
/// (row tiles that warps share are added by the last one, through an Mma3Workspace).
enum class MmaVersion { exact = 1, register_table = 2, pair_table = 3 };

/// Version 3's scratch in device memory: the partial sums of row tiles that several warps share,
/// and a counter per row tile, zero between launches (the last warp of a row tile sets it back).
/// One per stream: two launches at once must not share it.
class Mma3Workspace {
 public:
  /// Room for `floats` partial sums and `counters` counters: grows, never shrinks, and
  /// synchronizes the device when it grows (so not inside a CUDA graph capture).
  void reserve(std::int64_t floats, std::int64_t counters);
  float* partials() { return partials_.data(); }
  unsigned* counters() { return counters_.data(); }
  std::size_t bytes() const { return partials_.bytes() + counters_.bytes(); }

 private:
  DeviceBuffer<float> partials_;
  DeviceBuffer<unsigned> counters_;
};

/// Empty when gemm4_mma() can run `version` on W, otherwise why not: W must be 2-D, out < 2^20
/// (row tiles fit the grid) and in % 32 == 0 (each lane's 32 weights of a row are one aligned
/// 16-byte load); versions 2 and 3 need in % 64 == 0 and blocks of at least 64 (a tile, one
/// scale), version 3 also in % blocksize == 0.
std::string gemm4_mma_unsupported(const DeviceQuant4& W, MmaVersion version = MmaVersion::exact);

/// y[t·out + o] = Σ_i x[t·in + i] · deq(W)[o·in + i] for t < tokens, o < out, as bf16 or float32
/// (y_type); x (tokens × in, bf16) and y (tokens × out) in device memory, x 16-byte aligned.
/// Throws std::invalid_argument naming the problem for a W that gemm4_mma_unsupported() refuses,
/// tokens < 0 or a misaligned x.
/// Version 3 needs `workspace`.
void gemm4_mma(const DeviceQuant4& W, const bf16* x, void* y, OutType y_type, int tokens,
               MmaVersion version = MmaVersion::exact, cudaStream_t stream = nullptr,
               Mma3Workspace* workspace = nullptr);

}  // namespace qlora::cuda
