// Error reporting behind CUDA_CHECK / CUBLAS_CHECK. See cuda_check.cuh.
#include "cuda_check.cuh"

#include <cstdio>

namespace qlora::cuda {

namespace {
// "12.31 GiB free of 139.81 GiB": asked after the failure, so it is what the next try would find.
std::string memory_now() {
  std::size_t free = 0, total = 0;
  if (cudaMemGetInfo(&free, &total) != cudaSuccess) return "device memory unknown";
  char buf[96];
  std::snprintf(buf, sizeof buf, "%.2f GiB free of %.2f GiB on the device", static_cast<double>(free) / 1073741824.0,
                static_cast<double>(total) / 1073741824.0);
  return buf;
}
}  // namespace

void throw_cuda_error(cudaError_t err, const char* what, const char* file, int line) {
  const std::string where = std::string(" in ") + what + " at " + file + ":" + std::to_string(line);
  if (err == cudaErrorMemoryAllocation) {
    cudaGetLastError();  // reset the last-error state: the failure is reported here, not by the next check
    throw OutOfDeviceMemory("CUDA out of memory" + where + " (" + memory_now() + ")");
  }
  throw std::runtime_error(std::string("CUDA error: ") + cudaGetErrorString(err) + where);
}

void throw_cublas_error(cublasStatus_t st, const char* what, const char* file, int line) {
  const std::string where = std::string(" in ") + what + " at " + file + ":" + std::to_string(line);
  if (st == CUBLAS_STATUS_ALLOC_FAILED) throw OutOfDeviceMemory("cuBLAS out of memory" + where + " (" + memory_now() + ")");
  throw std::runtime_error(std::string("cuBLAS error: ") + cublasGetStatusString(st) + where);
}

void device_malloc(void** p, std::size_t bytes, const char* file, int line) {
  const cudaError_t err = cudaMalloc(p, bytes);
  if (err == cudaSuccess) return;
  char what[64];
  std::snprintf(what, sizeof what, "cudaMalloc of %.2f GiB", static_cast<double>(bytes) / (1ull << 30));
  throw_cuda_error(err, what, file, line);
}

}  // namespace qlora::cuda
