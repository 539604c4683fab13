// Error reporting behind CUDA_CHECK / CUBLAS_CHECK. See cuda_check.cuh.
#include "cuda_check.cuh"

namespace qlora::cuda {

void throw_cuda_error(cudaError_t err, const char* what, const char* file, int line) {
  throw std::runtime_error(std::string("CUDA error: ") + cudaGetErrorString(err) + " in " + what + " at " + file +
                           ":" + std::to_string(line));
}

void throw_cublas_error(cublasStatus_t st, const char* what, const char* file, int line) {
  throw std::runtime_error(std::string("cuBLAS error: ") + cublasGetStatusString(st) + " in " + what + " at " +
                           file + ":" + std::to_string(line));
}

}  // namespace qlora::cuda
