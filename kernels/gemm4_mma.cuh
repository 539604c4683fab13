// The fused 4-bit matmul on tensor cores (chapter 5, "BF16 dequant-matmul on the GPU"):
// Y = X · deq(W)ᵀ for any number of tokens, with W (out × in) in 4 bits (NF4 or FP4,
// with or without double quantization) read straight from its bitsandbytes layout,
// decoded to bf16 in registers and multiplied with mma.sync.m16n8k16 (bf16 inputs,
// float32 accumulation). The weights sit on the M side of the instruction (16 output
// features per tile) and the tokens on the N side (8 per tile), so one to eight tokens
// use a whole instruction's worth of weights and waste only token columns.
// CPU reference: matmul_xwt_ref() (src/matmul.cpp, double accumulation) on
// dequantize_4bit_bf16()'s weights; in version 1 every weight the kernel multiplies is
// bit-identical to that reference's bf16 value, version 2 trades that for speed
// (tests/test_ch05_gpu_kernels.cpp argues both bounds).
#pragma once

#include "linear4.cuh"
#include "quant4_device.cuh"

#include <cuda_runtime.h>

#include <string>

namespace qlora::cuda {

/// The two numbered versions. exact (1): every weight multiplied is dequantize_4bit_bf16()'s,
/// bit for bit (table value times absmax in float32, rounded to bf16). register_table (2): the
/// table lookup in registers and the block scale applied to each 64-wide tile's partial sums,
/// so the weight multiplied is bf16(table value)·absmax: fewer instructions per weight, a
/// bf16-sized difference per weight from version 1 (tests/test_ch05_gpu_kernels.cpp bounds it).
enum class MmaVersion { exact = 1, register_table = 2 };

/// Empty when gemm4_mma() can run `version` on W, otherwise why not: W must be 2-D, out < 2^20
/// (row tiles fit the grid) and in % 32 == 0 (each lane's 32 weights of a row are one aligned
/// 16-byte load); version 2 needs in % 64 == 0 and blocks of at least 64 (a tile, one scale).
std::string gemm4_mma_unsupported(const DeviceQuant4& W, MmaVersion version = MmaVersion::exact);

/// y[t·out + o] = Σ_i x[t·in + i] · deq(W)[o·in + i] for t < tokens, o < out, as bf16 or float32
/// (y_type); x (tokens × in, bf16) and y (tokens × out) in device memory, x 16-byte aligned.
/// Throws std::invalid_argument naming the problem for a W that gemm4_mma_unsupported() refuses,
/// tokens < 0 or a misaligned x.
void gemm4_mma(const DeviceQuant4& W, const bf16* x, void* y, OutType y_type, int tokens,
               MmaVersion version = MmaVersion::exact, cudaStream_t stream = nullptr);

}  // namespace qlora::cuda
