// The three matrix products of a linear layer, on the CPU (chapters 4 and 7).
// Every layer computes Y = X·Wᵀ forward and dX = dY·W, dW = dYᵀ·X backward,
// with X: T×in, W: out×in, Y: T×out, all row-major float32.
// Each product has a plain-loop reference (obviously right, used by the tests)
// and a BLAS version (OpenBLAS sgemm) that the CPU execution path calls.
#pragma once

namespace qlora {

/// Y[T×out] (=|+=) X[T×in] · W[out×in]ᵀ — plain loops, accumulating in double.
void matmul_xwt_ref(const float* X, const float* W, float* Y, int T, int in, int out, bool accumulate);
/// dX[T×in] (=|+=) dY[T×out] · W[out×in] — plain loops, accumulating in double.
void matmul_dyw_ref(const float* dY, const float* W, float* dX, int T, int in, int out, bool accumulate);
/// dW[out×in] (=|+=) dY[T×out]ᵀ · X[T×in] — plain loops, accumulating in double.
void matmul_dytx_ref(const float* dY, const float* X, float* dW, int T, int in, int out, bool accumulate);

/// The same three products through BLAS sgemm (float32 accumulation).
void matmul_xwt(const float* X, const float* W, float* Y, int T, int in, int out, bool accumulate);
void matmul_dyw(const float* dY, const float* W, float* dX, int T, int in, int out, bool accumulate);
void matmul_dytx(const float* dY, const float* X, float* dW, int T, int in, int out, bool accumulate);

}  // namespace qlora
