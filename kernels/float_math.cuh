// How a product of float32 matrices is computed (chapter 7, "Where the time goes"). The
// profile of a 7B step put half of the GPU time in float32 products that run on the CUDA
// cores: the LoRA path and attention's scores. TF32 runs them on the tensor cores.
#pragma once
#include <cublas_v2.h>

namespace qlora::cuda {

//! [float-math]
/// fp32: cuBLAS's plain float32 product, the reference (what PEFT computes).
/// tf32: inputs rounded to TF32 (float32's exponent, a 10-bit mantissa: relative error
/// ≤ 2⁻¹¹ per input), products summed in float32, on the tensor cores.
enum class FloatMath { fp32, tf32 };

inline cublasComputeType_t compute_type(FloatMath m) {
  return m == FloatMath::tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
}
//! [float-math]

}  // namespace qlora::cuda
