// Paged optimizer state (chapter 6): one buffer per optimizer that holds all of its
// states, either in plain device memory (cudaMalloc) or in CUDA managed memory that
// the optimizer moves between the GPU and the host with explicit prefetches, the
// mechanism behind bitsandbytes' paged optimizers.
//
// Managed memory is one address range valid on the CPU and the GPU; its pages live
// in one place at a time and migrate on demand (a page fault) or when asked to
// (cudaMemPrefetchAsync). We never rely on faults: page_in() prefetches the whole
// state to the GPU before the update kernels, page_out() prefetches it to host RAM
// when the caller needs room on the GPU (before a long-sequence forward pass).
//
// What page_out() does and does not do to "free memory" (chapter 6 has the sources): the
// data moves to host RAM, but the driver (nvidia-uvm) keeps the GPU pages that held it
// allocated, marked unused; cudaMemGetInfo therefore still counts them as used. They are
// the first memory the driver evicts when cudaMalloc (or anything else) needs room, and
// evicting them costs no copy since their data already lives on the host. So the room is
// real but shows only when someone asks for it; residency is checked with
// last_prefetch_location(), not with cudaMemGetInfo.
//
// Rule of this project: never ask for more managed memory than the card has free.
// The constructor checks cudaMemGetInfo first and refuses (std::runtime_error, no
// allocation) when the request does not fit in free memory minus a safety margin.
#pragma once

#include "cuda_check.cuh"

#include <cstddef>
#include <string>

namespace qlora::cuda {

/// Free memory left untouched by every managed allocation (for the CUDA context,
/// cuBLAS workspaces and allocator slack).
inline constexpr std::size_t kManagedSafetyMargin = std::size_t{1} << 30;

struct DeviceMemory {
  std::size_t free = 0;
  std::size_t total = 0;
};
/// cudaMemGetInfo on the current device.
DeviceMemory device_memory();

/// Throws std::runtime_error, naming `what` and the sizes in MiB, when bytes + margin
/// exceeds the device's free memory. Allocates nothing.
void check_managed_request(std::size_t bytes, std::size_t margin, const std::string& what);

/// The nvidia-uvm kernel module parameter `name` (/sys/module/nvidia_uvm/parameters/NAME),
/// e.g. uvm_global_oversubscription, which must be 1 for cudaMalloc to be able to evict
/// managed pages; empty when it cannot be read (another OS, another driver).
std::string uvm_module_parameter(const std::string& name);

/// A cudaMemLocation as the driver reports it for a range.
struct PrefetchLocation {
  cudaMemLocationType type = cudaMemLocationTypeInvalid;
  int id = 0;
  bool is_device() const { return type == cudaMemLocationTypeDevice; }
  bool is_host() const { return type == cudaMemLocationTypeHost; }
};
const char* to_string(cudaMemLocationType t);

/// Where an optimizer keeps its states.
enum class StatePlacement {
  Device,  ///< cudaMalloc: always on the GPU, page_in/page_out do nothing
  Paged,   ///< cudaMallocManaged: moved by page_in/page_out
  Host,    ///< pinned host memory the kernels read and write over the bus (cudaHostAllocMapped):
           ///< no device memory at all, for states that do not fit beside the model
};
const char* to_string(StatePlacement p);

/// One allocation of optimizer state. Move-only; frees its memory on destruction.
class StateBuffer {
 public:
  StateBuffer() = default;
  /// Allocates `bytes` (zero-filled) on the current device. For Paged placement, first
  /// checks free memory (check_managed_request with `margin`), then allocates managed
  /// memory, advises the GPU as its preferred location and prefetches it there.
  StateBuffer(std::size_t bytes, StatePlacement placement, const std::string& what,
              std::size_t margin = kManagedSafetyMargin);
  ~StateBuffer();
  StateBuffer(StateBuffer&& o) noexcept;
  StateBuffer& operator=(StateBuffer&& o) noexcept;
  StateBuffer(const StateBuffer&) = delete;
  StateBuffer& operator=(const StateBuffer&) = delete;

  void* data() const { return ptr_; }
  std::size_t bytes() const { return bytes_; }
  StatePlacement placement() const { return placement_; }

  /// Paged: enqueue a prefetch of the whole buffer to the GPU on `stream`.
  void page_in(cudaStream_t stream);
  /// Paged: enqueue a prefetch of the whole buffer to host memory on `stream`; the GPU
  /// pages are released once it completes (synchronize before allocating into the room).
  void page_out(cudaStream_t stream);
  /// Where page_in/page_out last sent the buffer (true for Device placement).
  bool on_device() const { return on_device_; }
  /// Paged: where the driver records the whole buffer was last prefetched to
  /// (cudaMemRangeAttributeLastPrefetchLocationType/Id): what was asked for, not proof that
  /// the migration finished, so synchronize first. Device placement: this device.
  PrefetchLocation last_prefetch_location() const;
  /// Paged: the preferred location advised at allocation (the GPU). Device placement: this device.
  PrefetchLocation preferred_location() const;

 private:
  void release() noexcept;
  void* ptr_ = nullptr;
  std::size_t bytes_ = 0;
  StatePlacement placement_ = StatePlacement::Device;
  int device_ = 0;
  bool on_device_ = true;
};

}  // namespace qlora::cuda
