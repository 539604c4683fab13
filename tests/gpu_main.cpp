// Catch2 v2 main for GPU test executables. Without a CUDA device it prints why
// and exits 77, which CTest reports as "skipped" (SKIP_RETURN_CODE), so CI
// machines without a GPU still pass. Listing tests needs no device.
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include <cuda_runtime.h>

#include <cstdio>
#include <string_view>

int main(int argc, char* argv[]) {
  bool listing = false;
  for (int i = 1; i < argc; ++i) {
    std::string_view a = argv[i];
    listing = listing || a.rfind("--list", 0) == 0;
  }
  if (!listing) {
    int count = 0;
    cudaError_t err = cudaGetDeviceCount(&count);
    if (err != cudaSuccess || count == 0) {
      std::printf("SKIPPED: no CUDA device available (%s); GPU tests run on a machine with one.\n",
                  err != cudaSuccess ? cudaGetErrorString(err) : "0 devices");
      return 77;
    }
  }
  return Catch::Session().run(argc, argv);
}
