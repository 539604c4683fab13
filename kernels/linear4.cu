// The QLoRA base-layer matmuls on the GPU (chapter 5). See linear4.cuh.
#include "linear4.cuh"

#include "dequant4.cuh"
#include "gemm4_mma.cuh"
#include "gemv4.cuh"

#include <stdexcept>
#include <string>

namespace qlora::cuda {

CublasHandle::CublasHandle() { CUBLAS_CHECK(cublasCreate(&handle_)); }
CublasHandle::~CublasHandle() {
  if (handle_ != nullptr) cublasDestroy(handle_);  // no throwing from a destructor
}

static cudaDataType_t cuda_type(OutType t) { return t == OutType::bf16 ? CUDA_R_16BF : CUDA_R_32F; }

static void check_dims(const char* what, int tokens, int in, int out) {
  if (tokens < 0 || in < 0 || out < 0) {
    throw std::invalid_argument(std::string(what) + ": negative dimension (tokens " + std::to_string(tokens) +
                                ", in " + std::to_string(in) + ", out " + std::to_string(out) + ")");
  }
}

// One cuBLAS call for both products: bf16 A and B, float32 accumulation, C bf16 or
// float32, column-major, B never transposed.
static void gemm_bf16(CublasHandle& h, cublasOperation_t op_a, int m, int n, int k, const bf16* A, int lda,
                      const bf16* B, int ldb, void* C, OutType c_type, int ldc, bool accumulate, cudaStream_t stream) {
  const float alpha = 1.0f, beta = accumulate ? 1.0f : 0.0f;
  CUBLAS_CHECK(cublasSetStream(h.get(), stream));
  CUBLAS_CHECK(cublasGemmEx(h.get(), op_a, CUBLAS_OP_N, m, n, k, &alpha, A, CUDA_R_16BF, lda, B, CUDA_R_16BF, ldb,
                            &beta, C, cuda_type(c_type), ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

//! [gemm-row-major]
// cuBLAS is column-major. A row-major (r × c) matrix is the column-major (c × r)
// matrix of the same bytes, i.e. its transpose; so row-major Y = X·Wᵀ is
// column-major Yᵀ = W·Xᵀ: op(A) = T on W (stored in × out, lda = in), op(B) = N
// on X (stored in × tokens, ldb = in), C = Yᵀ (out × tokens, ldc = out).
void gemm_bf16_xwt(CublasHandle& h, const bf16* X, const bf16* W, void* Y, OutType y_type, int tokens, int in,
                   int out, bool accumulate, cudaStream_t stream) {
  check_dims("gemm_bf16_xwt", tokens, in, out);
  if (tokens == 0 || out == 0) return;
  gemm_bf16(h, CUBLAS_OP_T, out, tokens, in, W, in, X, in, Y, y_type, out, accumulate, stream);
}

// Row-major dX = dY·W is column-major dXᵀ = Wᵀ·dYᵀ, where the bytes of W already
// are Wᵀ (in × out, lda = in) and those of dY are dYᵀ (out × tokens, ldb = out).
void gemm_bf16_dyw(CublasHandle& h, const bf16* dY, const bf16* W, void* dX, OutType dx_type, int tokens, int in,
                   int out, bool accumulate, cudaStream_t stream) {
  check_dims("gemm_bf16_dyw", tokens, in, out);
  if (tokens == 0 || in == 0) return;
  gemm_bf16(h, CUBLAS_OP_N, in, tokens, out, W, in, dY, out, dX, dx_type, in, accumulate, stream);
}
//! [gemm-row-major]

bf16* DequantScratch::reserve(std::int64_t numel) {
  if (numel < 0) throw std::invalid_argument("DequantScratch::reserve: negative size");
  if (static_cast<std::size_t>(numel) > buffer_.size()) {
    // Work queued on the old buffer must finish before it is freed. Growing happens
    // once per model (to the largest weight), so a full synchronization is cheap here.
    CUDA_CHECK(cudaDeviceSynchronize());
    buffer_ = DeviceBuffer<bf16>();
    buffer_ = DeviceBuffer<bf16>(static_cast<std::size_t>(numel));
  }
  return buffer_.data();
}

static int checked_int(std::int64_t v, const char* what) {
  if (v > (1ll << 31) - 1) throw std::invalid_argument(std::string(what) + ": dimension too large for cuBLAS");
  return static_cast<int>(v);
}

//! [linear4]
void linear4_forward(CublasHandle& h, const DeviceQuant4& W, const bf16* X, int tokens, void* Y, OutType y_type,
                     DequantScratch& scratch, bool accumulate, cudaStream_t stream) {
  const int out = checked_int(W.rows("linear4_forward"), "linear4_forward");
  const int in = checked_int(W.cols("linear4_forward"), "linear4_forward");
  bf16* w = scratch.reserve(W.numel);
  dequantize4(W, w, DequantVersion::coalesced, stream);  // same stream: the GEMM waits for it
  gemm_bf16_xwt(h, X, w, Y, y_type, tokens, in, out, accumulate, stream);
}

void linear4_backward_input(CublasHandle& h, const DeviceQuant4& W, const bf16* dY, int tokens, void* dX,
                            OutType dx_type, DequantScratch& scratch, bool accumulate, cudaStream_t stream) {
  const int out = checked_int(W.rows("linear4_backward_input"), "linear4_backward_input");
  const int in = checked_int(W.cols("linear4_backward_input"), "linear4_backward_input");
  bf16* w = scratch.reserve(W.numel);
  dequantize4(W, w, DequantVersion::coalesced, stream);
  gemm_bf16_dyw(h, dY, w, dX, dx_type, tokens, in, out, accumulate, stream);
}
//! [linear4]

Linear4Path linear4_path(const DeviceQuant4& W, int tokens) {
  if (tokens <= kGemvMaxTokens && gemv4_fused_supported(W, tokens)) return Linear4Path::gemv;
  if (tokens <= kMmaExactMaxTokens && gemm4_mma_unsupported(W, MmaVersion::exact).empty()) return Linear4Path::mma_exact;
  if (tokens <= kMmaPairTableMaxTokens && gemm4_mma_unsupported(W, MmaVersion::pair_table).empty())
    return Linear4Path::mma_pair_table;
  if (tokens <= kMmaMaxTokens && gemm4_mma_unsupported(W, MmaVersion::register_table).empty())
    return Linear4Path::mma_register_table;
  return Linear4Path::dequant_cublas;
}

}  // namespace qlora::cuda
