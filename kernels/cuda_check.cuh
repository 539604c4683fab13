// Error checking for every CUDA and cuBLAS call (all GPU chapters). A failed
// call throws std::runtime_error with the call text, file and line, so a bad
// launch never goes unnoticed: exit code 0 proves nothing on a GPU.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <stdexcept>
#include <string>

namespace qlora::cuda {

/// A CUDA allocation that did not fit (cudaErrorMemoryAllocation, or cuBLAS's
/// CUBLAS_STATUS_ALLOC_FAILED): the message adds the device's free and total memory at
/// the moment, and callers that know the run's settings add qlora plan's estimate.
class OutOfDeviceMemory : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

[[noreturn]] void throw_cuda_error(cudaError_t err, const char* what, const char* file, int line);
[[noreturn]] void throw_cublas_error(cublasStatus_t st, const char* what, const char* file, int line);

/// cudaMalloc through CUDA_MALLOC: out of memory then names the size that did not fit.
void device_malloc(void** p, std::size_t bytes, const char* file, int line);

}  // namespace qlora::cuda

#define CUDA_CHECK(call)                                                                  \
  do {                                                                                    \
    cudaError_t qlora_err_ = (call);                                                      \
    if (qlora_err_ != cudaSuccess) ::qlora::cuda::throw_cuda_error(qlora_err_, #call, __FILE__, __LINE__); \
  } while (0)

/// cudaMalloc(pp, bytes), checked, with the size in the out-of-memory message.
#define CUDA_MALLOC(pp, bytes) ::qlora::cuda::device_malloc(reinterpret_cast<void**>(pp), (bytes), __FILE__, __LINE__)

/// After a kernel launch: catches bad launch configurations at once.
#define CUDA_CHECK_LAUNCH() CUDA_CHECK(cudaGetLastError())

#define CUBLAS_CHECK(call)                                                                \
  do {                                                                                    \
    cublasStatus_t qlora_st_ = (call);                                                    \
    if (qlora_st_ != CUBLAS_STATUS_SUCCESS)                                               \
      ::qlora::cuda::throw_cublas_error(qlora_st_, #call, __FILE__, __LINE__);            \
  } while (0)
