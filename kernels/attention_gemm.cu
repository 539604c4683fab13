// Causal attention through cuBLAS, version 2 (chapter 7). See attention_gemm.cuh.
//
// Layouts (row-major, as everywhere in the model): q, out, dq are N×D with N = B·T rows and
// head h in columns h·hs..h·hs+hs−1; k, v, dk, dv are N×KV; att and ds are [b][h][t][s].
// cuBLAS is column-major, so a row-major T×hs block of q with row stride D is, to cuBLAS,
// an hs×T matrix with leading dimension D; every product below is written in that view.
// One strided-batched call covers the kv heads g of one batch row b and one member j of
// each group: query head h = g·group + j, whose q block starts at (g·group + j)·hs (stride
// group·hs over g) and whose kv block starts at g·hs (stride hs).
#include "attention_gemm.cuh"

#include "cuda_check.cuh"
#include "warp_ops.cuh"

#include <cmath>
#include <stdexcept>
#include <string>

namespace qlora::cuda {
namespace {

constexpr int kWarps = 4;

//! [attention-v2-softmax]
// Row r = (b·H + h)·T + t of the scores: p_s = exp(x_s − max)/Σ over s ≤ t, 0 after.
__global__ void causal_softmax_kernel(float* __restrict__ att, long rows, int T) {
  const long r = (long)blockIdx.x * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (r >= rows) return;
  const int t = static_cast<int>(r % T);
  float* p = att + r * T;
  float mx = -INFINITY;
  for (int s = lane; s <= t; s += 32) mx = fmaxf(mx, p[s]);
  normalize_causal_row(p, t, T, warp_max(mx), lane);
}

// ds_s = p_s·(dp_s − Σ_s' p_s'·dp_s')·scale, in place over dp.
__global__ void softmax_backward_kernel(const float* __restrict__ att, float* __restrict__ ds, long rows, int T,
                                        float scale) {
  const long r = (long)blockIdx.x * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (r >= rows) return;
  const int t = static_cast<int>(r % T);
  const float* p = att + r * T;
  float* d = ds + r * T;
  float pdp = 0.0f;
  for (int s = lane; s <= t; s += 32) pdp += p[s] * d[s];
  pdp = warp_sum(pdp);
  for (int s = lane; s < T; s += 32) d[s] = s <= t ? p[s] * (d[s] - pdp) * scale : 0.0f;
}
//! [attention-v2-softmax]

void check_shape(int B, int T, int H, int KVH, int hs, const char* who) {
  if (B <= 0 || T <= 0 || H <= 0 || KVH <= 0 || hs <= 0 || H % KVH != 0)
    throw std::invalid_argument(std::string(who) + ": need positive B, T, H, KVH, hs and H % KVH == 0 (got B=" +
                                std::to_string(B) + ", T=" + std::to_string(T) + ", H=" + std::to_string(H) +
                                ", KVH=" + std::to_string(KVH) + ", hs=" + std::to_string(hs) + ")");
}

unsigned row_blocks(long rows) { return static_cast<unsigned>((rows + kWarps - 1) / kWarps); }

// C = alpha·op(A)·op(B) + beta·C for the KVH kv heads of (b, j), in the column-major view.
struct Heads {
  int B, T, H, KVH, hs, group, D, KV;
  long long tt() const { return (long long)T * T; }
  // Offsets of batch row b and group member j, and the strides over g.
  long long q_at(int b, int j) const { return (long long)b * T * D + (long long)j * hs; }
  long long kv_at(int b) const { return (long long)b * T * KV; }
  long long att_at(int b, int j) const { return ((long long)b * H + j) * tt(); }
  long long q_stride() const { return (long long)group * hs; }
  long long att_stride() const { return (long long)group * tt(); }
};

struct Gemm {
  cublasHandle_t h;
  FloatMath math;
  void operator()(cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, float alpha, const float* A,
                  int lda, long long sa, const float* Bm, int ldb, long long sb, float beta, float* C, int ldc,
                  long long sc, int batch) const {
    CUBLAS_CHECK(cublasGemmStridedBatchedEx(h, ta, tb, m, n, k, &alpha, A, CUDA_R_32F, lda, sa, Bm, CUDA_R_32F, ldb,
                                            sb, &beta, C, CUDA_R_32F, ldc, sc, batch, compute_type(math),
                                            CUBLAS_GEMM_DEFAULT));
  }
};

}  // namespace

//! [attention-v2-forward]
void attention_forward_v2(cublasHandle_t handle, const float* q, const float* k, const float* v, float* att,
                          float* out, int B, int T, int H, int KVH, int hs, cudaStream_t s, FloatMath math) {
  check_shape(B, T, H, KVH, hs, "attention_forward_v2");
  const Gemm gemm{handle, math};
  CUBLAS_CHECK(cublasSetStream(handle, s));
  const Heads x{B, T, H, KVH, hs, H / KVH, H * hs, KVH * hs};
  const float scale = 1.0f / sqrtf(static_cast<float>(hs));
  for (int b = 0; b < B; ++b)
    for (int j = 0; j < x.group; ++j) {
      // scores^cm (T×T, [s][t]) = scale · K^cmᵀ (T×hs) · Q^cm (hs×T)
      gemm(CUBLAS_OP_T, CUBLAS_OP_N, T, T, hs, scale, k + x.kv_at(b), x.KV, hs, q + x.q_at(b, j), x.D,
           x.q_stride(), 0.0f, att + x.att_at(b, j), T, x.att_stride(), KVH);
    }
  const long rows = (long)B * H * T;
  causal_softmax_kernel<<<row_blocks(rows), kWarps * 32, 0, s>>>(att, rows, T);
  CUDA_CHECK_LAUNCH();
  for (int b = 0; b < B; ++b)
    for (int j = 0; j < x.group; ++j) {
      // out^cm (hs×T) = V^cm (hs×T) · P^cm (T×T, [s][t])
      gemm(CUBLAS_OP_N, CUBLAS_OP_N, hs, T, T, 1.0f, v + x.kv_at(b), x.KV, hs, att + x.att_at(b, j), T,
           x.att_stride(), 0.0f, out + x.q_at(b, j), x.D, x.q_stride(), KVH);
    }
}
//! [attention-v2-forward]

//! [attention-v2-backward]
void attention_backward_v2(cublasHandle_t handle, const float* q, const float* k, const float* v, const float* att,
                           const float* dout, float* ds, float* dq, float* dk, float* dv, int B, int T, int H,
                           int KVH, int hs, cudaStream_t s, FloatMath math) {
  check_shape(B, T, H, KVH, hs, "attention_backward_v2");
  const Gemm gemm{handle, math};
  CUBLAS_CHECK(cublasSetStream(handle, s));
  const Heads x{B, T, H, KVH, hs, H / KVH, H * hs, KVH * hs};
  const float scale = 1.0f / sqrtf(static_cast<float>(hs));
  for (int b = 0; b < B; ++b)
    for (int j = 0; j < x.group; ++j) {
      // dp^cm (T×T, [s][t]) = V^cmᵀ · dO^cm
      gemm(CUBLAS_OP_T, CUBLAS_OP_N, T, T, hs, 1.0f, v + x.kv_at(b), x.KV, hs, dout + x.q_at(b, j), x.D,
           x.q_stride(), 0.0f, ds + x.att_at(b, j), T, x.att_stride(), KVH);
    }
  const long rows = (long)B * H * T;
  softmax_backward_kernel<<<row_blocks(rows), kWarps * 32, 0, s>>>(att, ds, rows, T, scale);
  CUDA_CHECK_LAUNCH();
  for (int b = 0; b < B; ++b)
    for (int j = 0; j < x.group; ++j) {
      const float beta = j == 0 ? 0.0f : 1.0f;  // the group's heads add up, one after the other
      // dq^cm (hs×T) = K^cm (hs×T) · dS^cm (T×T)
      gemm(CUBLAS_OP_N, CUBLAS_OP_N, hs, T, T, 1.0f, k + x.kv_at(b), x.KV, hs, ds + x.att_at(b, j), T,
           x.att_stride(), 0.0f, dq + x.q_at(b, j), x.D, x.q_stride(), KVH);
      // dk^cm (hs×T) += Q^cm (hs×T) · dS^cmᵀ ; dv^cm += dO^cm · P^cmᵀ
      gemm(CUBLAS_OP_N, CUBLAS_OP_T, hs, T, T, 1.0f, q + x.q_at(b, j), x.D, x.q_stride(), ds + x.att_at(b, j),
           T, x.att_stride(), beta, dk + x.kv_at(b), x.KV, hs, KVH);
      gemm(CUBLAS_OP_N, CUBLAS_OP_T, hs, T, T, 1.0f, dout + x.q_at(b, j), x.D, x.q_stride(),
           att + x.att_at(b, j), T, x.att_stride(), beta, dv + x.kv_at(b), x.KV, hs, KVH);
    }
}
//! [attention-v2-backward]

}  // namespace qlora::cuda
