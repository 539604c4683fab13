// GPU blockwise 4-bit quantization, NF4 or FP4, with or without double
// quantization (chapter 5, "BF16 dequant-matmul on the GPU"). CPU reference:
// quantize_4bit() in src/quant4.cpp. Both compute 1/absmax as bitsandbytes' fast-math
// build does (rcp.approx.ftz.f32); the CPU knows that instruction's result only for a
// BF16 absmax, so the GPU result is byte-identical to the CPU's for BF16 input and, for
// F32 input, wherever the CPU is given the device's reciprocal
// (tests/test_ch05_gpu_kernels.cpp checks every array). Against bitsandbytes itself:
// tests/test_ch05_gpu_bnb.cpp.
//
// The kernels do not repeat the CPU encoders' decision trees. Every encoder of the
// format (nf4_encode, fp4_encode, quantize_dynamic) is a monotone step function of
// its input, so it is fully described by the points where it steps up. We find
// those points once, on the host, by bisection over the ordered float32 values,
// asking the CPU encoder itself; the kernel then counts how many of them a value
// exceeds. The two encoders cannot drift apart.
#pragma once

#include "quant4_device.cuh"

#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

namespace qlora::cuda {

/// A CPU encoder as a threshold function: code = code_of_rank[#{k : v > thresholds[k]}],
/// where v is x (NF4, the dynamic map) or |x| (FP4, whose sign bit 8 is set for x < 0).
struct EncoderThresholds {
  std::vector<float> thresholds;          ///< ascending, one fewer than the ranks
  std::vector<std::uint8_t> code_of_rank;  ///< code for each rank
  bool sign_magnitude = false;            ///< FP4: thresholds apply to |x|
};

/// The thresholds of nf4_encode / fp4_encode, found by bisection (computed once).
/// Throws std::logic_error if the encoder is not a monotone step function.
const EncoderThresholds& encoder_thresholds(QuantType type);
/// The 255 thresholds of quantize_dynamic() over dynamic_map(true) (computed once).
const EncoderThresholds& dynamic_map_thresholds();

/// Quantizes numel values of device memory x (float32 or bf16 bits) into a new
/// device tensor, as quantize_4bit(x, shape, type, blocksize, double_quant) does on
/// the CPU. Throws std::invalid_argument for a bad blocksize or a NaN/Inf input
/// (naming its index). Synchronizes the stream (it reads the NaN flag back, and the
/// double-quantization offset is a mean summed on the host in the CPU's order).
DeviceQuant4 quantize4(const float* x, std::vector<std::int64_t> shape, QuantType type, int blocksize,
                       bool double_quant, cudaStream_t stream = nullptr);
DeviceQuant4 quantize4(const bf16* x, std::vector<std::int64_t> shape, QuantType type, int blocksize,
                       bool double_quant, cudaStream_t stream = nullptr);

/// The same into arrays that DeviceQuant4::allocate made (the tests poison them first).
void quantize4_into(const float* x, DeviceQuant4& out, cudaStream_t stream = nullptr);
void quantize4_into(const bf16* x, DeviceQuant4& out, cudaStream_t stream = nullptr);

}  // namespace qlora::cuda
