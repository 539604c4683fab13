// A named range on the CPU timeline that profilers attach to the kernels launched inside it
// (NVTX; `ncu --nvtx` prints it beside each kernel, scripts/gpu_profile.sh groups by it).
// Header-only and nearly free when no profiler is attached: a push and a pop.
#pragma once
#include <nvtx3/nvToolsExt.h>

namespace qlora::cuda {

class NvtxRange {
 public:
  explicit NvtxRange(const char* name) { nvtxRangePushA(name); }
  ~NvtxRange() { nvtxRangePop(); }
  NvtxRange(const NvtxRange&) = delete;
  NvtxRange& operator=(const NvtxRange&) = delete;
};

}  // namespace qlora::cuda
