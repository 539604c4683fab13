// The fused 4-bit GEMV (chapter 5), four versions side by side. See gemv4.cuh.
// CPU reference: matmul_xwt_ref() on dequantize_4bit_bf16() weights.
#include "gemv4.cuh"

#include "dequant4.cuh"

#include <cuda_bf16.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace qlora::cuda {

constexpr int kGemvThreads = 256;
constexpr int kGemvWarps = kGemvThreads / 32;

static __device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

//! [gemv-naive]
/// Version 1: one warp per output row; lane l takes values l, l + 32, ... of the row,
/// decodes each one exactly as the dequantize kernel does (bf16-rounded weight), and
/// the warp adds up its 32 partial sums with shuffles. Any shape; slow: 1-byte
/// loads, and every value re-decodes its block's scale.
template <class OutT>
__global__ void gemv4_naive_kernel(Quant4View q, const __nv_bfloat16* __restrict__ x, OutT* __restrict__ y,
                                   int out, int in, int tokens) {
  const int row = blockIdx.x * kGemvWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= out) return;
  float acc[kMaxGemvTokens] = {};
  for (int i = lane; i < in; i += 32) {
    const std::int64_t flat = static_cast<std::int64_t>(row) * in + i;
    const std::uint8_t byte = q.packed[flat >> 1];
    const int code = (flat & 1) ? byte & 0x0f : byte >> 4;
    const float absmax = block_absmax_d(q, q.nested_map, flat >> q.log2_blocksize);
    const float w = __bfloat162float(__float2bfloat16_rn(dequant_value_d(q.table[code], absmax)));
#pragma unroll
    for (int t = 0; t < kMaxGemvTokens; ++t) {
      if (t < tokens) acc[t] = fmaf(__bfloat162float(x[static_cast<std::int64_t>(t) * in + i]), w, acc[t]);
    }
  }
#pragma unroll
  for (int t = 0; t < kMaxGemvTokens; ++t) {
    const float sum = warp_sum(acc[t]);
    if (t < tokens && lane == 0) store_y(y, static_cast<std::int64_t>(t) * out + row, sum);
  }
}
//! [gemv-naive]

//! [gemv-swizzle]
/// x lives in shared memory as 16-byte chunks. Lane l reads chunk 4l + j at step j, a
/// 64-byte stride that would put 8 lanes on 2 of the 8 bank groups (4-way conflicts).
/// XOR-ing the chunk's position inside its 128-byte row with the row number spreads
/// any 8 consecutive lanes over all 8 groups; it only permutes chunks within a row.
static __device__ __forceinline__ int swizzle(int chunk) { return chunk ^ ((chunk >> 3) & 7); }
//! [gemv-swizzle]

static __device__ __forceinline__ std::uint32_t word_of(const uint4& v, int j) {
  return j == 0 ? v.x : j == 1 ? v.y : j == 2 ? v.z : v.w;
}

/// The end of both fused versions: each lane holds partial sums for kRows rows and
/// kTokens tokens; a shuffle tree adds them over the warp, lane 0 writes rows that exist.
template <int kRows, int kTokens, class OutT>
static __device__ __forceinline__ void store_rows(const float (&acc)[kRows][kTokens], OutT* y, int row0, int out,
                                                  int lane) {
#pragma unroll
  for (int r = 0; r < kRows; ++r)
#pragma unroll
    for (int t = 0; t < kTokens; ++t) {
      const float sum = warp_sum(acc[r][t]);
      if (lane == 0 && row0 + r < out) store_y(y, static_cast<std::int64_t>(t) * out + row0 + r, sum);
    }
}

