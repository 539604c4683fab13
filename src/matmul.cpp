// CPU matrix products of a linear layer (chapters 4 and 7). See matmul.hpp.
#include "matmul.hpp"

#include <cblas.h>

namespace qlora {

//! [matmul-ref]
void matmul_xwt_ref(const float* X, const float* W, float* Y, int T, int in, int out, bool accumulate) {
  for (int t = 0; t < T; ++t)
    for (int o = 0; o < out; ++o) {
      double acc = accumulate ? Y[(long)t * out + o] : 0.0;
      for (int i = 0; i < in; ++i) acc += (double)X[(long)t * in + i] * W[(long)o * in + i];
      Y[(long)t * out + o] = (float)acc;
    }
}
//! [matmul-ref]

void matmul_dyw_ref(const float* dY, const float* W, float* dX, int T, int in, int out, bool accumulate) {
  for (int t = 0; t < T; ++t)
    for (int i = 0; i < in; ++i) {
      double acc = accumulate ? dX[(long)t * in + i] : 0.0;
      for (int o = 0; o < out; ++o) acc += (double)dY[(long)t * out + o] * W[(long)o * in + i];
      dX[(long)t * in + i] = (float)acc;
    }
}

void matmul_dytx_ref(const float* dY, const float* X, float* dW, int T, int in, int out, bool accumulate) {
  for (int o = 0; o < out; ++o)
    for (int i = 0; i < in; ++i) {
      double acc = accumulate ? dW[(long)o * in + i] : 0.0;
      for (int t = 0; t < T; ++t) acc += (double)dY[(long)t * out + o] * X[(long)t * in + i];
      dW[(long)o * in + i] = (float)acc;
    }
}

// Row-major BLAS calls: the leading dimension of each matrix is its row length.
void matmul_xwt(const float* X, const float* W, float* Y, int T, int in, int out, bool accumulate) {
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, out, in, 1.0f, X, in, W, in, accumulate ? 1.0f : 0.0f, Y,
              out);
}

void matmul_dyw(const float* dY, const float* W, float* dX, int T, int in, int out, bool accumulate) {
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, T, in, out, 1.0f, dY, out, W, in, accumulate ? 1.0f : 0.0f,
              dX, in);
}

void matmul_dytx(const float* dY, const float* X, float* dW, int T, int in, int out, bool accumulate) {
  cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, out, in, T, 1.0f, dY, out, X, in, accumulate ? 1.0f : 0.0f, dW,
              in);
}

}  // namespace qlora
