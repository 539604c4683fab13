// Causal attention, version 2 (chapter 7, "Scaling up"): the same function as version 1
// (attention_forward / attention_backward in kernels/llama_ops.cuh), with every product of
// two matrices done by cuBLAS. Version 1 gives each query row one warp and lets each lane
// walk a whole key row: simple, and slow at real sizes, because the lanes of a warp read 32
// different key rows at once (32 sectors per load). Here the scores of one head are one
// matrix product Q·Kᵀ, the output is P·V, and the backward is four more products; what is
// left in kernels is the causal softmax and its gradient, one warp per row, reading rows
// along their length. Same layouts and the same att (B×H×T×T) as version 1, so the model
// can use either. Float32 throughout; the products run as FloatMath says: fp32 (cuBLAS
// SGEMM), bounded by the CPU reference, qlora::attention_forward / attention_backward, as
// tightly as version 1, or tf32 on the tensor cores (the model's default, see float_math.cuh).
#pragma once
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "float_math.cuh"

namespace qlora::cuda {

/// As attention_forward (version 1): att gets the softmax weights, zero above the diagonal.
void attention_forward_v2(cublasHandle_t handle, const float* q, const float* k, const float* v, float* att,
                          float* out, int B, int T, int H, int KVH, int hs, cudaStream_t s,
                          FloatMath math = FloatMath::fp32);

/// As attention_backward (version 1): ds is scratch B×H×T×T; dq, dk, dv OVERWRITTEN. dk and dv
/// of a kv head sum its query heads' terms one head after the other (beta = 1): no atomics,
/// the same bits every run.
void attention_backward_v2(cublasHandle_t handle, const float* q, const float* k, const float* v, const float* att,
                           const float* dout, float* ds, float* dq, float* dk, float* dv, int B, int T, int H,
                           int KVH, int hs, cudaStream_t s, FloatMath math = FloatMath::fp32);

}  // namespace qlora::cuda
