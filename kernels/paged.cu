// Paged optimizer state: managed memory moved by explicit prefetches (chapter 6).
// See paged.cuh.
#include "paged.cuh"

#include <cstring>

#include <fstream>
#include <stdexcept>
#include <utility>

namespace qlora::cuda {

namespace {

std::string mib(std::size_t bytes) { return std::to_string(bytes >> 20) + " MiB"; }

// CUDA 13 names a prefetch/advice target with a cudaMemLocation instead of a device id.
cudaMemLocation gpu_location(int device) { return cudaMemLocation{cudaMemLocationTypeDevice, device}; }
cudaMemLocation host_location() { return cudaMemLocation{cudaMemLocationTypeHost, 0}; }

}  // namespace

DeviceMemory device_memory() {
  DeviceMemory m;
  CUDA_CHECK(cudaMemGetInfo(&m.free, &m.total));
  return m;
}

void check_managed_request(std::size_t bytes, std::size_t margin, const std::string& what) {
  const DeviceMemory m = device_memory();
  if (bytes > m.free || m.free - bytes < margin)
    throw std::runtime_error(what + ": refusing to allocate " + mib(bytes) + " of managed memory: the GPU has " +
                             mib(m.free) + " free of " + mib(m.total) + " and " + mib(margin) +
                             " must stay free (paged states never oversubscribe the device)");
}

std::string uvm_module_parameter(const std::string& name) {
  std::ifstream in("/sys/module/nvidia_uvm/parameters/" + name);
  std::string value;
  if (!(in >> value)) return {};
  return value;
}

const char* to_string(cudaMemLocationType t) {
  switch (t) {
    case cudaMemLocationTypeDevice: return "device";
    case cudaMemLocationTypeHost: return "host";
    case cudaMemLocationTypeHostNuma: return "host NUMA node";
    case cudaMemLocationTypeHostNumaCurrent: return "host NUMA node (current)";
    default: return "mixed or none";
  }
}

const char* to_string(StatePlacement p) {
  switch (p) {
    case StatePlacement::Paged: return "paged";
    case StatePlacement::Host: return "host";
    default: return "device";
  }
}

//! [state_buffer]
StateBuffer::StateBuffer(std::size_t bytes, StatePlacement placement, const std::string& what, std::size_t margin)
    : bytes_(bytes), placement_(placement) {
  if (bytes == 0) return;
  CUDA_CHECK(cudaGetDevice(&device_));
  if (placement == StatePlacement::Device) {
    CUDA_MALLOC(&ptr_, bytes);
  } else if (placement == StatePlacement::Host) {
    // Pinned and mapped: with unified addressing the kernels use this pointer as it is,
    // and every access crosses the bus. An update reads and writes each state once, so
    // the step costs 2·bytes over the link and no device memory.
    CUDA_CHECK(cudaHostAlloc(&ptr_, bytes, cudaHostAllocMapped));
  } else {
    int concurrent = 0;
    CUDA_CHECK(cudaDeviceGetAttribute(&concurrent, cudaDevAttrConcurrentManagedAccess, device_));
    if (!concurrent)
      throw std::runtime_error(what + ": this GPU cannot prefetch managed memory (no concurrentManagedAccess)");
    check_managed_request(bytes, margin, what);
    CUDA_CHECK(cudaMallocManaged(&ptr_, bytes, cudaMemAttachGlobal));
    // The state's home is the GPU: pages that fault go back there, and the driver evicts
    // them only under pressure. page_out() overrides this with an explicit prefetch.
    CUDA_CHECK(cudaMemAdvise(ptr_, bytes, cudaMemAdviseSetPreferredLocation, gpu_location(device_)));
    CUDA_CHECK(cudaMemPrefetchAsync(ptr_, bytes, gpu_location(device_), 0, nullptr));
  }
  if (placement == StatePlacement::Host)
    std::memset(ptr_, 0, bytes);
  else
    CUDA_CHECK(cudaMemset(ptr_, 0, bytes));
  CUDA_CHECK(cudaDeviceSynchronize());
}

void StateBuffer::page_in(cudaStream_t stream) {
  if (placement_ != StatePlacement::Paged || ptr_ == nullptr) return;
  CUDA_CHECK(cudaMemPrefetchAsync(ptr_, bytes_, gpu_location(device_), 0, stream));
  on_device_ = true;
}

void StateBuffer::page_out(cudaStream_t stream) {
  if (placement_ != StatePlacement::Paged || ptr_ == nullptr) return;
  CUDA_CHECK(cudaMemPrefetchAsync(ptr_, bytes_, host_location(), 0, stream));
  on_device_ = false;
}
//! [state_buffer]

namespace {

// One cudaMemRangeGetAttribute pair (type, id) over the whole buffer.
PrefetchLocation range_location(const void* ptr, std::size_t bytes, cudaMemRangeAttribute type_attr,
                                cudaMemRangeAttribute id_attr) {
  PrefetchLocation loc;
  CUDA_CHECK(cudaMemRangeGetAttribute(&loc.type, sizeof loc.type, type_attr, ptr, bytes));
  CUDA_CHECK(cudaMemRangeGetAttribute(&loc.id, sizeof loc.id, id_attr, ptr, bytes));
  return loc;
}

}  // namespace

PrefetchLocation StateBuffer::last_prefetch_location() const {
  if (placement_ == StatePlacement::Host) return {cudaMemLocationTypeHost, 0};
  if (placement_ != StatePlacement::Paged || ptr_ == nullptr) return {cudaMemLocationTypeDevice, device_};
  return range_location(ptr_, bytes_, cudaMemRangeAttributeLastPrefetchLocationType,
                        cudaMemRangeAttributeLastPrefetchLocationId);
}

PrefetchLocation StateBuffer::preferred_location() const {
  if (placement_ == StatePlacement::Host) return {cudaMemLocationTypeHost, 0};
  if (placement_ != StatePlacement::Paged || ptr_ == nullptr) return {cudaMemLocationTypeDevice, device_};
  return range_location(ptr_, bytes_, cudaMemRangeAttributePreferredLocationType,
                        cudaMemRangeAttributePreferredLocationId);
}

void StateBuffer::release() noexcept {
  // No throw from a destructor; a failed free leaks.
  if (ptr_ != nullptr) placement_ == StatePlacement::Host ? cudaFreeHost(ptr_) : cudaFree(ptr_);
  ptr_ = nullptr;
  bytes_ = 0;
}

StateBuffer::~StateBuffer() { release(); }

StateBuffer::StateBuffer(StateBuffer&& o) noexcept
    : ptr_(std::exchange(o.ptr_, nullptr)),
      bytes_(std::exchange(o.bytes_, 0)),
      placement_(o.placement_),
      device_(o.device_),
      on_device_(o.on_device_) {}

StateBuffer& StateBuffer::operator=(StateBuffer&& o) noexcept {
  if (this != &o) {
    release();
    ptr_ = std::exchange(o.ptr_, nullptr);
    bytes_ = std::exchange(o.bytes_, 0);
    placement_ = o.placement_;
    device_ = o.device_;
    on_device_ = o.on_device_;
  }
  return *this;
}

}  // namespace qlora::cuda
