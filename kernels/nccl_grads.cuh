// Summing the gradients of data-parallel ranks on the GPUs with NCCL (chapter 9, "More
// than one GPU"). One NCCL communicator per process: rank 0 makes its unique id and the
// ranks' MPI world broadcasts it, so MPI launches and NCCL moves the data, GPU to GPU
// over NVLink. The CPU reference of the same sum is CpuTrainer::reduce_grads
// (src/finetune.cpp), an MPI all-reduce on the host.
#pragma once
#include "adamw.cuh"
#include "data_parallel.hpp"

#include <cuda_runtime.h>
#include <nccl.h>

#include <vector>

namespace qlora::cuda {

class NcclGrads {
 public:
  /// Joins the NCCL communicator of `world`'s ranks (a collective: every rank calls it)
  /// over the gradient tensors `grads`. A world of one makes its own id and needs no
  /// broadcast. An all-reduce not done after timeout_s seconds aborts the job.
  NcclGrads(Communicator& world, std::vector<DeviceSpan> grads, double timeout_s);
  ~NcclGrads();
  NcclGrads(const NcclGrads&) = delete;
  NcclGrads& operator=(const NcclGrads&) = delete;

  /// Sums every gradient over the ranks in place: one group of all-reduces on `stream`,
  /// waited for against the deadline.
  void all_reduce(cudaStream_t stream);
  /// Bytes one all-reduce sums per rank (the gradients' size in float32).
  std::size_t bytes() const;

 private:
  Communicator& world_;
  std::vector<DeviceSpan> grads_;
  double timeout_s_;
  ncclComm_t comm_ = nullptr;
  cudaEvent_t done_ = nullptr;
};

}  // namespace qlora::cuda
