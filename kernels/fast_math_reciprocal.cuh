// The reciprocal of bitsandbytes' fast-math build, on the GPU (chapters 3 and 5).
// nvcc --use_fast_math compiles `1.0f / x` to the PTX instruction rcp.approx.ftz.f32
// (checked in the PTX of bitsandbytes' kQuantizeBlockwise: rcp.approx.ftz.f32, then
// mul.ftz.f32 for x * (1/absmax)). We are built without fast math, so we ask for the
// instruction by name; the CPU side is src/fast_math_reciprocal.hpp.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

namespace qlora::cuda {

/// rcp.approx.ftz.f32 of every value, computed on the device (synchronous). The GPU
/// tests use it to measure the instruction the CPU table stands for.
std::vector<float> rcp_approx_on_device(std::span<const float> x);

}  // namespace qlora::cuda

#ifdef __CUDACC__
namespace qlora::cuda {

//! [rcp-approx-device]
/// bitsandbytes' `1.0f / x` under --use_fast_math: the approximate reciprocal, subnormal
/// input and output flushed to zero.
__device__ __forceinline__ float rcp_approx_ftz_d(float x) {
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
}
//! [rcp-approx-device]

}  // namespace qlora::cuda
#endif