//! [gemv-fused]
/// Version 2. The block copies x (kTokens × in bf16) into shared memory once and then
/// walks rows; each warp takes kRows rows at a time. Lane l loads 16 bytes of codes
/// (32 values) per row, one coalesced 512-byte transaction per warp, kLoads of them
/// in flight before the first use, and multiplies them against x in registers. The block scale multiplies the chunk's partial sum
/// once, instead of every weight: Σ x·(t·a) = a·Σ x·t, a float32 reassociation well
/// inside the bf16 tolerance (the test argues it). A warp-shuffle tree adds the lanes.
template <int kTokens, int kRows, int kLoads, class OutT>
__global__ void __launch_bounds__(kGemvThreads)
    gemv4_fused_kernel(Quant4View q, const uint4* __restrict__ x, OutT* __restrict__ y, int out, int in) {
  extern __shared__ uint4 s_x[];
  __shared__ float s_table[16];
  __shared__ float s_map[256];
  const int x_row_chunks = in / 8;  // 16-byte chunks of x per token
  for (int g = threadIdx.x; g < kTokens * x_row_chunks; g += kGemvThreads) s_x[swizzle(g)] = x[g];
  if (threadIdx.x < 16) s_table[threadIdx.x] = q.table[threadIdx.x];
  if (q.double_quant) s_map[threadIdx.x] = q.nested_map[threadIdx.x];  // kGemvThreads == 256
  __syncthreads();

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int row_chunks = in / 32;  // 16-byte chunks of codes per row
  const auto* codes = reinterpret_cast<const uint4*>(q.packed);
  for (int row0 = (blockIdx.x * kGemvWarps + warp) * kRows; row0 < out; row0 += gridDim.x * kGemvWarps * kRows) {
    float acc[kRows][kTokens] = {};
    for (int c0 = lane; c0 < row_chunks; c0 += 32 * kLoads) {
      // Issue every load of this step (kLoads chunks of each of kRows rows) before using any.
      uint4 w[kLoads][kRows];
      float absmax[kLoads][kRows];
#pragma unroll
      for (int l = 0; l < kLoads; ++l)
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          // Past the last row, re-read the last row (always valid); its sum is never stored.
          const int c = min(c0 + 32 * l, row_chunks - 1);  // past the row's end: likewise, weighted 0 below
          const std::int64_t chunk = static_cast<std::int64_t>(min(row0 + r, out - 1)) * row_chunks + c;
          w[l][r] = codes[chunk];
          absmax[l][r] = block_absmax_d(q, s_map, (chunk * 32) >> q.log2_blocksize);
        }
#pragma unroll
      for (int l = 0; l < kLoads; ++l) {
        // A chunk past the row's end is computed on a valid duplicate and weighted 0:
        // no branch between the loads and their use, so the loads stay hoisted.
        const int c = min(c0 + 32 * l, row_chunks - 1);
        const float weight = c0 + 32 * l < row_chunks ? 1.0f : 0.0f;
        float part[kRows][kTokens] = {};
#pragma unroll
        for (int j = 0; j < 4; ++j) {  // code word j: 4 bytes = values 8j .. 8j+7 of the chunk
          uint4 xv[kTokens];           // the same 8 values of x, for every token
#pragma unroll
          for (int t = 0; t < kTokens; ++t) xv[t] = s_x[swizzle(t * x_row_chunks + 4 * c + j)];
#pragma unroll
          for (int r = 0; r < kRows; ++r) {
            const std::uint32_t word = word_of(w[l][r], j);
#pragma unroll
            for (int m = 0; m < 4; ++m) {  // byte m: high nibble = value 2m, low nibble = value 2m+1
              const float w_first = s_table[(word >> (8 * m + 4)) & 0x0f];
              const float w_second = s_table[(word >> (8 * m)) & 0x0f];
#pragma unroll
              for (int t = 0; t < kTokens; ++t) {
                const std::uint32_t xw = word_of(xv[t], m);  // bf16 pair: value 2m low, 2m+1 high
                part[r][t] = fmaf(w_first, __uint_as_float(xw << 16), part[r][t]);
                part[r][t] = fmaf(w_second, __uint_as_float(xw & 0xffff0000u), part[r][t]);
              }
            }
          }
        }
#pragma unroll
        for (int r = 0; r < kRows; ++r)
#pragma unroll
          for (int t = 0; t < kTokens; ++t) acc[r][t] = fmaf(part[r][t], weight * absmax[l][r], acc[r][t]);
      }
    }
    store_rows<kRows, kTokens>(acc, y, row0, out, lane);
  }
}
//! [gemv-fused]

