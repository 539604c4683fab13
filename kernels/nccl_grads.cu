// The gradient all-reduce of data-parallel GPU ranks with NCCL. See nccl_grads.cuh.
#include "nccl_grads.cuh"

#include "cuda_check.cuh"
#include "nvtx_range.cuh"

#include <chrono>
#include <stdexcept>
#include <string>
#include <thread>

namespace qlora::cuda {

namespace {

void nccl_check(ncclResult_t r, const char* what) {
  if (r != ncclSuccess && r != ncclInProgress)
    throw std::runtime_error(std::string("NCCL: ") + what + ": " + ncclGetErrorString(r));
}

}  // namespace

NcclGrads::NcclGrads(Communicator& world, std::vector<DeviceSpan> grads, double timeout_s)
    : world_(world), grads_(std::move(grads)), timeout_s_(timeout_s) {
  ncclUniqueId id{};
  if (world.rank() == 0) nccl_check(ncclGetUniqueId(&id), "ncclGetUniqueId");
  world.broadcast(&id, sizeof id, 0, "the NCCL id broadcast");
  nccl_check(ncclCommInitRank(&comm_, world.size(), id, world.rank()), "ncclCommInitRank");
  CUDA_CHECK(cudaEventCreateWithFlags(&done_, cudaEventDisableTiming));
}

NcclGrads::~NcclGrads() {
  if (done_) cudaEventDestroy(done_);
  if (comm_) ncclCommDestroy(comm_);
}

std::size_t NcclGrads::bytes() const {
  std::size_t n = 0;
  for (const DeviceSpan& g : grads_) n += g.size * sizeof(float);
  return n;
}

//! [nccl-all-reduce]
// One all-reduce per tensor inside a group: NCCL fuses them into as few launches as the
// sizes allow. The wait polls an event rather than blocking in cudaStreamSynchronize,
// which would wait for ever for a rank that died or hangs; the step waits for the sum
// right after anyway (clipping reads the global norm on the host).
void NcclGrads::all_reduce(cudaStream_t stream) {
  NvtxRange range("all-reduce");
  nccl_check(ncclGroupStart(), "ncclGroupStart");
  for (const DeviceSpan& g : grads_)
    nccl_check(ncclAllReduce(g.data, g.data, g.size, ncclFloat, ncclSum, comm_, stream), "ncclAllReduce");
  nccl_check(ncclGroupEnd(), "ncclGroupEnd");
  CUDA_CHECK(cudaEventRecord(done_, stream));
  const auto start = std::chrono::steady_clock::now();
  for (cudaError_t e; (e = cudaEventQuery(done_)) != cudaSuccess;) {
    if (e != cudaErrorNotReady) CUDA_CHECK(e);
    ncclResult_t async = ncclSuccess;
    nccl_check(ncclCommGetAsyncError(comm_, &async), "ncclCommGetAsyncError");
    const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (async != ncclSuccess && async != ncclInProgress) {
      ncclCommAbort(comm_);
      comm_ = nullptr;
      world_.abort(std::string("the NCCL gradient all-reduce failed: ") + ncclGetErrorString(async));
    }
    if (waited > timeout_s_) {
      ncclCommAbort(comm_);
      comm_ = nullptr;
      world_.abort("the NCCL gradient all-reduce did not complete in " + std::to_string(static_cast<long>(timeout_s_)) +
                   " s (--collective-timeout): another rank died or hangs");
    }
    std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
}
//! [nccl-all-reduce]

}  // namespace qlora::cuda
