// GPU blockwise 4-bit quantization (chapter 5). See quantize4.cuh.
// CPU reference: quantize_4bit() and quantize_blockwise_8bit() (src/quant4.cpp,
// src/dynamic_map.cpp). Built without fast math: the explicit flushes below are the
// reference's float32 operations, and 1/absmax is bitsandbytes' own instruction,
// rcp.approx.ftz.f32 (fast_math_reciprocal.cuh), which the CPU reproduces from a
// measured table for a BF16 absmax and approximates by the IEEE quotient otherwise.
#include "quantize4.cuh"

#include "dynamic_map.hpp"
#include "fast_math_reciprocal.cuh"
#include "fp4.hpp"
#include "nf4.hpp"

#include <cuda_bf16.h>

#include <algorithm>
#include <bit>
#include <cfloat>
#include <cmath>
#include <numeric>
#include <stdexcept>
#include <string>

namespace qlora::cuda {

//! [threshold-bisection]
// float32 values in the order of an unsigned integer key: -FLT_MAX < ... < -0 < +0 < ... < FLT_MAX.
static std::uint32_t order_key(float f) {
  const auto u = std::bit_cast<std::uint32_t>(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
static float from_order_key(std::uint32_t k) {
  return std::bit_cast<float>((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// For a monotone rank function over [lo, hi] with rank(lo) = 0 and rank(hi) = ranks - 1,
// thresholds[k] is the largest float with rank <= k, so rank(x) = #{k : x > thresholds[k]}.
// Each step is checked to be exactly one rank wide at exactly one float.
template <class Rank>
static std::vector<float> bisect_thresholds(Rank rank, int ranks, float lo, float hi, const char* what) {
  if (rank(lo) != 0 || rank(hi) != ranks - 1) {
    throw std::logic_error(std::string(what) + ": the encoder does not span its codes over the float range");
  }
  std::vector<float> thresholds;
  for (int k = 0; k + 1 < ranks; ++k) {
    std::uint32_t a = order_key(lo), b = order_key(hi);  // rank(a) <= k < rank(b)
    while (b - a > 1) {
      const std::uint32_t mid = a + (b - a) / 2;
      if (rank(from_order_key(mid)) <= k) a = mid; else b = mid;
    }
    if (rank(from_order_key(a)) != k || rank(from_order_key(b)) != k + 1) {
      throw std::logic_error(std::string(what) + ": the encoder is not a monotone step function (rank " +
                             std::to_string(k) + ")");
    }
    thresholds.push_back(from_order_key(a));
  }
  return thresholds;
}
//! [threshold-bisection]

static EncoderThresholds make_nf4_thresholds() {
  EncoderThresholds e;
  e.thresholds = bisect_thresholds([](float x) { return int{nf4_encode(x)}; }, 16, -FLT_MAX, FLT_MAX, "nf4_encode");
  for (int c = 0; c < 16; ++c) e.code_of_rank.push_back(static_cast<std::uint8_t>(c));  // the table is sorted
  return e;
}

static EncoderThresholds make_fp4_thresholds() {
  // FP4 codes 0..7 in the order of their magnitudes: 0, 1/192, 1/6, 1/4, 1/3, 1/2, 2/3, 1.
  std::array<int, 8> code_of_rank{};
  std::iota(code_of_rank.begin(), code_of_rank.end(), 0);
  std::sort(code_of_rank.begin(), code_of_rank.end(), [](int a, int b) { return fp4_table[a] < fp4_table[b]; });
  std::array<int, 8> rank_of_code{};
  for (int r = 0; r < 8; ++r) rank_of_code[code_of_rank[r]] = r;
  EncoderThresholds e;
  e.sign_magnitude = true;
  e.thresholds = bisect_thresholds([&](float a) { return rank_of_code[fp4_encode(a) & 7]; }, 8, 0.0f, FLT_MAX,
                                   "fp4_encode");
  for (int c : code_of_rank) e.code_of_rank.push_back(static_cast<std::uint8_t>(c));
  return e;
}

const EncoderThresholds& encoder_thresholds(QuantType type) {
  static const EncoderThresholds nf4 = make_nf4_thresholds();
  static const EncoderThresholds fp4 = make_fp4_thresholds();
  return type == QuantType::nf4 ? nf4 : fp4;
}

const EncoderThresholds& dynamic_map_thresholds() {
  static const EncoderThresholds dyn = [] {
    const auto map = dynamic_map(true);
    EncoderThresholds e;
    e.thresholds = bisect_thresholds([&](float x) { return int{quantize_dynamic(x, map)}; }, 256, -FLT_MAX, FLT_MAX,
                                     "quantize_dynamic");
    for (int c = 0; c < 256; ++c) e.code_of_rank.push_back(static_cast<std::uint8_t>(c));
    return e;
  }();
  return dyn;
}

// ---------------------------------------------------------------------------------------------
// Device side.

/// A 4-bit encoder, passed by value to the kernel: at most 15 thresholds.
struct Encoder4 {
  float thresholds[16];
  std::uint8_t code_of_rank[16];
};

static Encoder4 make_encoder4(QuantType type) {
  const auto& e = encoder_thresholds(type);
  Encoder4 enc{};
  std::fill(std::begin(enc.thresholds), std::end(enc.thresholds), FLT_MAX);
  std::copy(e.thresholds.begin(), e.thresholds.end(), enc.thresholds);
  std::copy(e.code_of_rank.begin(), e.code_of_rank.end(), enc.code_of_rank);
  return enc;
}

//! [device-rank]
/// #{k : x > thresholds[k]} for 2^kSteps - 1 ascending thresholds, by binary search.
/// NaN compares false everywhere and gets rank 0, as in the CPU decision trees.
template <int kSteps>
static __device__ __forceinline__ int threshold_rank(float x, const float* thresholds) {
  int r = 0;
#pragma unroll
  for (int s = kSteps - 1; s >= 0; --s) {
    if (x > thresholds[r + (1 << s) - 1]) r += 1 << s;
  }
  return r;
}

template <QuantType kType>
static __device__ __forceinline__ std::uint8_t encode4(float x, const float* thresholds, const std::uint8_t* code_of_rank) {
  if constexpr (kType == QuantType::nf4) {
    return static_cast<std::uint8_t>(threshold_rank<4>(x, thresholds));  // 15 thresholds, codes sorted
  } else {
    const std::uint8_t sign = x < 0.0f ? 0b1000 : 0b0000;  // FP4: sign bit, then 7 magnitude thresholds
    return static_cast<std::uint8_t>(code_of_rank[threshold_rank<3>(fabsf(x), thresholds)] | sign);
  }
}
//! [device-rank]

static __host__ __device__ __forceinline__ float to_f32(float v) { return v; }
static __host__ __device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

static __device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

constexpr int kWarpsPerBlock = 8;

//! [quantize-kernel]
/// One warp per quantization block: the lanes find the absmax together (max is
/// exact in any order), then each lane encodes pairs of values into bytes.
template <class TIn, QuantType kType>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    quantize4_kernel(const TIn* __restrict__ x, std::int64_t numel, int blocksize, std::int64_t num_blocks,
                     Encoder4 enc, std::uint8_t* __restrict__ packed, float* __restrict__ absmax,
                     unsigned long long* first_bad) {
  __shared__ float s_thresholds[16];
  __shared__ std::uint8_t s_code_of_rank[16];
  if (threadIdx.x < 16) {
    s_thresholds[threadIdx.x] = enc.thresholds[threadIdx.x];
    s_code_of_rank[threadIdx.x] = enc.code_of_rank[threadIdx.x];
  }
  __syncthreads();
  const std::int64_t b = static_cast<std::int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (b >= num_blocks) return;
  const std::int64_t begin = b * blocksize;
  const std::int64_t end = min(begin + blocksize, numel);

  float m = 0.0f;
  for (std::int64_t i = begin + lane; i < end; i += 32) {
    const float v = to_f32(x[i]);
    if (!isfinite(v)) atomicMin(first_bad, static_cast<unsigned long long>(i));
    m = fmaxf(m, fabsf(flush_subnormal_d(v)));
  }
  m = warp_max(m);
  // bitsandbytes' fast-math 1/absmax; an all-zero block gives inf, and 0 * inf = NaN -> code 0
  const float inv = rcp_approx_ftz_d(m);

  for (std::int64_t i = begin + 2 * lane; i < end; i += 64) {
    const float hi = flush_subnormal_d(to_f32(x[i]));
    const float lo = i + 1 < end ? flush_subnormal_d(to_f32(x[i + 1])) : 0.0f;  // odd length: a padding zero
    const std::uint8_t c_hi = encode4<kType>(flush_subnormal_d(__fmul_rn(hi, inv)), s_thresholds, s_code_of_rank);
    const std::uint8_t c_lo = encode4<kType>(flush_subnormal_d(__fmul_rn(lo, inv)), s_thresholds, s_code_of_rank);
    packed[i / 2] = static_cast<std::uint8_t>((c_hi << 4) | c_lo);  // first element in the high nibble
  }
  if (lane == 0) absmax[b] = m;
}
//! [quantize-kernel]

//! [nested-kernel]
/// Double quantization's second level, quantize_blockwise_8bit() on (absmax - offset)
/// with blocksize 256 and the signed dynamic map: one warp per 256 scales.
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    quantize_nested_kernel(const float* __restrict__ absmax, std::int64_t n, float offset,
                           const float* __restrict__ thresholds, std::uint8_t* __restrict__ codes,
                           float* __restrict__ nested_absmax) {
  __shared__ float s_thresholds[256];
  for (int k = threadIdx.x; k < 256; k += blockDim.x) s_thresholds[k] = k < 255 ? thresholds[k] : FLT_MAX;
  __syncthreads();
  const std::int64_t b = static_cast<std::int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (b * 256 >= n) return;
  const std::int64_t begin = b * 256;
  const std::int64_t end = min(begin + 256, n);

  float m = 0.0f;
  for (std::int64_t i = begin + lane; i < end; i += 32) {
    m = fmaxf(m, fabsf(flush_subnormal_d(__fsub_rn(absmax[i], offset))));
  }
  m = warp_max(m);
  const float inv = rcp_approx_ftz_d(m);  // the same instruction as bitsandbytes' 8-bit kernel
  for (std::int64_t i = begin + lane; i < end; i += 32) {
    const float centred = flush_subnormal_d(__fsub_rn(absmax[i], offset));
    codes[i] = static_cast<std::uint8_t>(threshold_rank<8>(flush_subnormal_d(__fmul_rn(centred, inv)), s_thresholds));
  }
  if (lane == 0) nested_absmax[b] = m;
}
//! [nested-kernel]

// ---------------------------------------------------------------------------------------------
// Host side.

//! [absmax-mean-host]
// The double-quantization offset, summed on the host in the reference's order
// (mean_f32 in src/quant4.cpp: a double sum, one rounding to float32), so that
// the offset, and every code that depends on it, is the CPU's to the bit.
static float mean_like_cpu_reference(const std::vector<float>& v) {
  double sum = 0.0;
  for (float a : v) sum += a;
  return static_cast<float>(sum / static_cast<double>(v.size()));
}
//! [absmax-mean-host]

template <class TIn>
static void launch_quantize4(const TIn* x, DeviceQuant4& q, float* absmax, unsigned long long* first_bad,
                             cudaStream_t stream) {
  const auto num_blocks = q.num_blocks();
  const auto grid = static_cast<unsigned>((num_blocks + kWarpsPerBlock - 1) / kWarpsPerBlock);
  const Encoder4 enc = make_encoder4(q.type);
  if (q.type == QuantType::nf4) {
    quantize4_kernel<TIn, QuantType::nf4><<<grid, kWarpsPerBlock * 32, 0, stream>>>(
        x, q.numel, q.blocksize, num_blocks, enc, q.packed.data(), absmax, first_bad);
  } else {
    quantize4_kernel<TIn, QuantType::fp4><<<grid, kWarpsPerBlock * 32, 0, stream>>>(
        x, q.numel, q.blocksize, num_blocks, enc, q.packed.data(), absmax, first_bad);
  }
  CUDA_CHECK_LAUNCH();
}

template <class TIn>
static void quantize4_impl(const TIn* x, DeviceQuant4& q, cudaStream_t stream) {
  if (q.numel == 0) return;
  if (x == nullptr) throw std::invalid_argument("quantize4: input pointer is null");
  DeviceBuffer<unsigned long long> first_bad(1);
  CUDA_CHECK(cudaMemsetAsync(first_bad.data(), 0xFF, first_bad.bytes(), stream));  // "none" = max value
  // With double quantization the float32 absmax is an intermediate: keep it in scratch.
  DeviceBuffer<float> absmax_scratch(q.double_quant ? static_cast<std::size_t>(q.num_blocks()) : 0);
  float* absmax = q.double_quant ? absmax_scratch.data() : q.absmax.data();
  launch_quantize4(x, q, absmax, first_bad.data(), stream);

  unsigned long long bad = 0;
  CUDA_CHECK(cudaMemcpyAsync(&bad, first_bad.data(), sizeof bad, cudaMemcpyDeviceToHost, stream));
  CUDA_CHECK(cudaStreamSynchronize(stream));
  if (bad != ~0ull) {
    TIn value{};
    CUDA_CHECK(cudaMemcpy(&value, x + bad, sizeof value, cudaMemcpyDeviceToHost));
    const float v = to_f32(value);
    throw std::invalid_argument("quantize4 (GPU): value at index " + std::to_string(bad) + " is " +
                                (std::isnan(v) ? "NaN" : "infinite") + "; quantization needs finite input");
  }
  if (!q.double_quant) return;

  q.offset = mean_like_cpu_reference(absmax_scratch.download());
  const auto& dyn = dynamic_map_thresholds();
  DeviceBuffer<float> thresholds = to_device(std::span<const float>(dyn.thresholds));
  const auto n = static_cast<std::int64_t>(absmax_scratch.size());
  const auto nested_blocks = (n + 255) / 256;
  const auto grid = static_cast<unsigned>((nested_blocks + kWarpsPerBlock - 1) / kWarpsPerBlock);
  quantize_nested_kernel<<<grid, kWarpsPerBlock * 32, 0, stream>>>(absmax, n, q.offset, thresholds.data(),
                                                                    q.absmax_code.data(), q.nested_absmax.data());
  CUDA_CHECK_LAUNCH();
  CUDA_CHECK(cudaStreamSynchronize(stream));  // the scratch buffers die with this scope
}

void quantize4_into(const float* x, DeviceQuant4& out, cudaStream_t stream) { quantize4_impl(x, out, stream); }

void quantize4_into(const bf16* x, DeviceQuant4& out, cudaStream_t stream) {
  quantize4_impl(reinterpret_cast<const __nv_bfloat16*>(x), out, stream);
}

DeviceQuant4 quantize4(const float* x, std::vector<std::int64_t> shape, QuantType type, int blocksize,
                       bool double_quant, cudaStream_t stream) {
  DeviceQuant4 q = DeviceQuant4::allocate(type, blocksize, std::move(shape), double_quant);
  quantize4_into(x, q, stream);
  return q;
}

DeviceQuant4 quantize4(const bf16* x, std::vector<std::int64_t> shape, QuantType type, int blocksize,
                       bool double_quant, cudaStream_t stream) {
  DeviceQuant4 q = DeviceQuant4::allocate(type, blocksize, std::move(shape), double_quant);
  quantize4_into(x, q, stream);
  return q;
}

}  // namespace qlora::cuda