//! [gemv-multirow]
/// The 16-entry table at a byte offset (4 × code): see nibble_offsets().
static __device__ __forceinline__ float table_at(const float* s_table, std::uint32_t byte_offset) {
  return *reinterpret_cast<const float*>(reinterpret_cast<const char*>(s_table) + byte_offset);
}

/// Byte m of the result is 4 × the high (hi) or low (lo) nibble of byte m of the code
/// word: the shared-memory byte offset of that code's table entry. Two instructions
/// per 8 codes; then one byte extract (__byte_perm) per code, instead of a shift, a
/// mask and an address multiply per code.
struct NibbleOffsets {
  std::uint32_t hi, lo;
};
static __device__ __forceinline__ NibbleOffsets nibble_offsets(std::uint32_t word) {
  return {(word >> 2) & 0x3c3c3c3cu, (word << 2) & 0x3c3c3c3cu};
}
static __device__ __forceinline__ std::uint32_t byte_of(std::uint32_t v, int m) {
  return __byte_perm(v, 0u, 0x4440u | static_cast<std::uint32_t>(m));
}

/// Blocks per multiprocessor that versions 3 and 4 size their registers for: 65536 / (256
/// threads × blocks), so 128 per thread at 2 blocks, 80 at 3. Version 4 at one token asks
/// for 3 (see launch_multirow()); at 4 (64 registers) it spills (nvcc -Xptxas -v).
constexpr int multirow_min_blocks(int tokens, bool prefetch) { return prefetch && tokens == 1 ? 3 : 2; }

