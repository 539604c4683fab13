// Warp-level pieces shared by the model's kernels (chapter 7): reductions over the 32
// lanes of a warp, and the causal softmax of one attention row, which both attention
// versions (kernels/llama_ops.cu, kernels/attention_gemm.cu) finish their rows with.
#pragma once
#include <cuda_runtime.h>

#include <cmath>

namespace qlora::cuda {

// The two reductions the kernels need, as (combine, identity) pairs.
struct Sum {
  __device__ static float combine(float a, float b) { return a + b; }
  __device__ static float identity() { return 0.0f; }
};
struct Max {
  __device__ static float combine(float a, float b) { return fmaxf(a, b); }
  __device__ static float identity() { return -INFINITY; }
};

// Over the 32 lanes of a warp (butterfly: every lane gets the result).
template <class Op>
__device__ __forceinline__ float warp_reduce(float v) {
  for (int o = 16; o > 0; o >>= 1) v = Op::combine(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) { return warp_reduce<Sum>(v); }
__device__ __forceinline__ float warp_max(float v) { return warp_reduce<Max>(v); }

//! [causal-softmax-row]
// Row t of the attention weights, given its scores p[0..t] and their maximum mx (the
// warp's lanes take s = lane, lane + 32, ...): p_s = exp(p_s − mx) / Σ for s ≤ t, and the
// future s > t set to exactly zero.
__device__ __forceinline__ void normalize_causal_row(float* p, int t, int T, float mx, int lane) {
  float sum = 0.0f;
  for (int s = lane; s <= t; s += 32) {
    const float e = expf(p[s] - mx);
    p[s] = e;
    sum += e;
  }
  const float inv = 1.0f / warp_sum(sum);
  for (int s = lane; s < T; s += 32) p[s] = s <= t ? p[s] * inv : 0.0f;
}
//! [causal-softmax-row]

}  // namespace qlora::cuda
