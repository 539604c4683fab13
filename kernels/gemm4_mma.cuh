// The fused 4-bit matmul on tensor cores (chapter 5, "BF16 dequant-matmul on the GPU"):
// Y = X · deq(W)ᵀ for any number of tokens, with W (out × in) in 4 bits (NF4 or FP4,
// with or without double quantization) read straight from its bitsandbytes layout,
// decoded to bf16 in registers and multiplied with mma.sync.m16n8k16 (bf16 inputs,
// float32 accumulation). The weights sit on the M side of the instruction (16 output
// features per tile) and the tokens on the N side (8 per tile), so one to eight tokens
// use a whole instruction's worth of weights and waste only token columns.
// CPU reference: matmul_xwt_ref() (src/matmul.cpp, double accumulation) on
// dequantize_4bit_bf16()'s weights; every weight the kernel multiplies is bit-identical
// to that reference's bf16 value (tests/test_ch05_gpu_kernels.cpp argues the bound).
#pragma once

#include "quant4_device.cuh"

#include <cuda_runtime.h>

#include <string>

namespace qlora::cuda {

/// Empty when gemm4_mma() can run on W, otherwise why not: W must be 2-D with
/// in % 32 == 0 (each lane's 32 weights of a row are one aligned 16-byte load)
/// and out < 2^20 (row tiles fit the grid).
std::string gemm4_mma_unsupported(const DeviceQuant4& W);

/// y[t·out + o] = bf16(Σ_i x[t·in + i] · deq(W)[o·in + i]) for t < tokens, o < out; x (tokens × in)
/// and y (tokens × out) are bf16 in device memory, x 16-byte aligned. Throws std::invalid_argument
/// naming the problem for a W that gemm4_mma_unsupported() refuses, tokens < 0 or a misaligned x.
void gemm4_mma(const DeviceQuant4& W, const bf16* x, bf16* y, int tokens, cudaStream_t stream = nullptr);

}  // namespace qlora::cuda