/// Version 3. Same data layout as version 2 (16-byte code chunks, x swizzled in shared
/// memory, the scale factored out of each chunk's partial sum), with the instructions per
/// weight cut from about six to about three and a half, since at one token version 2 was
/// bound by instruction issue rather than by bytes:
///  - each warp owns kRows rows for the whole kernel (no persistent loop), and every x
///    value, read and converted to float once, serves all kRows rows;
///  - table offsets come from nibble_offsets() (see there);
///  - the scales' loads are split from their arithmetic (load_scale / decode_scale), and
///    the first step's loads are issued before x is staged, so the block's first memory
///    round trip overlaps the staging.
///
/// Version 4 (kPrefetch) is version 3 with a second register buffer: the next step's loads
/// are issued before this step's arithmetic, so each warp has loads in flight while it
/// computes. Version 3 waits a full memory round trip at the start of every step, and at
/// 8192 rows there are too few warps per multiprocessor (about 16) to hide it.
template <int kTokens, int kRows, int kLoads, bool kPrefetch, class OutT>
__global__ void __launch_bounds__(kGemvThreads, multirow_min_blocks(kTokens, kPrefetch))
    gemv4_multirow_kernel(Quant4View q, const uint4* __restrict__ x, OutT* __restrict__ y, int out, int in) {
  extern __shared__ uint4 s_x[];
  __shared__ float s_table[16];
  __shared__ float s_map[256];
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int row_chunks = in / 32;  // 16-byte chunks of codes per row
  const int x_row_chunks = in / 8;  // 16-byte chunks of x per token
  const int row0 = (blockIdx.x * kGemvWarps + warp) * kRows;
  const auto* codes = reinterpret_cast<const uint4*>(q.packed);
  constexpr int kStep = 32 * kLoads;  // chunks of a row one step covers (whole warp)
  using Codes = uint4[kLoads][kRows];
  using Scales = RawScale[kLoads][kRows];

  // One step: kLoads chunks of each of kRows rows per lane. Past the last row or the row's
  // end, a valid chunk is re-read (rows clamped to out - 1, chunks to row_chunks - 1) and
  // weighted 0 below, so the loads need no branch. Every lane runs the same steps.
  auto load_step = [&](int base, Codes& w, Scales& scale) {
#pragma unroll
    for (int l = 0; l < kLoads; ++l)
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const int c = min(base + lane + 32 * l, row_chunks - 1);
        const std::int64_t chunk = static_cast<std::int64_t>(min(row0 + r, out - 1)) * row_chunks + c;
        w[l][r] = __ldg(codes + chunk);
        scale[l][r] = load_scale(q, (chunk * 32) >> q.log2_blocksize);
      }
  };
  Codes w0, w1;  // w1: version 4's second buffer (unused, and removed, in version 3)
  Scales scale0, scale1;
  load_step(0, w0, scale0);
  for (int g = threadIdx.x; g < kTokens * x_row_chunks; g += kGemvThreads) s_x[swizzle(g)] = x[g];
  if (threadIdx.x < 16) s_table[threadIdx.x] = q.table[threadIdx.x];
  if (q.double_quant) s_map[threadIdx.x] = q.nested_map[threadIdx.x];  // kGemvThreads == 256
  __syncthreads();

  float acc[kRows][kTokens] = {};
  auto compute_step = [&](int base, const Codes& w, const Scales& scale) {
#pragma unroll
    for (int l = 0; l < kLoads; ++l) {
      const int c = min(base + lane + 32 * l, row_chunks - 1);
      float part[kRows][kTokens] = {};
#pragma unroll
      for (int j = 0; j < 4; ++j) {  // code word j of the chunk: values 8j .. 8j+7
        float xf[kTokens][8];        // those 8 values of x, for every token, as float
#pragma unroll
        for (int t = 0; t < kTokens; ++t) {
          const uint4 xv = s_x[swizzle(t * x_row_chunks + 4 * c + j)];
#pragma unroll
          for (int m = 0; m < 4; ++m) {  // bf16 pair m: value 2m in the low half, 2m+1 in the high half
            const std::uint32_t xw = word_of(xv, m);
            xf[t][2 * m] = __uint_as_float(xw << 16);
            xf[t][2 * m + 1] = __uint_as_float(xw & 0xffff0000u);
          }
        }
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          const NibbleOffsets off = nibble_offsets(word_of(w[l][r], j));
#pragma unroll
          for (int m = 0; m < 4; ++m) {  // byte m: high nibble = value 2m, low nibble = value 2m+1
            const float w_first = table_at(s_table, byte_of(off.hi, m));
            const float w_second = table_at(s_table, byte_of(off.lo, m));
#pragma unroll
            for (int t = 0; t < kTokens; ++t) {
              part[r][t] = fmaf(w_first, xf[t][2 * m], part[r][t]);
              part[r][t] = fmaf(w_second, xf[t][2 * m + 1], part[r][t]);
            }
          }
        }
      }
      const bool in_row = base + lane + 32 * l < row_chunks;
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const float a = in_row ? decode_scale(q, s_map, scale[l][r]) : 0.0f;
#pragma unroll
        for (int t = 0; t < kTokens; ++t) acc[r][t] = fmaf(part[r][t], a, acc[r][t]);
      }
    }
  };

  if constexpr (kPrefetch) {
    // Two buffers used in turn (two steps per iteration, so no register copies): while
    // one step computes, the next one's loads are on their way.
    for (int base = 0; base < row_chunks; base += 2 * kStep) {
      if (base + kStep < row_chunks) load_step(base + kStep, w1, scale1);
      compute_step(base, w0, scale0);
      if (base + kStep >= row_chunks) break;
      if (base + 2 * kStep < row_chunks) load_step(base + 2 * kStep, w0, scale0);
      compute_step(base + kStep, w1, scale1);
    }
  } else {
    for (int base = 0; base < row_chunks; base += kStep) {
      if (base > 0) load_step(base, w0, scale0);
      compute_step(base, w0, scale0);
    }
  }
  store_rows<kRows, kTokens>(acc, y, row0, out, lane);
}
//! [gemv-multirow]

// ---------------------------------------------------------------------------------------------
// Host side.

