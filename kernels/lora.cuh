// LoRA on the GPU (chapter 4, "LoRA on the GPU"): the adapter's forward and
// backward as cuBLAS float32 GEMMs plus two small elementwise kernels.
// CPU reference: lora_forward_ref / lora_backward_ref in src/lora.cpp; the API
// mirrors it (forward ADDS the LoRA term to y, backward accumulates dA, dB and
// ADDS into dx), so the frozen base path can be anything: a BF16 GEMM or the
// chapter-5 NF4 kernel. Activations, A, B and gradients are float32; the products
// are float32 (FloatMath::fp32, PEFT's arithmetic) or TF32 on the tensor cores.
// The dropout mask is a hash of (seed, element index) (lora_dropout_mask_hashed):
// forward draws one seed from the caller's rng, exactly as the CPU path does, and
// the device hashes each element's keep/drop where it multiplies, so both drop the
// same elements. Nothing of the mask is stored: backward hashes it again from the seed.
// All pointers passed in are device pointers; work is issued on `stream`.
#pragma once

#include "cuda_check.cuh"
#include "float_math.cuh"
#include "lora.hpp"

#include <cstddef>
#include <cstdint>
#include <random>
#include <utility>

namespace qlora::cuda {

/// An owning float32 device array. Growing it drops the contents.
class DeviceFloats {
 public:
  DeviceFloats() = default;
  explicit DeviceFloats(std::size_t n) { resize(n); }
  DeviceFloats(const DeviceFloats&) = delete;
  DeviceFloats& operator=(const DeviceFloats&) = delete;
  DeviceFloats(DeviceFloats&& o) noexcept { swap(o); }
  DeviceFloats& operator=(DeviceFloats&& o) noexcept {
    swap(o);  // o's destructor frees what this held
    return *this;
  }
  ~DeviceFloats();

  /// Makes room for n values; reallocates only when n exceeds the capacity.
  void resize(std::size_t n);
  float* data() { return p_; }
  const float* data() const { return p_; }
  std::size_t size() const { return n_; }
  std::size_t capacity() const { return cap_; }  ///< values allocated: what the array holds on the device
  void upload(const float* host, std::size_t n);          ///< resizes to n, synchronous copy
  void download(float* host, std::size_t n) const;        ///< copies the first n values

 private:
  void swap(DeviceFloats& o) noexcept {
    std::swap(p_, o.p_);
    std::swap(n_, o.n_);
    std::swap(cap_, o.cap_);
  }
  float* p_ = nullptr;
  std::size_t n_ = 0, cap_ = 0;
};

/// The device copy of one LoraAdapter: A (r×in), B (out×r) and their gradients.
struct DeviceLoraAdapter {
  int in = 0, out = 0, r = 0;
  DeviceFloats A, B, dA, dB;

  explicit DeviceLoraAdapter(const LoraAdapter& host);  ///< uploads A, B, dA, dB
  void upload(const LoraAdapter& host);                 ///< A, B, dA, dB host → device
  void download(LoraAdapter& host) const;               ///< A, B, dA, dB device → host
};

/// What forward keeps for backward: T×r values and a seed.
struct DeviceLoraCache {
  int T = 0;
  bool masked = false;     ///< dropout was applied, with the mask hashed from `seed`
  std::uint64_t seed = 0;  ///< the mask's seed, the one value drawn from the caller's rng
  DeviceFloats xa;         ///< T×r: dropout(x)·Aᵀ
  std::int64_t bytes() const { return static_cast<std::int64_t>(xa.size() * sizeof(float)); }
};

/// Scratch of the LoRA path, valid only inside one call: one set serves every adapter of a model.
struct DeviceLoraScratch {
  DeviceFloats xd;   ///< T×in: x⊙mask
  DeviceFloats dxa;  ///< T×r: s·dy·B
  DeviceFloats dxd;  ///< T×in: dxa·A before the mask
};

/// mask[i] = 1/(1-p) or 0 for i < n, bit for bit lora_dropout_mask_hashed(n, p, seed). Asynchronous on s.
void lora_dropout_mask_cuda(float* mask, std::int64_t n, float p, std::uint64_t seed, cudaStream_t s);

/// y[T×out] += s·(dropout(x)·Aᵀ)·Bᵀ. Draws the mask's seed from rng exactly when the CPU path
/// would; first_row as lora_forward's (a data-parallel rank's rows of a larger batch).
void lora_forward_cuda(cublasHandle_t handle, cudaStream_t stream, const DeviceLoraAdapter& ad, const LoraConfig& cfg,
                       const float* x, float* y, int T, bool training, std::mt19937_64& rng, DeviceLoraCache& cache,
                       DeviceLoraScratch& scratch, FloatMath math = FloatMath::fp32, std::int64_t first_row = 0);

/// dA += dxaᵀ·dropout(x), dB += s·dyᵀ·xa, dx += (dxa·A)⊙mask with dxa = s·dy·B.
void lora_backward_cuda(cublasHandle_t handle, cudaStream_t stream, DeviceLoraAdapter& ad, const LoraConfig& cfg,
                        const float* x, const float* dy, float* dx, int T, const DeviceLoraCache& cache,
                        DeviceLoraScratch& scratch, FloatMath math = FloatMath::fp32);

}  // namespace qlora::cuda
