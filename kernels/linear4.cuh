// The QLoRA base-layer matmuls on the GPU (chapter 5, "BF16 dequant-matmul on the
// GPU"): the frozen 4-bit weight is dequantized into a reusable bf16 scratch
// buffer and multiplied by cuBLAS (bf16 inputs, float32 accumulation on the
// tensor cores). Forward Y = X·deq(W)ᵀ; backward only dX = dY·deq(W), because
// the base weight is frozen and gets no gradient. CPU references:
// matmul_xwt_ref() / matmul_dyw_ref() (src/matmul.cpp) on dequantize_4bit_bf16()
// weights. The plain cuBLAS bf16 products here are also the benchmark's reference.
// For a few rows the fused kernels are faster (gemv4.cuh, gemm4_mma.cuh): linear4_path() says
// which one the model's linear layers call.
#pragma once

#include "quant4_device.cuh"

#include <cublas_v2.h>
#include <cuda_runtime.h>

namespace qlora::cuda {

/// Element type of a matmul output: bf16, or float32 (for accumulating into a
/// float32 buffer, e.g. adding the LoRA path in float32).
enum class OutType { bf16, f32 };

/// Owns one cuBLAS handle.
class CublasHandle {
 public:
  CublasHandle();
  ~CublasHandle();
  CublasHandle(const CublasHandle&) = delete;
  CublasHandle& operator=(const CublasHandle&) = delete;
  cublasHandle_t get() const { return handle_; }

 private:
  cublasHandle_t handle_ = nullptr;
};

/// Y (tokens × out) (=|+=) X (tokens × in) · W (out × in)ᵀ; all row-major in device memory,
/// X and W bf16, Y bf16 or float32, float32 accumulation.
void gemm_bf16_xwt(CublasHandle& h, const bf16* X, const bf16* W, void* Y, OutType y_type, int tokens, int in,
                   int out, bool accumulate = false, cudaStream_t stream = nullptr);
/// dX (tokens × in) (=|+=) dY (tokens × out) · W (out × in); same conventions.
void gemm_bf16_dyw(CublasHandle& h, const bf16* dY, const bf16* W, void* dX, OutType dx_type, int tokens, int in,
                   int out, bool accumulate = false, cudaStream_t stream = nullptr);

/// The bf16 buffer a 4-bit weight is dequantized into before its matmul. One per
/// stream, reused by every layer: it grows to the largest weight and stays, so a
/// model holds one dequantized matrix at a time, never all of them.
class DequantScratch {
 public:
  /// Device memory for at least `numel` bf16 values (valid until the next call).
  bf16* reserve(std::int64_t numel);
  std::size_t bytes() const { return buffer_.bytes(); }

 private:
  DeviceBuffer<bf16> buffer_;
};

/// Y (tokens × out) (=|+=) X (tokens × in) · deq(W)ᵀ for a 2-D (out × in) 4-bit W.
void linear4_forward(CublasHandle& h, const DeviceQuant4& W, const bf16* X, int tokens, void* Y, OutType y_type,
                     DequantScratch& scratch, bool accumulate = false, cudaStream_t stream = nullptr);
/// dX (tokens × in) (=|+=) dY (tokens × out) · deq(W).
void linear4_backward_input(CublasHandle& h, const DeviceQuant4& W, const bf16* dY, int tokens, void* dX,
                            OutType dx_type, DequantScratch& scratch, bool accumulate = false,
                            cudaStream_t stream = nullptr);

//! [linear4-dispatch]
/// Which kernel multiplies a 4-bit weight by `tokens` rows in the model's linear layers, read off
/// `qlora bench kernels` on an H200 at 8192 × 8192 and 28672 × 8192 (docs/benchmarks.md): GEMV
/// version 4 at 1 and 2 tokens (1.43–1.77× cuBLAS's speed, the tensor-core kernels 0.88–1.35×);
/// the tensor-core matmul version 1 at 3 to 8 tokens (1.01–1.28×); version 3 at 9 to 16
/// (1.01–1.10× at 16 tokens, versions 1 and 2 0.71–0.86×); version 2 at 17 to 32 (0.68–0.69×
/// at 32, version 3 0.67–0.70×: a tie); from 33 on, dequantize + cuBLAS (0.42× at 64 tokens,
/// the fused kernels at most 0.39×).
enum class Linear4Path { gemv, mma_exact, mma_pair_table, mma_register_table, dequant_cublas };

inline constexpr int kGemvMaxTokens = 2, kMmaExactMaxTokens = 8, kMmaPairTableMaxTokens = 16, kMmaMaxTokens = 32;

/// The path for this weight and token count; a kernel that cannot run the shape falls through
/// to the next one, and dequantize + cuBLAS runs everything.
Linear4Path linear4_path(const DeviceQuant4& W, int tokens);
//! [linear4-dispatch]

}  // namespace qlora::cuda
