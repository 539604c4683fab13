// The reciprocal of bitsandbytes' fast-math build, measured. See fast_math_reciprocal.cuh.
#include "fast_math_reciprocal.cuh"

#include "cuda_check.cuh"
#include "device_buffer.cuh"

namespace qlora::cuda {

__global__ void rcp_approx_kernel(const float* __restrict__ x, std::int64_t n, float* __restrict__ out) {
  const std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) out[i] = rcp_approx_ftz_d(x[i]);
}

std::vector<float> rcp_approx_on_device(std::span<const float> x) {
  if (x.empty()) return {};
  const auto d_x = to_device(x);
  DeviceBuffer<float> d_out(x.size());
  const auto n = static_cast<std::int64_t>(x.size());
  rcp_approx_kernel<<<static_cast<unsigned>((n + 255) / 256), 256>>>(d_x.data(), n, d_out.data());
  CUDA_CHECK_LAUNCH();
  return d_out.download();
}

}  // namespace qlora::cuda
