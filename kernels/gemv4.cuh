// The fused 4-bit GEMV of decoding (chapter 5, "BF16 dequant-matmul on the GPU"):
// y = x · deq(W)ᵀ for 1 to 8 tokens, dequantizing in registers inside the dot
// product, so the weights cross the memory bus in 4 bits (plus scales) and no
// bf16 copy of them is ever written. CPU reference: matmul_xwt_ref()
// (src/matmul.cpp, double accumulation) on dequantize_4bit_bf16()'s weights;
// tests/test_ch05_gpu_kernels.cpp compares within an error bound argued there.
#pragma once

#include "quant4_device.cuh"

#include <cuda_runtime.h>

namespace qlora::cuda {

/// Most tokens one GEMV call handles (decode batches); more tokens go through linear4_forward.
inline constexpr int kMaxGemvTokens = 8;

enum class GemvVersion {
  automatic = 0,  ///< prefetch at 1 token, multirow up to 4, fused beyond, when the shape allows it; naive otherwise
  naive = 1,      ///< one warp per output row, one value at a time: any shape
  fused = 2,      ///< 16-byte code loads, x in shared memory: needs gemv4_fused_supported()
  multirow = 3,   ///< version 2 with fewer instructions per weight (x reused over 4 rows): same shapes
  prefetch = 4,   ///< version 3 with the next step's loads in flight during the arithmetic: same shapes
};

/// Whether the fused versions (2, 3 and 4) can run: in % 32 == 0 (each row starts on a 16-byte
/// boundary of the packed codes) and tokens x in bf16 values of x fit in shared memory.
bool gemv4_fused_supported(const DeviceQuant4& W, int tokens);

/// y[t·out + o] = bf16(Σ_i x[t·in + i] · deq(W)[o·in + i]) for t < tokens, o < out, with
/// W a 2-D (out × in) 4-bit tensor, x (tokens × in) and y (tokens × out) bf16 in device
/// memory, float32 accumulation. Throws std::invalid_argument for tokens outside
/// 1..kMaxGemvTokens, a W that is not 2-D, or version 2, 3 or 4 on a shape they cannot run.
void gemv4(const DeviceQuant4& W, const bf16* x, bf16* y, int tokens, GemvVersion version = GemvVersion::automatic,
           cudaStream_t stream = nullptr);
/// The same with a float32 y (no rounding of the sums): what the model's linear layers need.
void gemv4(const DeviceQuant4& W, const bf16* x, float* y, int tokens, GemvVersion version = GemvVersion::automatic,
           cudaStream_t stream = nullptr);

}  // namespace qlora::cuda
