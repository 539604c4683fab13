// AdamW on the GPU (chapter 6): the FP32-state kernel, the 8-bit blockwise kernel,
// the global gradient norm and clipping, and the optimizers built from them, whose
// states live in plain device memory or in paged (managed) memory (paged.cuh).
//
// CPU references: adamw32 kernel   ↔ src/adamw.cpp:adamw_update
//                 adamw8bit kernel ↔ src/adamw8bit.cpp:adamw8bit_update
//                 GradClipper      ↔ src/adamw.cpp:global_grad_norm / clip_grad_norm
// Both update kernels do each float operation with round-to-nearest intrinsics
// (__fmul_rn, __fadd_rn, ...) in the reference's order, so nvcc cannot fuse a multiply
// and an add into one FMA (one rounding instead of two): the GPU then reproduces the
// CPU reference bit for bit, which makes the 8-bit codes comparable one to one.
#pragma once

#include "adamw.hpp"
#include "adamw8bit.hpp"
#include "paged.cuh"

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

namespace qlora::cuda {

/// A float tensor in device memory.
struct DeviceSpan {
  float* data = nullptr;
  std::size_t size = 0;
};

/// One trainable tensor on the GPU: device pointers to its values and gradient.
struct DeviceParam {
  std::string name;
  float* value = nullptr;
  float* grad = nullptr;
  std::size_t size = 0;
};

/// One FP32 AdamW update of one tensor (all device pointers), enqueued on `stream`.
void adamw32_update(float* p, const float* g, float* m, float* v, std::size_t n, float lr, const AdamWConfig& cfg,
                    BiasCorrection bc, cudaStream_t stream);

/// One 8-bit blockwise AdamW update of one tensor; `maps` is 512 device floats:
/// the signed map (for m) followed by the unsigned map (for v).
void adamw8bit_update(float* p, const float* g, std::uint8_t* c1, std::uint8_t* c2, float* absmax1, float* absmax2,
                      std::size_t n, const Adam8bitStepConsts& k, const float* maps, cudaStream_t stream);

/// Global L2 norm of a set of gradients and torch-style clipping, in two stages:
/// every tensor's blocks write partial sums of squares (in double), one block adds
/// them up; the clip scale is computed on the device from that sum, so scaling needs
/// no round trip to the host.
class GradClipper {
 public:
  explicit GradClipper(std::vector<DeviceSpan> grads);
  ~GradClipper();
  GradClipper(const GradClipper&) = delete;
  GradClipper& operator=(const GradClipper&) = delete;

  /// The global norm (waits for the stream).
  double norm(cudaStream_t stream);
  /// Scales every gradient by min(1, max_norm / (norm + 1e-6)); returns the norm before clipping.
  double clip(double max_norm, cudaStream_t stream);

 private:
  void launch_norm(cudaStream_t stream);
  std::vector<DeviceSpan> grads_;
  std::vector<int> blocks_;   // stage-1 blocks of each tensor
  int partial_count_ = 0;
  double* partials_ = nullptr;  // stage-1 results, then the total at partials_[partial_count_]
};

/// AdamW with FP32 states (8 bytes per parameter) in one StateBuffer.
class CudaAdamW {
 public:
  CudaAdamW(std::vector<DeviceParam> params, AdamWConfig cfg, StatePlacement placement);
  /// Pages the states in (if paged) and updates every tensor; asynchronous on `stream`.
  void step(float lr, cudaStream_t stream = nullptr);
  void page_out(cudaStream_t stream = nullptr) { states_.page_out(stream); }
  void page_in(cudaStream_t stream = nullptr) { states_.page_in(stream); }
  std::size_t state_bytes() const { return states_.bytes(); }
  /// Where the states were last prefetched to (StateBuffer::last_prefetch_location).
  PrefetchLocation state_location() const { return states_.last_prefetch_location(); }
  std::int64_t steps() const { return t_; }
  /// Writes the states in AdamW::save_state's format (same tensor names), atomically, so the
  /// checkpoint resumes on the CPU too (synchronizes).
  void save_state(const std::filesystem::path& path) const;
  /// Reads a state written by save_state or by the CPU AdamW. Throws std::runtime_error naming
  /// the file and the tensor on any mismatch; a failed load leaves the optimizer unchanged.
  void load_state(const std::filesystem::path& path);
  /// Copies of tensor i's states on the host (synchronizes).
  std::vector<float> exp_avg(std::size_t i) const;
  std::vector<float> exp_avg_sq(std::size_t i) const;

 private:
  float* m(std::size_t i) const;
  float* v(std::size_t i) const;
  std::vector<DeviceParam> params_;
  AdamWConfig cfg_;
  std::vector<std::size_t> offset_;  // float offset of each tensor's m; v follows it
  StateBuffer states_;
  std::int64_t t_ = 0;
};

/// bitsandbytes-style 8-bit AdamW: blockwise 8-bit states (2.03 bytes per parameter),
/// FP32 states for tensors below kMin8bitSize, all in one StateBuffer.
class CudaAdamW8bit {
 public:
  CudaAdamW8bit(std::vector<DeviceParam> params, AdamWConfig cfg, StatePlacement placement);
  ~CudaAdamW8bit();
  CudaAdamW8bit(const CudaAdamW8bit&) = delete;
  CudaAdamW8bit& operator=(const CudaAdamW8bit&) = delete;
  void step(float lr, cudaStream_t stream = nullptr);
  void page_out(cudaStream_t stream = nullptr) { states_.page_out(stream); }
  void page_in(cudaStream_t stream = nullptr) { states_.page_in(stream); }
  std::size_t state_bytes() const { return states_.bytes(); }
  PrefetchLocation state_location() const { return states_.last_prefetch_location(); }
  std::int64_t steps() const { return t_; }
  /// Same file format and tensor names as AdamW8bit::save_state / load_state (see CudaAdamW).
  void save_state(const std::filesystem::path& path) const;
  void load_state(const std::filesystem::path& path);
  /// Tensor i's raw state copied to the host (synchronizes), in the CPU reference's layout.
  AdamW8bit::State state(std::size_t i) const;

 private:
  struct Layout {
    std::size_t c1, c2, absmax1, absmax2;  // byte offsets (8-bit tensors)
    std::size_t m, v;                      // byte offsets (FP32 tensors)
  };
  std::vector<DeviceParam> params_;
  AdamWConfig cfg_;
  std::vector<Layout> layout_;
  StateBuffer states_;
  float* maps_ = nullptr;  // 512 floats: signed then unsigned dynamic map
  std::int64_t t_ = 0;
};

}  // namespace qlora::cuda
