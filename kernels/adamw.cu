// AdamW kernels and GPU optimizers (chapter 6). See adamw.cuh.
#include "adamw.cuh"

#include "dynamic_map.hpp"

#include <cmath>
#include <stdexcept>

namespace qlora::cuda {

namespace {

constexpr int kThreads = 256;

// One rounding per operation, in the CPU reference's order (see adamw.cuh).
__device__ __forceinline__ float mul(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ float add(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ float sub(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ float div(float a, float b) { return __fdiv_rn(a, b); }

unsigned grid_for(std::size_t n, std::size_t per_block, unsigned cap) {
  const std::size_t blocks = (n + per_block - 1) / per_block;
  return static_cast<unsigned>(blocks < cap ? blocks : cap);
}

std::size_t align_up(std::size_t x, std::size_t a) { return (x + a - 1) / a * a; }

}  // namespace

// ---------------------------------------------------------------------------------------
// FP32 AdamW. Reference: src/adamw.cpp:adamw_update.
//! [adamw32_kernel]
__global__ void adamw32_kernel(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ m,
                               float* __restrict__ v, std::size_t n, float decay, float beta1,
                               float one_minus_beta1, float beta2, float one_minus_beta2, float c2_sqrt,
                               float eps, float step_size) {
  for (std::size_t i = blockIdx.x * std::size_t{blockDim.x} + threadIdx.x; i < n;
       i += std::size_t{gridDim.x} * blockDim.x) {
    const float gi = g[i];
    const float pi = mul(p[i], decay);
    const float mi = add(mul(beta1, m[i]), mul(one_minus_beta1, gi));
    const float vi = add(mul(beta2, v[i]), mul(mul(one_minus_beta2, gi), gi));
    const float denom = add(div(__fsqrt_rn(vi), c2_sqrt), eps);
    p[i] = sub(pi, mul(step_size, div(mi, denom)));
    m[i] = mi;
    v[i] = vi;
  }
}
//! [adamw32_kernel]

void adamw32_update(float* p, const float* g, float* m, float* v, std::size_t n, float lr, const AdamWConfig& cfg,
                    BiasCorrection bc, cudaStream_t stream) {
  if (n == 0) return;
  // Host-side constants, computed exactly as adamw_update computes them.
  const float decay = 1.0f - lr * cfg.weight_decay;
  const float step_size = lr / bc.c1;
  adamw32_kernel<<<grid_for(n, kThreads * 4, 65535), kThreads, 0, stream>>>(
      p, g, m, v, n, decay, cfg.beta1, 1.0f - cfg.beta1, cfg.beta2, 1.0f - cfg.beta2, bc.c2_sqrt, cfg.eps,
      step_size);
  CUDA_CHECK_LAUNCH();
}

// ---------------------------------------------------------------------------------------
// 8-bit blockwise AdamW. Reference: src/adamw8bit.cpp:adamw8bit_update.
// One thread block per quantization block of 256 values, one value per thread.


// Reference: src/adamw8bit.cpp:requantize_state.
__device__ std::uint8_t requantize(float s, float absmax, const float* map, bool fix_sign) {
  const float x = absmax > 0.0f ? div(s, absmax) : 0.0f;
  std::uint8_t c = dynamic_code(x, map);
  if (fix_sign && signbit(map[c]) != signbit(s)) c = static_cast<std::uint8_t>(s > 0.0f ? c + 1 : c - 1);
  return c;
}

// Max of a value over the thread block (256 threads): warp shuffles, then one warp.
__device__ float block_max(float x, float* scratch) {
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  x = lane < kThreads / 32 ? scratch[lane] : 0.0f;
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  __syncthreads();  // scratch is reused by the next call
  return x;
}

//! [adamw8bit_kernel]
__global__ void __launch_bounds__(kThreads) adamw8bit_blockwise_kernel(
    float* __restrict__ p, const float* __restrict__ g, std::uint8_t* __restrict__ c1, std::uint8_t* __restrict__ c2,
    float* __restrict__ absmax1, float* __restrict__ absmax2, std::size_t n, Adam8bitStepConsts k,
    const float* __restrict__ maps) {
  __shared__ float map1[256], map2[256], scratch[kThreads / 32];
  map1[threadIdx.x] = maps[threadIdx.x];
  map2[threadIdx.x] = maps[256 + threadIdx.x];
  __syncthreads();

  const std::size_t b = blockIdx.x;
  const std::size_t i = b * kOptimBlock + threadIdx.x;
  const bool valid = i < n;
  // 1-2: dequantize with the old absmax and update in float32.
  float s1 = 0.0f, s2 = 0.0f;
  if (valid) {
    const float gi = g[i];
    s1 = add(mul(mul(map1[c1[i]], absmax1[b]), k.beta1), mul(k.one_minus_beta1, gi));
    s2 = add(mul(mul(map2[c2[i]], absmax2[b]), k.beta2), mul(mul(k.one_minus_beta2, gi), gi));
  }
  // 3: the block's new absmax from the updated states (padding threads contribute 0).
  const float max1 = block_max(fabsf(s1), scratch);
  const float max2 = block_max(fabsf(s2), scratch);
  if (!valid) return;
  if (threadIdx.x == 0) {
    absmax1[b] = max1;
    absmax2[b] = max2;
  }
  // 4: parameter update from the float states, decoupled decay after it (bitsandbytes' order).
  float pi = add(p[i], mul(k.step_size, div(s1, add(__fsqrt_rn(s2), k.eps_scaled))));
  if (k.apply_decay) pi = mul(pi, k.decay);
  p[i] = pi;
  // 5: requantize.
  c1[i] = requantize(s1, max1, map1, true);
  c2[i] = requantize(s2, max2, map2, false);
}
//! [adamw8bit_kernel]

void adamw8bit_update(float* p, const float* g, std::uint8_t* c1, std::uint8_t* c2, float* absmax1, float* absmax2,
                      std::size_t n, const Adam8bitStepConsts& k, const float* maps, cudaStream_t stream) {
  if (n == 0) return;
  const std::size_t blocks = (n + kOptimBlock - 1) / kOptimBlock;
  static_assert(kOptimBlock == std::size_t{kThreads}, "one thread per state value");
  adamw8bit_blockwise_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p, g, c1, c2, absmax1, absmax2,
                                                                                     n, k, maps);
  CUDA_CHECK_LAUNCH();
}

// ---------------------------------------------------------------------------------------
// Global gradient norm and clipping. Reference: src/adamw.cpp:global_grad_norm, clip_grad_norm.

// Sum of squares of a thread block's values (256 threads), in shared memory.
__device__ double block_sum(double x, double* scratch) {
  scratch[threadIdx.x] = x;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) scratch[threadIdx.x] += scratch[threadIdx.x + s];
    __syncthreads();
  }
  return scratch[0];
}

//! [grad_norm_kernels]
// Stage 1: each block adds the squares of its grid-stride share of one tensor.
__global__ void sumsq_partial_kernel(const float* __restrict__ x, std::size_t n, double* __restrict__ partials) {
  __shared__ double scratch[kThreads];
  double acc = 0.0;
  for (std::size_t i = blockIdx.x * std::size_t{blockDim.x} + threadIdx.x; i < n;
       i += std::size_t{gridDim.x} * blockDim.x)
    acc += double(x[i]) * double(x[i]);
  const double total = block_sum(acc, scratch);
  if (threadIdx.x == 0) partials[blockIdx.x] = total;
}

// Stage 2: one block adds all partials of all tensors; the total goes to partials[count].
__global__ void sum_partials_kernel(double* partials, int count) {
  __shared__ double scratch[kThreads];
  double acc = 0.0;
  for (int i = threadIdx.x; i < count; i += blockDim.x) acc += partials[i];
  const double total = block_sum(acc, scratch);
  if (threadIdx.x == 0) partials[count] = total;
}

// g *= min(1, max_norm / (‖g‖ + 1e-6)), with the norm read on the device.
__global__ void clip_scale_kernel(float* __restrict__ g, std::size_t n, const double* __restrict__ sumsq,
                                  double max_norm) {
  const float scale = static_cast<float>(fmin(1.0, max_norm / (sqrt(*sumsq) + 1e-6)));
  if (scale >= 1.0f) return;
  for (std::size_t i = blockIdx.x * std::size_t{blockDim.x} + threadIdx.x; i < n;
       i += std::size_t{gridDim.x} * blockDim.x)
    g[i] *= scale;
}
//! [grad_norm_kernels]

GradClipper::GradClipper(std::vector<DeviceSpan> grads) : grads_(std::move(grads)) {
  for (const auto& g : grads_) {
    const int b = static_cast<int>(grid_for(g.size, kThreads * 16, 256));
    blocks_.push_back(b);
    partial_count_ += b;
  }
  CUDA_MALLOC(&partials_, sizeof(double) * static_cast<std::size_t>(partial_count_ + 1));
}

GradClipper::~GradClipper() { cudaFree(partials_); }

void GradClipper::launch_norm(cudaStream_t stream) {
  int offset = 0;
  for (std::size_t t = 0; t < grads_.size(); ++t) {
    if (blocks_[t] == 0) continue;
    sumsq_partial_kernel<<<blocks_[t], kThreads, 0, stream>>>(grads_[t].data, grads_[t].size, partials_ + offset);
    CUDA_CHECK_LAUNCH();
    offset += blocks_[t];
  }
  sum_partials_kernel<<<1, kThreads, 0, stream>>>(partials_, partial_count_);
  CUDA_CHECK_LAUNCH();
}

double GradClipper::norm(cudaStream_t stream) {
  launch_norm(stream);
  double sumsq = 0.0;
  CUDA_CHECK(cudaMemcpyAsync(&sumsq, partials_ + partial_count_, sizeof sumsq, cudaMemcpyDeviceToHost, stream));
  CUDA_CHECK(cudaStreamSynchronize(stream));
  return std::sqrt(sumsq);
}

double GradClipper::clip(double max_norm, cudaStream_t stream) {
  if (!(max_norm > 0.0)) throw std::invalid_argument("clip_grad_norm: max_norm must be > 0");
  launch_norm(stream);
  for (const auto& g : grads_) {
    if (g.size == 0) continue;
    clip_scale_kernel<<<grid_for(g.size, kThreads * 4, 65535), kThreads, 0, stream>>>(
        g.data, g.size, partials_ + partial_count_, max_norm);
    CUDA_CHECK_LAUNCH();
  }
  double sumsq = 0.0;
  CUDA_CHECK(cudaMemcpyAsync(&sumsq, partials_ + partial_count_, sizeof sumsq, cudaMemcpyDeviceToHost, stream));
  CUDA_CHECK(cudaStreamSynchronize(stream));
  return std::sqrt(sumsq);
}

// ---------------------------------------------------------------------------------------
// Optimizers.

namespace {

// The parameter list in the CPU optimizers' terms: the same validation and the same state files.
std::vector<OptimParam> as_optim_params(const std::vector<DeviceParam>& params) {
  std::vector<OptimParam> out;
  for (const auto& p : params) out.push_back({p.name, p.value, p.grad, p.size});
  return out;
}

void check_device_params(const std::vector<DeviceParam>& params) { validate_params(as_optim_params(params)); }

// State to or from the host. cudaMemcpyDefault works for device and managed state alike,
// wherever the managed pages are; the synchronize first waits for update kernels still in
// flight on any stream.
void copy_state(void* dst, const void* src, std::size_t bytes) {
  CUDA_CHECK(cudaDeviceSynchronize());
  CUDA_CHECK(cudaMemcpy(dst, src, bytes, cudaMemcpyDefault));
}

std::size_t adamw32_layout(const std::vector<DeviceParam>& params, std::vector<std::size_t>& offset) {
  std::size_t floats = 0;
  for (const auto& p : params) {
    offset.push_back(floats);
    floats = align_up(floats + 2 * p.size, 64);  // 256-byte aligned tensors
  }
  return floats * sizeof(float);
}

}  // namespace

CudaAdamW::CudaAdamW(std::vector<DeviceParam> params, AdamWConfig cfg, StatePlacement placement)
    : params_(std::move(params)), cfg_(cfg) {
  check_device_params(params_);
  states_ = StateBuffer(adamw32_layout(params_, offset_), placement, "AdamW (32-bit) states");
}

float* CudaAdamW::m(std::size_t i) const { return static_cast<float*>(states_.data()) + offset_.at(i); }
float* CudaAdamW::v(std::size_t i) const { return m(i) + params_.at(i).size; }

void CudaAdamW::step(float lr, cudaStream_t stream) {
  ++t_;
  const BiasCorrection bc = bias_correction(cfg_, t_);
  states_.page_in(stream);  // paged: bring the states back before the kernels touch them
  for (std::size_t i = 0; i < params_.size(); ++i)
    adamw32_update(params_[i].value, params_[i].grad, m(i), v(i), params_[i].size, lr, cfg_, bc, stream);
}

std::vector<float> CudaAdamW::exp_avg(std::size_t i) const {
  std::vector<float> out(params_.at(i).size);
  copy_state(out.data(), m(i), out.size() * sizeof(float));
  return out;
}

std::vector<float> CudaAdamW::exp_avg_sq(std::size_t i) const {
  std::vector<float> out(params_.at(i).size);
  copy_state(out.data(), v(i), out.size() * sizeof(float));
  return out;
}

void CudaAdamW::save_state(const std::filesystem::path& path) const {
  std::vector<std::vector<float>> m, v;
  for (std::size_t i = 0; i < params_.size(); ++i) {
    m.push_back(exp_avg(i));
    v.push_back(exp_avg_sq(i));
  }
  save_adamw_state(path, cfg_, as_optim_params(params_), t_, m, v);
}

void CudaAdamW::load_state(const std::filesystem::path& path) {
  const AdamWStateData d = load_adamw_state(path, as_optim_params(params_));  // throws before any copy
  for (std::size_t i = 0; i < params_.size(); ++i) {
    copy_state(m(i), d.m[i].data(), d.m[i].size() * sizeof(float));
    copy_state(v(i), d.v[i].data(), d.v[i].size() * sizeof(float));
  }
  t_ = d.step;
}

CudaAdamW8bit::CudaAdamW8bit(std::vector<DeviceParam> params, AdamWConfig cfg, StatePlacement placement)
    : params_(std::move(params)), cfg_(cfg) {
  check_device_params(params_);
  std::size_t bytes = 0;
  auto take = [&bytes](std::size_t n) {
    const std::size_t at = bytes;
    bytes = align_up(bytes + n, 256);
    return at;
  };
  for (const auto& p : params_) {
    Layout l{};
    if (p.size >= kMin8bitSize) {
      const std::size_t blocks = (p.size + kOptimBlock - 1) / kOptimBlock;
      l.absmax1 = take(blocks * sizeof(float));
      l.absmax2 = take(blocks * sizeof(float));
      l.c1 = take(p.size);
      l.c2 = take(p.size);
    } else {
      l.m = take(p.size * sizeof(float));
      l.v = take(p.size * sizeof(float));
    }
    layout_.push_back(l);
  }
  states_ = StateBuffer(bytes, placement, "AdamW (8-bit) states");
  CUDA_MALLOC(&maps_, 512 * sizeof(float));
  CUDA_CHECK(cudaMemcpy(maps_, adam8bit_map1().data(), 256 * sizeof(float), cudaMemcpyHostToDevice));
  CUDA_CHECK(cudaMemcpy(maps_ + 256, adam8bit_map2().data(), 256 * sizeof(float), cudaMemcpyHostToDevice));
}

CudaAdamW8bit::~CudaAdamW8bit() { cudaFree(maps_); }

void CudaAdamW8bit::step(float lr, cudaStream_t stream) {
  ++t_;
  const Adam8bitStepConsts k = adam8bit_consts(cfg_, lr, t_);
  const BiasCorrection bc = bias_correction(cfg_, t_);
  states_.page_in(stream);
  auto* base = static_cast<std::uint8_t*>(states_.data());
  for (std::size_t i = 0; i < params_.size(); ++i) {
    const DeviceParam& p = params_[i];
    const Layout& l = layout_[i];
    if (p.size >= kMin8bitSize)
      adamw8bit_update(p.value, p.grad, base + l.c1, base + l.c2, reinterpret_cast<float*>(base + l.absmax1),
                       reinterpret_cast<float*>(base + l.absmax2), p.size, k, maps_, stream);
    else
      adamw32_update(p.value, p.grad, reinterpret_cast<float*>(base + l.m), reinterpret_cast<float*>(base + l.v),
                     p.size, lr, cfg_, bc, stream);
  }
}

AdamW8bit::State CudaAdamW8bit::state(std::size_t i) const {
  const std::size_t n = params_.at(i).size;
  const Layout& l = layout_[i];
  const auto* base = static_cast<const std::uint8_t*>(states_.data());
  AdamW8bit::State s;
  if (n >= kMin8bitSize) {
    const std::size_t blocks = (n + kOptimBlock - 1) / kOptimBlock;
    s.c1.resize(n);
    s.c2.resize(n);
    s.absmax1.resize(blocks);
    s.absmax2.resize(blocks);
    copy_state(s.c1.data(), base + l.c1, n);
    copy_state(s.c2.data(), base + l.c2, n);
    copy_state(s.absmax1.data(), base + l.absmax1, blocks * sizeof(float));
    copy_state(s.absmax2.data(), base + l.absmax2, blocks * sizeof(float));
  } else {
    s.m32.resize(n);
    s.v32.resize(n);
    copy_state(s.m32.data(), base + l.m, n * sizeof(float));
    copy_state(s.v32.data(), base + l.v, n * sizeof(float));
  }
  return s;
}

void CudaAdamW8bit::save_state(const std::filesystem::path& path) const {
  std::vector<AdamW8bit::State> states;
  for (std::size_t i = 0; i < params_.size(); ++i) states.push_back(state(i));
  save_adamw8bit_state(path, cfg_, as_optim_params(params_), t_, states);
}

void CudaAdamW8bit::load_state(const std::filesystem::path& path) {
  const AdamW8bitStateData d = load_adamw8bit_state(path, as_optim_params(params_));  // throws before any copy
  auto* base = static_cast<std::uint8_t*>(states_.data());
  for (std::size_t i = 0; i < params_.size(); ++i) {
    const AdamW8bit::State& s = d.states[i];
    const Layout& l = layout_[i];
    if (params_[i].size >= kMin8bitSize) {
      copy_state(base + l.c1, s.c1.data(), s.c1.size());
      copy_state(base + l.c2, s.c2.data(), s.c2.size());
      copy_state(base + l.absmax1, s.absmax1.data(), s.absmax1.size() * sizeof(float));
      copy_state(base + l.absmax2, s.absmax2.data(), s.absmax2.size() * sizeof(float));
    } else {
      copy_state(base + l.m, s.m32.data(), s.m32.size() * sizeof(float));
      copy_state(base + l.v, s.v32.data(), s.v32.size() * sizeof(float));
    }
  }
  t_ = d.step;
}

}  // namespace qlora::cuda
