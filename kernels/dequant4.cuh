// GPU dequantization of a 4-bit tensor (NF4 or FP4, with or without double
// quantization) to bf16 (chapter 5, "BF16 dequant-matmul on the GPU"). CPU
// reference: dequantize_4bit_bf16() in src/quant4.cpp; both versions are
// byte-identical to it (tests/test_ch05_gpu_kernels.cpp).
//
// Version 1 is the obvious kernel: one thread per packed byte. Version 2 is
// what the memory system wants: 16-byte loads of codes, the 16-entry table and
// the 256-entry nested map in shared memory, several independent loads in flight
// per thread, and the block scale decoded once per 32 values instead of per value.
#pragma once

#include "quant4_device.cuh"

#include <cuda_runtime.h>

namespace qlora::cuda {

enum class DequantVersion { naive = 1, vectorized = 2 };

/// out[i] = bf16(table[code_i] * absmax[i / blocksize]) for all q.numel values.
/// `out` is device memory for q.numel bf16 values. Asynchronous on `stream`.
void dequantize4(const DeviceQuant4& q, bf16* out, DequantVersion version = DequantVersion::vectorized,
                 cudaStream_t stream = nullptr);

}  // namespace qlora::cuda