/// Shared-memory bytes for x: whole 128-byte rows, so the swizzle stays in bounds.
static std::size_t fused_smem_bytes(std::int64_t in, int tokens) {
  const std::int64_t chunks = tokens * in / 8;
  return static_cast<std::size_t>((chunks + 7) / 8 * 8 * 16);
}

static int device_int(cudaDeviceAttr attr) {
  int device = 0, value = 0;
  CUDA_CHECK(cudaGetDevice(&device));
  CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, device));
  return value;
}

// Static shared memory of the fused kernel: the two tables (16 + 256 floats).
constexpr std::size_t kFusedStaticSmem = (16 + 256) * sizeof(float);

bool gemv4_fused_supported(const DeviceQuant4& W, int tokens) {
  const std::int64_t in = W.cols("gemv4");
  if (tokens < 1 || tokens > kMaxGemvTokens || in % 32 != 0 || in == 0) return false;
  const auto limit = static_cast<std::size_t>(device_int(cudaDevAttrMaxSharedMemoryPerBlockOptin));
  return fused_smem_bytes(in, tokens) + kFusedStaticSmem <= limit;
}

template <int kTokens, class OutT>
static void launch_fused(const Quant4View& v, const bf16* x, OutT* y, int out, int in, cudaStream_t stream) {
  // Two rows per warp share each x load once there is more than one token to amortize;
  // with few tokens the registers allow two chunks per row in flight.
  constexpr int kRows = kTokens == 1 ? 1 : 2;
  constexpr int kLoads = kTokens <= 4 ? 2 : 1;
  auto kernel = gemv4_fused_kernel<kTokens, kRows, kLoads, OutT>;
  const std::size_t smem = fused_smem_bytes(in, kTokens);
  CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  int per_sm = 0;
  CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kGemvThreads, smem));
  if (per_sm == 0) throw std::runtime_error("gemv4 (fused): the kernel does not fit on a multiprocessor");
  // A persistent grid: x is staged once per block, so launch no more blocks than fit at once.
  const int needed = (out + kGemvWarps * kRows - 1) / (kGemvWarps * kRows);
  const int grid = std::min(needed, per_sm * device_int(cudaDevAttrMultiProcessorCount));
  kernel<<<grid, kGemvThreads, smem, stream>>>(v, reinterpret_cast<const uint4*>(x), y, out, in);
  CUDA_CHECK_LAUNCH();
}

template <int kTokens, bool kPrefetch, class OutT>
static void launch_multirow(const Quant4View& v, const bf16* x, OutT* y, int out, int in, cudaStream_t stream) {
  // Four rows per warp share every x value; past four tokens the float copies of x
  // (8 per token) would crowd the registers, so two. Two chunks per row in flight
  // while a step's registers allow it. Version 4 holds two steps' chunks, so it takes
  // two chunks per step only at 1 token and four rows only at 2 tokens (at 3 and 4
  // it would spill: nvcc -Xptxas -v).
  // Version 4 at one token takes two rows, not four: with four, ncu on the H100 (8192 ×
  // 8192, docs/benchmarks.md third run) showed 128 registers, so 2 blocks (16 warps) per
  // multiprocessor, 256 blocks in 0.97 waves, 23% achieved occupancy, 39% of cycles with
  // no eligible warp and DRAM at ~42%: too few warps to hide the loads. Two rows fit in
  // 80 registers without spilling, so 3 blocks (24 warps) per multiprocessor and twice
  // the blocks. Version 3 keeps four rows (its measured configuration).
  constexpr int kRows = kPrefetch && kTokens == 1 ? 2 : kTokens <= (kPrefetch ? 2 : 4) ? 4 : 2;
  constexpr int kLoads = kTokens <= (kPrefetch ? 1 : 2) ? 2 : 1;
  auto kernel = gemv4_multirow_kernel<kTokens, kRows, kLoads, kPrefetch, OutT>;
  const std::size_t smem = fused_smem_bytes(in, kTokens);
  CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  // One row group per warp: enough blocks to cover every row, each staging x itself
  // (from the L2 cache: x is small and every block reads the same one).
  const int rows_per_block = kGemvWarps * kRows;
  const auto grid = static_cast<unsigned>((out + rows_per_block - 1) / rows_per_block);
  kernel<<<grid, kGemvThreads, smem, stream>>>(v, reinterpret_cast<const uint4*>(x), y, out, in);
  CUDA_CHECK_LAUNCH();
}

/// The kernels are templates on the token count: calls f(std::integral_constant<int, tokens>).
template <class F>
static void with_token_count(int tokens, F&& f) {
  switch (tokens) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    default: f(std::integral_constant<int, 8>{}); break;
  }
}

/// gemv4() for either output type: OutT is __nv_bfloat16 or float.
template <class OutT>
static void gemv4_to(const DeviceQuant4& W, const bf16* x, OutT* y, int tokens, GemvVersion version,
                     cudaStream_t stream) {
  const std::int64_t out64 = W.rows("gemv4"), in64 = W.cols("gemv4");
  if (tokens < 1 || tokens > kMaxGemvTokens) {
    throw std::invalid_argument("gemv4: tokens = " + std::to_string(tokens) + " (expected 1.." +
                                std::to_string(kMaxGemvTokens) + "; use linear4_forward for more)");
  }
  if (out64 > (1 << 30) || in64 > (1 << 30)) throw std::invalid_argument("gemv4: weight dimensions too large");
  if (x == nullptr || y == nullptr) throw std::invalid_argument("gemv4: null input or output pointer");
  if (out64 == 0) return;
  const int out = static_cast<int>(out64), in = static_cast<int>(in64);
  const Quant4View v = W.view();
  const bool fast_ok = gemv4_fused_supported(W, tokens) && reinterpret_cast<std::uintptr_t>(x) % 16 == 0;
  // Measured on an H100 (docs/benchmarks.md, 2026-11-23, fourth run): version 4 is the
  // fastest at 1 token on every benchmarked shape, version 3 up to 4 tokens, version 2 at 8.
  if (version == GemvVersion::automatic) {
    version = !fast_ok       ? GemvVersion::naive
              : tokens == 1 ? GemvVersion::prefetch
              : tokens <= 4 ? GemvVersion::multirow
                            : GemvVersion::fused;
  }
  if (version == GemvVersion::naive) {
    gemv4_naive_kernel<<<(out + kGemvWarps - 1) / kGemvWarps, kGemvThreads, 0, stream>>>(
        v, reinterpret_cast<const __nv_bfloat16*>(x), y, out, in, tokens);
    CUDA_CHECK_LAUNCH();
    return;
  }
  if (!fast_ok) {
    throw std::invalid_argument("gemv4 (v" + std::to_string(static_cast<int>(version)) +
                                "): needs in % 32 == 0, a 16-byte aligned x and " + std::to_string(tokens) + " x " +
                                std::to_string(in) + " bf16 values of x in shared memory; got in = " +
                                std::to_string(in));
  }
  if (version == GemvVersion::fused) {
    with_token_count(tokens, [&](auto t) { launch_fused<decltype(t)::value>(v, x, y, out, in, stream); });
  } else if (version == GemvVersion::multirow) {
    with_token_count(tokens, [&](auto t) { launch_multirow<decltype(t)::value, false>(v, x, y, out, in, stream); });
  } else {
    with_token_count(tokens, [&](auto t) { launch_multirow<decltype(t)::value, true>(v, x, y, out, in, stream); });
  }
}

void gemv4(const DeviceQuant4& W, const bf16* x, bf16* y, int tokens, GemvVersion version, cudaStream_t stream) {
  gemv4_to(W, x, reinterpret_cast<__nv_bfloat16*>(y), tokens, version, stream);
}

void gemv4(const DeviceQuant4& W, const bf16* x, float* y, int tokens, GemvVersion version, cudaStream_t stream) {
  gemv4_to(W, x, y, tokens, version, stream);
}

}  // namespace qlora::cuda
