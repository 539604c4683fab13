// The fused 4-bit matmul on tensor cores (chapter 5). See gemm4_mma.cuh.
// CPU reference: matmul_xwt_ref() on dequantize_4bit_bf16() weights.
#include "gemm4_mma.cuh"

#include "dequant4.cuh"
#include "fp4.hpp"
#include "nf4.hpp"

#include <cuda_bf16.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>

namespace qlora::cuda {

constexpr int kMmaWarps = 8;  // warps of a block; they split the K dimension between them
constexpr int kMmaThreads = 32 * kMmaWarps;
constexpr int kTileRows = 16;  // output features of a block: the M of one mma
constexpr int kTileK = 128;    // k values one warp consumes per pipeline stage: 32 per lane
constexpr int kStages = 4;     // code tiles per warp in shared memory: 3 in flight while 1 is used

/// Blocks per multiprocessor that the registers are sized for (__launch_bounds__): 4 blocks of
/// 256 threads leave 64 registers a thread, 3 leave 80, 2 leave 128; each token tile of x takes
/// 16 (nvcc -Xptxas -v: no local memory for any of the three). At one token tile, 4 blocks per
/// multiprocessor run the 512 blocks of an 8192-row weight in one wave on 132 multiprocessors.
constexpr int mma_min_blocks(int token_tiles) { return token_tiles == 1 ? 4 : token_tiles == 2 ? 3 : 2; }

//! [mma-stage]
/// One pipeline stage of one warp in shared memory: the codes of one 128-wide k tile of its 16
/// rows, 1 KB. Slot [r][lane] is written and read by that lane only: each lane copies exactly
/// the bytes its own fragments need, so a lane waits for its own copies and no barrier
/// between the warp's lanes is needed.
struct WarpStage {
  uint4 codes[2][32];  ///< [row g, row g + 8][lane]: the lane's 32 codes (16 bytes) of the row
};
//! [mma-stage]

//! [mma-async-copy]
/// cp.async: a 16-byte copy from global to shared memory that does not go through registers
/// and does not block the thread; .cg keeps it out of L1 (the weights are read once).
/// Copies are grouped (commit) and waited for by group: wait<N> returns when at most the N
/// most recent groups of this thread are still in flight.
static __device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  const auto dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem) : "memory");
}
static __device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
/// The 8-byte form (version 2's pieces): only .ca exists at this size, which also keeps the
/// line in L1; nothing rereads it, so that costs nothing but a little L1.
static __device__ __forceinline__ void cp_async8(void* smem, const void* gmem) {
  const auto dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(dst), "l"(gmem) : "memory");
}
template <int kPending>
static __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}
//! [mma-async-copy]

//! [mma-instruction]
/// d += A·B for one 16 × 8 × 16 tile: A (16 × 16, row-major) in four registers of bf16 pairs,
/// B (16 × 8, column-major) in two, d (16 × 8) in four float32 values. PTX ISA, "Matrix
/// fragments for mma.m16n8k16 with floating point type", with g = lane / 4, t = lane % 4:
///   a[0]: A[g][2t, 2t+1]   a[1]: A[g+8][2t, 2t+1]   a[2]: A[g][2t+8, 2t+9]   a[3]: A[g+8][2t+8, 2t+9]
///   b[0]: B[2t, 2t+1][g]   b[1]: B[2t+8, 2t+9][g]
///   d[0], d[1]: D[g][2t, 2t+1]   d[2], d[3]: D[g+8][2t, 2t+1]
/// and in every pair the lower index sits in the lower 16 bits.
static __device__ __forceinline__ void mma_bf16_16816(float (&d)[4], const std::uint32_t (&a)[4], std::uint32_t b0,
                                                      std::uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
//! [mma-instruction]

/// Where a lane of either version stands: its warp, its place in the mma fragments (g = lane / 4,
/// t = lane % 4), the block's first token and row, and where rows g and g + 8 start in W. Rows past
/// the end read the last row (valid memory); their sums are never stored.
struct BlockLane {
  int warp, lane, g, t, tok0, row0;
  std::int64_t row_start[2];
  __device__ BlockLane(int out, int in, int tokens_per_block)
      : warp(threadIdx.x / 32), lane(threadIdx.x % 32), g(lane / 4), t(lane % 4),
        tok0(blockIdx.x * tokens_per_block), row0(blockIdx.y * kTileRows),
        row_start{static_cast<std::int64_t>(min(row0 + g, out - 1)) * in,
                  static_cast<std::int64_t>(min(row0 + g + 8, out - 1)) * in} {}
};

/// Stores element (n, r) of lane `lane`'s accumulators, if its token and row exist: token
/// tok0 + 8n + 2t + (r & 1), row row0 + g + 8·(r >> 1) (the d layout of mma_bf16_16816).
template <class OutT>
static __device__ __forceinline__ void store_element(OutT* y, float v, int lane, int n, int r, int row0, int tok0,
                                                     int out, int tokens) {
  const int token = tok0 + 8 * n + 2 * (lane % 4) + (r & 1), row = row0 + lane / 4 + 8 * (r >> 1);
  if (token < tokens && row < out) store_y(y, static_cast<std::int64_t>(token) * out + row, v);
}

/// The end of versions 1 and 2: the 8 warps' partial tiles added in shared memory (the
/// pipeline's, free by now) in a fixed order, so the result does not depend on timing, and stored.
template <int kTokenTiles, class Smem, class OutT>
static __device__ __forceinline__ void add_warps_and_store(const float (&acc)[kTokenTiles][4], Smem& smem, OutT* y,
                                                           int row0, int tok0, int out, int tokens) {
  using Sums = float[kMmaWarps][kTokenTiles * 4][32];
  static_assert(sizeof(Sums) <= sizeof(Smem));
  auto& s_sum = *reinterpret_cast<Sums*>(&smem);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int n = 0; n < kTokenTiles; ++n)
#pragma unroll
    for (int r = 0; r < 4; ++r) s_sum[warp][4 * n + r][lane] = acc[n][r];
  __syncthreads();
  for (int e = threadIdx.x; e < kTokenTiles * 4 * 32; e += kMmaThreads) {
    const int l = e % 32, nr = e / 32, n = nr / 4, r = nr % 4;
    float sum = 0.0f;
#pragma unroll
    for (int w = 0; w < kMmaWarps; ++w) sum += s_sum[w][nr][l];
    store_element(y, sum, l, n, r, row0, tok0, out, tokens);
  }
}

static __device__ __forceinline__ std::uint32_t word_of(const uint4& v, int j) {
  return j == 0 ? v.x : j == 1 ? v.y : j == 2 ? v.z : v.w;
}

//! [mma-decode]
/// Table value times block absmax in float32, exactly dequantize_4bit_f32(). The flush of a
/// subnormal product (dequant_value_d) is only needed when |absmax| is so small that some
/// product can be subnormal; kFlush says so.
template <bool kFlush>
static __device__ __forceinline__ float scaled(float table_value, float absmax) {
  return kFlush ? dequant_value_d(table_value, absmax) : __fmul_rn(table_value, absmax);
}

/// The 8 codes of one 32-bit code word (bytes m = 0..3, the first value of each in the high
/// nibble) as 4 bf16 pairs, pair m = byte m with its first value in the low half: rounded to
/// bf16, exactly dequantize_4bit_bf16(). Byte m of `hi` is 4 × the high nibble of byte m, the
/// byte offset of its table entry in shared memory (GEMV version 3's trick), so a code costs
/// one byte extract and one shared load.
template <bool kFlush>
static __device__ __forceinline__ void decode_word(std::uint32_t word, const float* s_table, float absmax,
                                                   std::uint32_t (&pairs)[4]) {
  const std::uint32_t hi = (word >> 2) & 0x3c3c3c3cu, lo = (word << 2) & 0x3c3c3c3cu;
  const char* table = reinterpret_cast<const char*>(s_table);
#pragma unroll
  for (int m = 0; m < 4; ++m) {
    const auto select = static_cast<std::uint32_t>(0x4440 | m);  // byte m, zero-extended
    const float first = *reinterpret_cast<const float*>(table + __byte_perm(hi, 0u, select));
    const float second = *reinterpret_cast<const float*>(table + __byte_perm(lo, 0u, select));
    const __nv_bfloat162 pair = __floats2bfloat162_rn(scaled<kFlush>(first, absmax), scaled<kFlush>(second, absmax));
    pairs[m] = reinterpret_cast<const std::uint32_t&>(pair);
  }
}

/// One 128-wide k tile of one warp: decode the lane's codes and multiply. The lane's 16 code
/// bytes of row g (codes[0]) and of row g + 8 (codes[1]) hold its k values 32t .. 32t + 31 in
/// order, and xv[j][p] its x values 8p .. 8p + 7 of token 8j + g. Step s of the 8 mma steps takes
/// k 4s .. 4s + 3: code bytes 2s (A registers 0 and 1: rows g and g + 8) and 2s + 1 (registers 2
/// and 3), and x piece s / 2, words 2·(s % 2) and 2·(s % 2) + 1 (B registers 0 and 1). Code word
/// j covers steps 2j and 2j + 1; it is decoded just before its mma, so only two steps' A
/// fragments are live at a time.
template <bool kFlush, int kTokenTiles>
static __device__ __forceinline__ void mma_tile(const uint4 (&codes)[2], const float (&absmax)[2],
                                                const float* s_table, const uint4 (&xv)[kTokenTiles][4],
                                                float (&acc)[kTokenTiles][4]) {
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    std::uint32_t even[4], odd[4];  // A fragments of steps 2j and 2j + 1
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      std::uint32_t pairs[4];
      decode_word<kFlush>(word_of(codes[r], j), s_table, absmax[r], pairs);
      even[r] = pairs[0];
      even[2 + r] = pairs[1];
      odd[r] = pairs[2];
      odd[2 + r] = pairs[3];
    }
#pragma unroll
    for (int n = 0; n < kTokenTiles; ++n) {
      mma_bf16_16816(acc[n], even, xv[n][j].x, xv[n][j].y);
      mma_bf16_16816(acc[n], odd, xv[n][j].z, xv[n][j].w);
    }
  }
}
//! [mma-decode]

//! [mma-kernel]
/// Block (blockIdx.y, blockIdx.x): output features row0 .. row0 + 15 for tokens tok0 ..
/// tok0 + 8·kTokenTiles − 1. Its 8 warps split K: warp w takes the 128-wide k tiles w, w + 8,
/// w + 16, ..., accumulates a 16 × 8 tile per token tile with mma.sync, and the warps' partial
/// sums are added in shared memory at the end, in a fixed order.
///
/// The k permutation: an mma adds A[m][κ]·B[κ][n] over κ = 0..15, so any one-to-one map from κ
/// to real k, the same for A and B, gives the same sum. We map the κ that lane t holds at step s
/// (2t, 2t+1, 2t+8, 2t+9) to real k = 32t + 4s + (0, 1, 2, 3): over the 8 steps of a tile, lane t
/// holds k 32t .. 32t + 31, i.e. 16 consecutive bytes of codes per row, and 64 consecutive bytes
/// of x per token. Every fragment is then one aligned 16-byte load of the bitsandbytes layout: no
/// repacked copy of the weights.
///
/// The codes stream from device memory once, through the cp.async pipeline. x is small and every
/// block reads the same x, so it stays in the L2 cache: each lane loads its x fragments with
/// plain loads at the start of a tile, and the decode of the tile's codes hides their latency.
/// (Staging x in shared memory too would take 2 KB per token tile next to each 1 KB of codes,
/// and the pipeline would then fit fewer stages and fewer warps.)
template <int kTokenTiles, class OutT>
__global__ void __launch_bounds__(kMmaThreads, mma_min_blocks(kTokenTiles))
    gemm4_mma_kernel(Quant4View q, const __nv_bfloat16* __restrict__ x, OutT* __restrict__ y, int out, int in,
                     int tokens, float tiny_absmax) {
  __shared__ WarpStage stages[kStages][kMmaWarps];
  __shared__ float s_table[16];
  __shared__ float s_map[256];
  if (threadIdx.x < 16) s_table[threadIdx.x] = q.table[threadIdx.x];
  if (q.double_quant) s_map[threadIdx.x] = q.nested_map[threadIdx.x];  // kMmaThreads == 256

  const BlockLane at(out, in, 8 * kTokenTiles);
  const int warp = at.warp, lane = at.lane, g = at.g, t = at.t, tok0 = at.tok0, row0 = at.row0;
  const std::int64_t(&row_start)[2] = at.row_start;
  const int num_tiles = (in + kTileK - 1) / kTileK;
  const int my_tiles = warp < num_tiles ? (num_tiles - 1 - warp) / kMmaWarps + 1 : 0;
  auto first_k = [&](int i) { return (warp + kMmaWarps * i) * kTileK + 32 * t; };  // lane's k in its tile i

  // Tile i's code copies. A lane whose 32 k values lie past the end of a row (in % 128 != 0)
  // copies nothing and uses zeros.
  auto issue = [&](int i) {
    const int k = first_k(i);
    if (k >= in) return;
#pragma unroll
    for (int r = 0; r < 2; ++r) cp_async16(&stages[i % kStages][warp].codes[r][lane], q.packed + (row_start[r] + k) / 2);
  };
  // The block scales of tile i (rows g and g + 8): 32 values never straddle a block.
  auto load_scales = [&](int i, RawScale (&s)[2]) {
    const int k = min(first_k(i), in - 32);
#pragma unroll
    for (int r = 0; r < 2; ++r) s[r] = load_scale(q, (row_start[r] + k) >> q.log2_blocksize);
  };

  // Prologue: kStages − 1 tiles in flight. Every iteration commits one group, empty or not,
  // so that "group i" is always tile i.
#pragma unroll
  for (int i = 0; i < kStages - 1; ++i) {
    if (i < my_tiles) issue(i);
    cp_async_commit();
  }
  RawScale scale[2];
  if (my_tiles > 0) load_scales(0, scale);
  __syncthreads();  // the tables are in shared memory

  float acc[kTokenTiles][4] = {};
  const uint4 zero = make_uint4(0, 0, 0, 0);
  for (int i = 0; i < my_tiles; ++i) {
    const int k = first_k(i);
    const bool in_row = k < in;
    // The lane's 32 values of x for each token tile (zeros for a missing token or past the
    // row's end), first: the loads are in flight while the codes arrive and are decoded.
    uint4 xv[kTokenTiles][4];
#pragma unroll
    for (int n = 0; n < kTokenTiles; ++n) {
      const int token = tok0 + 8 * n + g;
      const bool has_x = in_row && token < tokens;
      const auto* src = reinterpret_cast<const uint4*>(x + static_cast<std::int64_t>(min(token, tokens - 1)) * in +
                                                       min(k, in - 32));
#pragma unroll
      for (int p = 0; p < 4; ++p) xv[n][p] = has_x ? __ldg(src + p) : zero;
    }
    // Refill the stage that tile i − 1 used: this lane read it in the previous iteration.
    if (i + kStages - 1 < my_tiles) issue(i + kStages - 1);
    cp_async_commit();
    RawScale next[2] = {scale[0], scale[1]};  // the next tile's scales: their loads overlap this tile
    if (i + 1 < my_tiles) load_scales(i + 1, next);
    cp_async_wait<kStages - 1>();  // tile i's copies have landed

    const WarpStage& st = stages[i % kStages][warp];
    const uint4 codes[2] = {in_row ? st.codes[0][lane] : zero, in_row ? st.codes[1][lane] : zero};
    const float absmax[2] = {decode_scale(q, s_map, scale[0]), decode_scale(q, s_map, scale[1])};
    // mma.sync.aligned must be executed by the whole warp at once, and each branch has its
    // own copy of it, so the choice is made for the warp: the flush path when any lane needs it.
    if (__all_sync(0xffffffffu, fabsf(absmax[0]) >= tiny_absmax && fabsf(absmax[1]) >= tiny_absmax)) {
      mma_tile<false>(codes, absmax, s_table, xv, acc);
    } else {
      mma_tile<true>(codes, absmax, s_table, xv, acc);
    }
    scale[0] = next[0];
    scale[1] = next[1];
  }
  cp_async_wait<0>();
  __syncthreads();  // every warp is done with the stages
  add_warps_and_store<kTokenTiles>(acc, stages, y, row0, tok0, out, tokens);
}
//! [mma-kernel]

// ---------------------------------------------------------------------------------------------
// Version 2: the table in registers, the block scale after the product.
//
// Version 1 spends most of its instructions on the decode: per code a byte extract, a shared
// load, a multiply by the block scale and half a conversion to bf16. Two changes halve that.
//  1. The scale leaves the decode. All 16 κ of one mma step are taken from one quantization
//     block (64-wide k tiles instead of 128), so the product can be scaled after the mma: the
//     tensor cores multiply bf16(table value) by x, and one FMA per output and tile adds
//     absmax × that partial sum. The weight multiplied is then bf16(t)·absmax in float32
//     rather than bf16(t·absmax): as close to the exact t·absmax as a bf16 weight (2^-9
//     relative), but no longer bit-identical to dequantize_4bit_bf16() (the test's bound says
//     how far).
//  2. The table moves into registers. The 16 bf16 values are 32 bytes: their low bytes in four
//     registers and their high bytes in four more. prmt (__byte_perm) picks 4 bytes out of 8 by
//     4 three-bit selectors at once, so two prmt look up 4 codes among entries 0-7 and 8-15 and
//     a third keeps, per byte, the one the code's top bit asks for: 3 instructions for 4 codes'
//     low bytes, 3 for their high bytes, 2 more to interleave them into bf16 pairs. No shared
//     memory, no multiply, no conversion.
// Measured on an H200 (chapter 5): faster than version 1 from 16 tokens on, slower at 1 to 8,
// where the bytes in flight, not the instructions, set the time.

constexpr int kTileK2 = 64;  // k values one warp consumes per stage in version 2: one block's worth
constexpr int kStages2 = 6;  // its stages are half as large, so twice as many fit

//! [mma2-stage]
/// One stage of one warp in version 2: the codes of one 64-wide k tile of its 16 rows, 512
/// bytes; slot [r][lane] holds the lane's 16 codes (8 bytes) of row g + 8r, copied by that lane.
struct WarpStage2 {
  uint2 codes[2][32];
};
//! [mma2-stage]

//! [mma2-table]
/// The 16 bf16 table values as bytes: byte c % 4 of lo[c / 4] is the low byte of entry c,
/// and likewise hi for the high bytes.
struct ByteTables {
  std::uint32_t lo[4], hi[4];
};

/// Four lookups at once: byte i of the result is byte (code i) of the 16-byte table t, for the
/// 4 codes in the 4 nibbles of `codes` (nibble i is code i). prmt sees the 8 bytes of two
/// registers and three selector bits, so entries 0-7 and 8-15 are looked up separately and the
/// last prmt takes byte i of the second when code i has its top bit set (selector i + 4).
static __device__ __forceinline__ std::uint32_t lookup4(const std::uint32_t (&t)[4], std::uint32_t codes,
                                                        std::uint32_t pick) {
  const std::uint32_t low8 = __byte_perm(t[0], t[1], codes & 0x7777u);
  const std::uint32_t high8 = __byte_perm(t[2], t[3], codes & 0x7777u);
  return __byte_perm(low8, high8, pick);
}

/// The 8 codes of one code word as 4 bf16 pairs, pair m = byte m of the word (its high nibble,
/// the first value, in the low half of the pair). In a 16-bit half of the word the nibbles run
/// second value of byte 0, first of byte 0, second of byte 1, first of byte 1, so the looked-up
/// bytes of half h are L = [l(e1), l(e0), l(e3), l(e2)] (and H likewise), and the pairs are
/// [l(e0), h(e0), l(e1), h(e1)] = bytes 1, 5, 0, 4 of (L, H), and bytes 3, 7, 2, 6.
static __device__ __forceinline__ void decode_word_bf16(std::uint32_t word, const ByteTables& tables,
                                                        std::uint32_t (&pairs)[4]) {
  const std::uint32_t picks = 0x32103210u | ((word & 0x88888888u) >> 1);  // per nibble: i or i + 4
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const std::uint32_t codes = word >> (16 * h), pick = picks >> (16 * h);
    const std::uint32_t L = lookup4(tables.lo, codes, pick), H = lookup4(tables.hi, codes, pick);
    pairs[2 * h] = __byte_perm(L, H, 0x4051);
    pairs[2 * h + 1] = __byte_perm(L, H, 0x6273);
  }
}
//! [mma2-table]

/// acc += part · absmax of the part's row (rows g and g + 8: d registers 0-1 and 2-3), the block
/// scale applied once per tile and output (versions 2 and 3).
template <int kTokenTiles>
static __device__ __forceinline__ void add_scaled(const float (&part)[kTokenTiles][4], const float (&absmax)[2],
                                                  float (&acc)[kTokenTiles][4]) {
#pragma unroll
  for (int n = 0; n < kTokenTiles; ++n) {
    acc[n][0] = fmaf(part[n][0], absmax[0], acc[n][0]);
    acc[n][1] = fmaf(part[n][1], absmax[0], acc[n][1]);
    acc[n][2] = fmaf(part[n][2], absmax[1], acc[n][2]);
    acc[n][3] = fmaf(part[n][3], absmax[1], acc[n][3]);
  }
}

//! [mma2-tile]
/// One 64-wide k tile of one warp in version 2. The k permutation now keeps each step inside the
/// tile: lane t's κ at step s (2t, 2t+1, 2t+8, 2t+9) are k = 16t + 4s + (0, 1, 2, 3), so lane t
/// holds k 16t .. 16t + 15 over the 4 steps: 8 code bytes per row (word 0: steps 0 and 1, word
/// 1: steps 2 and 3) and 32 bytes of x per token (xv[n][0]: steps 0 and 1, xv[n][1]: 2 and 3).
/// The tile's products are summed unscaled and then added to acc times each row's absmax.
template <int kTokenTiles>
static __device__ __forceinline__ void mma2_tile(const uint2 (&codes)[2], const float (&absmax)[2],
                                                 const ByteTables& tables, const uint4 (&xv)[kTokenTiles][2],
                                                 float (&acc)[kTokenTiles][4]) {
  float part[kTokenTiles][4] = {};
#pragma unroll
  for (int w = 0; w < 2; ++w) {
    std::uint32_t rows[2][4];  // [row g, row g + 8][byte m of word w] as bf16 pairs
#pragma unroll
    for (int r = 0; r < 2; ++r) decode_word_bf16(w == 0 ? codes[r].x : codes[r].y, tables, rows[r]);
#pragma unroll
    for (int half = 0; half < 2; ++half) {  // step 2w + half: code bytes 2·half and 2·half + 1
      const std::uint32_t a[4] = {rows[0][2 * half], rows[1][2 * half], rows[0][2 * half + 1],
                                  rows[1][2 * half + 1]};
#pragma unroll
      for (int n = 0; n < kTokenTiles; ++n) {
        const uint4& v = xv[n][w];
        mma_bf16_16816(part[n], a, half == 0 ? v.x : v.z, half == 0 ? v.y : v.w);
      }
    }
  }
  add_scaled<kTokenTiles>(part, absmax, acc);
}
//! [mma2-tile]

//! [mma2-kernel]
/// Version 2's block: version 1's shape (16 rows, 8 warps splitting K, token tiles of 8) with
/// 64-wide tiles, 6 stages, and x for the next tile loaded while this one is decoded (the x of
/// version 1's tile was waited for at its start).
template <int kTokenTiles, class OutT>
__global__ void __launch_bounds__(kMmaThreads, mma_min_blocks(kTokenTiles))
    gemm4_mma2_kernel(Quant4View q, const __nv_bfloat16* __restrict__ x, OutT* __restrict__ y, int out, int in,
                      int tokens) {
  __shared__ WarpStage2 stages[kStages2][kMmaWarps];
  __shared__ float s_map[256];
  if (q.double_quant) s_map[threadIdx.x] = q.nested_map[threadIdx.x];  // kMmaThreads == 256
  ByteTables tables;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    std::uint32_t lo = 0, hi = 0;
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      const auto v = __bfloat16_as_ushort(__float2bfloat16_rn(q.table[4 * i + b]));
      lo |= static_cast<std::uint32_t>(v & 0xffu) << (8 * b);
      hi |= static_cast<std::uint32_t>(v >> 8) << (8 * b);
    }
    tables.lo[i] = lo;
    tables.hi[i] = hi;
  }

  const BlockLane at(out, in, 8 * kTokenTiles);
  const int warp = at.warp, lane = at.lane, g = at.g, t = at.t, tok0 = at.tok0, row0 = at.row0;
  const std::int64_t(&row_start)[2] = at.row_start;
  const int num_tiles = in / kTileK2;  // gemm4_mma_unsupported(W, 2) asks in % 64 == 0
  const int my_tiles = warp < num_tiles ? (num_tiles - 1 - warp) / kMmaWarps + 1 : 0;
  auto tile_k = [&](int i) { return (warp + kMmaWarps * i) * kTileK2; };

  auto issue = [&](int i) {
#pragma unroll
    for (int r = 0; r < 2; ++r)
      cp_async8(&stages[i % kStages2][warp].codes[r][lane], q.packed + (row_start[r] + tile_k(i) + 16 * t) / 2);
  };
  auto load_scales = [&](int i, RawScale (&s)[2]) {
#pragma unroll
    for (int r = 0; r < 2; ++r) s[r] = load_scale(q, (row_start[r] + tile_k(i)) >> q.log2_blocksize);
  };
  // The lane's 16 values of x (two 16-byte loads) for each token tile; zeros for a missing token.
  auto load_x = [&](int i, uint4 (&xv)[kTokenTiles][2]) {
#pragma unroll
    for (int n = 0; n < kTokenTiles; ++n) {
      const int token = tok0 + 8 * n + g;
      const auto* src = reinterpret_cast<const uint4*>(x + static_cast<std::int64_t>(min(token, tokens - 1)) * in +
                                                       tile_k(i) + 16 * t);
#pragma unroll
      for (int p = 0; p < 2; ++p) xv[n][p] = token < tokens ? __ldg(src + p) : make_uint4(0, 0, 0, 0);
    }
  };

#pragma unroll
  for (int i = 0; i < kStages2 - 1; ++i) {
    if (i < my_tiles) issue(i);
    cp_async_commit();
  }
  RawScale scale[2];
  uint4 xv[kTokenTiles][2];
  if (my_tiles > 0) {
    load_scales(0, scale);
    load_x(0, xv);
  }
  __syncthreads();  // s_map is in shared memory

  float acc[kTokenTiles][4] = {};
  for (int i = 0; i < my_tiles; ++i) {
    if (i + kStages2 - 1 < my_tiles) issue(i + kStages2 - 1);
    cp_async_commit();
    RawScale next[2] = {scale[0], scale[1]};
    uint4 xnext[kTokenTiles][2];
    if (i + 1 < my_tiles) {
      load_scales(i + 1, next);
      load_x(i + 1, xnext);
    }
    cp_async_wait<kStages2 - 1>();  // tile i's copies have landed

    const WarpStage2& st = stages[i % kStages2][warp];
    const uint2 codes[2] = {st.codes[0][lane], st.codes[1][lane]};
    const float absmax[2] = {decode_scale(q, s_map, scale[0]), decode_scale(q, s_map, scale[1])};
    mma2_tile<kTokenTiles>(codes, absmax, tables, xv, acc);
    scale[0] = next[0];
    scale[1] = next[1];
#pragma unroll
    for (int n = 0; n < kTokenTiles; ++n) {
      xv[n][0] = xnext[n][0];
      xv[n][1] = xnext[n][1];
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // every warp is done with the stages
  add_warps_and_store<kTokenTiles>(acc, stages, y, row0, tok0, out, tokens);
}
//! [mma2-kernel]

// ---------------------------------------------------------------------------------------------
// Version 3: a table of byte pairs, and every warp of the GPU on every shape.
//
// Nsight Compute on version 1 at one token (chapter 5): 6.5 instructions issued per weight,
// the schedulers busy 62 % of the cycles, and one wave of blocks that leaves multiprocessors
// idle at its end. At one token the card streams 16 bytes of codes per multiprocessor and
// cycle, so a warp scheduler may spend about 4 instructions on each weight, everything
// included. Version 3 changes three things.
//  1. A code byte holds two consecutive weights of a row, which is exactly one bf16 pair of an
//     A register. A table of the 256 byte values' pairs (bf16(t[high]), bf16(t[low])) in
//     shared memory turns a byte into its register with one load. Every lane has its own
//     column of the table (lane l's entry sits in bank l), so the 32 lanes never collide
//     whatever bytes they look up; the entry's address, byte · 256 + 4 · lane, is one prmt of
//     the code word and 4 · lane. Two instructions per two weights. The scale goes after the
//     product, as in version 2.
//  2. Every warp of the GPU takes an equal run of the (16-row tile, 64-wide k tile) units, in
//     row-major order. A row tile that several warps share is added up by the last of them to
//     finish (a counter per row tile), from the partial sums the others left in a workspace,
//     in a fixed order: no wave of blocks ends early, and the result does not depend on timing.
//  3. The codes are loaded into registers kMma3Depth units ahead, 8 bytes per row and lane
//     from the bitsandbytes layout as it is, with an L2 prefetch hint of 128 bytes: a warp walks
//     along its rows, and the next three units' bytes of each row come with the first.

constexpr int kMma3Warps = 8;
constexpr int kMma3Threads = 32 * kMma3Warps;
constexpr int kMma3Depth = 4;                  // units whose codes are in flight per warp
constexpr int kMma3Smem = 256 * 256;          // a block's dynamic shared memory: the pair table

/// How version 3 shares the work: U = row_tiles · k_tiles units (16 rows × 64 k values each)
/// among `warps` warps, warp w taking units [w·U / P, (w + 1)·U / P) (P = warps ≤ U, so none is
/// empty); max_pieces bounds how many warps share one row tile (the workspace's pieces).
/// Units, rows and code bytes are counted in 32 bits (gemm4_mma_unsupported checks that they fit).
struct Mma3Plan {
  int row_tiles = 0, k_tiles = 0, units = 0, warps = 0, max_pieces = 0;
  __host__ __device__ int first_unit(int w) const {
    return static_cast<int>(static_cast<std::int64_t>(w) * units / warps);
  }
  /// The warp whose run holds unit u: the largest w with w·U / P <= u.
  __host__ __device__ int warp_of(int u) const {
    return static_cast<int>(((static_cast<std::int64_t>(u) + 1) * warps - 1) / units);
  }
};


/// Registers for 3 blocks of 256 threads per multiprocessor at one token tile (80 a thread),
/// 2 at two (128), 1 at four (nvcc -Xptxas -v: no local memory at 4 units in flight). x is
/// loaded when its unit is used, not ahead: every warp of a multiprocessor reads the same few
/// kilobytes of x, which stay in L1.
constexpr int mma3_min_blocks(int token_tiles) { return token_tiles == 1 ? 3 : token_tiles == 2 ? 2 : 1; }

/// The table: version 3's dynamic shared memory, named here so that a lookup is a shared-memory
/// load at a constant offset from its 32-bit address (through a generic pointer it would be a
/// 64-bit add and a generic load).
extern __shared__ __align__(16) std::uint32_t mma3_pairs[];

//! [mma3-table]
/// Row b of the table holds, for each lane l at byte 4l, the bf16 pair of byte value b: the
/// first weight (high nibble) in the low half, as an A register wants it. Bytes 128-255 of a
/// row are unused: the spacing of 256 lets one prmt build the address.
/// The 16 values are staged in shared memory first: read from there, the 32 rows a thread
/// writes do not wait on each other (global loads might alias the table's stores).
static __device__ void fill_pair_table(float* s_values, const float* values) {
  if (threadIdx.x < 16) s_values[threadIdx.x] = values[threadIdx.x];
  __syncthreads();
  for (int e = threadIdx.x; e < 256 * 32; e += blockDim.x) {
    const int b = e / 32, l = e % 32;
    const __nv_bfloat162 pair = __floats2bfloat162_rn(s_values[b >> 4], s_values[b & 15]);
    mma3_pairs[64 * b + l] = reinterpret_cast<const std::uint32_t&>(pair);
  }
}

/// The A register of byte `byte` (0-3) of `word`: prmt puts 4·lane in the address's byte 0, the
/// code byte in byte 1 and zeros above (selector 5 is byte 1 of lane4, which is zero).
static __device__ __forceinline__ std::uint32_t pair_of(std::uint32_t word, std::uint32_t lane4, int byte) {
  const std::uint32_t address = __byte_perm(word, lane4, 0x5504u | static_cast<std::uint32_t>(byte << 4));
  return *reinterpret_cast<const std::uint32_t*>(reinterpret_cast<const char*>(mma3_pairs) + address);
}
//! [mma3-table]

/// 8 bytes of codes, not kept in L1 (read once), with a hint that L2 fetch the 128 bytes
/// around them.
static __device__ __forceinline__ uint2 load_codes8(const std::uint8_t* p) {
  uint2 v;
  asm("ld.global.nc.L1::no_allocate.L2::128B.v2.u32 {%0, %1}, [%2];\n" : "=r"(v.x), "=r"(v.y) : "l"(p));
  return v;
}

/// One unit's loads in flight: rows g and g + 8, their scales.
struct Unit3 {
  uint2 codes[2];
  RawScale scale[2];
};

//! [mma3-unit]
/// One unit of one warp: version 2's k permutation (lane t holds k 16t .. 16t + 15 of the
/// tile, bytes 2s and 2s + 1 of its 8 at step s), each byte looked up as its A register.
template <int kTokenTiles, bool kDoubleQuant>
static __device__ __forceinline__ void mma3_unit(const Unit3& u, const uint4 (&xv)[kTokenTiles][2], std::uint32_t lane4,
                                                 const Quant4View& q, const float* s_map,
                                                 float (&acc)[kTokenTiles][4]) {
  float part[kTokenTiles][4] = {};
#pragma unroll
  for (int s = 0; s < 4; ++s) {
    const std::uint32_t g_word = s < 2 ? u.codes[0].x : u.codes[0].y, g8_word = s < 2 ? u.codes[1].x : u.codes[1].y;
    const int b = 2 * (s % 2);
    const std::uint32_t a[4] = {pair_of(g_word, lane4, b), pair_of(g8_word, lane4, b), pair_of(g_word, lane4, b + 1),
                                pair_of(g8_word, lane4, b + 1)};
#pragma unroll
    for (int n = 0; n < kTokenTiles; ++n) {
      const uint4& v = xv[n][s / 2];
      mma_bf16_16816(part[n], a, s % 2 == 0 ? v.x : v.z, s % 2 == 0 ? v.y : v.w);
    }
  }
  const float absmax[2] = {decode_scale_as<kDoubleQuant>(q, s_map, u.scale[0]),
                           decode_scale_as<kDoubleQuant>(q, s_map, u.scale[1])};
  add_scaled<kTokenTiles>(part, absmax, acc);
}
//! [mma3-unit]

/// A lane's whole accumulator tile, stored.
template <int kTokenTiles, class OutT>
static __device__ __forceinline__ void store_tile(const float (&v)[kTokenTiles][4], OutT* y, int row0, int tok0,
                                                  int out, int tokens, int lane) {
#pragma unroll
  for (int n = 0; n < kTokenTiles; ++n)
#pragma unroll
    for (int r = 0; r < 4; ++r) store_element(y, v[n][r], lane, n, r, row0, tok0, out, tokens);
}

//! [mma3-fixup]
/// The end of a warp's run of units inside row tile `tile`, k tiles [k_begin, k_end). A warp
/// that had the whole row tile stores it. Otherwise it leaves its partial sums in its piece of
/// the workspace, and the warp that finishes the row tile's last piece adds all the pieces in
/// their order and stores them. The fences make each warp's partial sums visible before its
/// count, and the count before the sums are read (the CUDA programming guide's
/// "threadFenceReduction" pattern); the counter is set back to zero for the next launch.
template <int kTokenTiles, class OutT>
static __device__ void finish_row_tile(const float (&acc)[kTokenTiles][4], const Mma3Plan& plan, int tile,
                                       int k_begin, int k_end, int warp_id, OutT* y, int out, int tokens, int tok0,
                                       float* partials, unsigned* counters) {
  const int lane = threadIdx.x % 32, row0 = tile * kTileRows;
  if (k_begin == 0 && k_end == plan.k_tiles) {
    store_tile<kTokenTiles>(acc, y, row0, tok0, out, tokens, lane);
    return;
  }
  const int first_unit = tile * plan.k_tiles;
  const int first = plan.warp_of(first_unit), pieces = plan.warp_of(first_unit + plan.k_tiles - 1) - first + 1;
  const std::int64_t slot_tile = static_cast<std::int64_t>(blockIdx.y) * plan.row_tiles + tile;
  constexpr int kPieceFloats = 4 * kTokenTiles * 32;
  float* piece0 = partials + slot_tile * plan.max_pieces * kPieceFloats;
  float* mine = piece0 + static_cast<std::int64_t>(warp_id - first) * kPieceFloats;
#pragma unroll
  for (int n = 0; n < kTokenTiles; ++n)
#pragma unroll
    for (int r = 0; r < 4; ++r) mine[(4 * n + r) * 32 + lane] = acc[n][r];
  __threadfence();
  __syncwarp();
  unsigned before = 0;
  if (lane == 0) before = atomicAdd(counters + slot_tile, 1u);
  before = __shfl_sync(0xffffffffu, before, 0);
  if (before != static_cast<unsigned>(pieces - 1)) return;
  __threadfence();
  // Unrolled so that the loads of several pieces are in flight at once: a row tile can have a
  // dozen pieces, and one L2 round trip after another would be the kernel's longest path.
  float sum[kTokenTiles][4] = {};
#pragma unroll 8
  for (int p = 0; p < pieces; ++p)
#pragma unroll
    for (int n = 0; n < kTokenTiles; ++n)
#pragma unroll
      for (int r = 0; r < 4; ++r) sum[n][r] += __ldcg(piece0 + p * kPieceFloats + (4 * n + r) * 32 + lane);
  store_tile<kTokenTiles>(sum, y, row0, tok0, out, tokens, lane);
  if (lane == 0) counters[slot_tile] = 0;
}
//! [mma3-fixup]

//! [mma3-kernel]
/// Warp w of the grid takes units [w·U / P, (w + 1)·U / P) of the U = row tiles × k tiles, for
/// the token block blockIdx.y. It keeps kMma3Depth units of codes and scales in flight, and ends
/// each row tile it touches with finish_row_tile().
template <int kTokenTiles, bool kDoubleQuant, class OutT>
__global__ void __launch_bounds__(kMma3Threads, mma3_min_blocks(kTokenTiles))
    gemm4_mma3_kernel(Quant4View q, const __nv_bfloat16* __restrict__ x, OutT* __restrict__ y, int out, int in,
                      int tokens, Mma3Plan plan, float* __restrict__ partials, unsigned* __restrict__ counters) {
  __shared__ float s_map[256], s_values[16];
  fill_pair_table(s_values, q.table);
  if (kDoubleQuant) s_map[threadIdx.x] = q.nested_map[threadIdx.x];  // kMma3Threads == 256
  __syncthreads();

  const int warp_id = blockIdx.x * kMma3Warps + static_cast<int>(threadIdx.x) / 32;
  if (warp_id >= plan.warps) return;  // the grid's last block may have spare warps
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4, tok0 = blockIdx.y * 8 * kTokenTiles;
  const std::uint32_t lane4 = 4u * static_cast<std::uint32_t>(lane);
  const int u_begin = plan.first_unit(warp_id), u_end = plan.first_unit(warp_id + 1);
  const int blocks_per_row = in >> q.log2_blocksize, kt_shift = q.log2_blocksize - 6;

  // Where the next unit to load is: its row tile and k tile, the two rows' code and scale starts.
  int load_tile = u_begin / plan.k_tiles, load_k = u_begin % plan.k_tiles;
  const std::uint8_t* lane_codes = q.packed + 8 * t;
  unsigned codes[2], scales[2];
  auto start_rows = [&] {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const auto row = static_cast<unsigned>(min(load_tile * kTileRows + g + 8 * r, out - 1));
      codes[r] = row * static_cast<unsigned>(in / 2);
      scales[r] = row * static_cast<unsigned>(blocks_per_row);
    }
  };
  start_rows();
  auto load = [&](Unit3& u) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      u.codes[r] = load_codes8(lane_codes + codes[r] + 32u * static_cast<unsigned>(load_k));
      u.scale[r] = load_scale_as<kDoubleQuant>(q, scales[r] + (load_k >> kt_shift));
    }
    if (++load_k == plan.k_tiles) {
      load_k = 0;
      ++load_tile;
      start_rows();
    }
  };
  // The lane's 16 values of x at k tile kt for each token tile; zeros for a missing token.
  const uint4* x_rows[kTokenTiles];
  bool has_x[kTokenTiles];
#pragma unroll
  for (int n = 0; n < kTokenTiles; ++n) {
    const int token = tok0 + 8 * n + g;
    has_x[n] = token < tokens;
    x_rows[n] = reinterpret_cast<const uint4*>(x + static_cast<std::int64_t>(min(token, tokens - 1)) * in + 16 * t);
  }
  auto load_x = [&](int kt, uint4 (&xv)[kTokenTiles][2]) {
#pragma unroll
    for (int n = 0; n < kTokenTiles; ++n)
#pragma unroll
      for (int p = 0; p < 2; ++p) xv[n][p] = has_x[n] ? __ldg(x_rows[n] + 8 * kt + p) : make_uint4(0, 0, 0, 0);
  };

  Unit3 ring[kMma3Depth];
#pragma unroll
  for (int j = 0; j < kMma3Depth; ++j)
    if (u_begin + j < u_end) load(ring[j]);
  int tile = u_begin / plan.k_tiles, k = u_begin % plan.k_tiles, k_begin = k;
  float acc[kTokenTiles][4] = {};
  for (int u = u_begin; u < u_end; u += kMma3Depth) {
#pragma unroll
    for (int j = 0; j < kMma3Depth; ++j) {
      if (u + j >= u_end) break;
      uint4 xv[kTokenTiles][2];
      load_x(k, xv);
      mma3_unit<kTokenTiles, kDoubleQuant>(ring[j], xv, lane4, q, s_map, acc);
      if (u + j + kMma3Depth < u_end) load(ring[j]);
      ++k;
      if (k == plan.k_tiles || u + j + 1 == u_end) {
        finish_row_tile<kTokenTiles>(acc, plan, tile, k_begin, k, warp_id, y, out, tokens, tok0, partials, counters);
#pragma unroll
        for (int n = 0; n < kTokenTiles; ++n)
#pragma unroll
          for (int r = 0; r < 4; ++r) acc[n][r] = 0.0f;
        if (k == plan.k_tiles) {
          k = k_begin = 0;
          ++tile;
        }
      }
    }
  }
}
//! [mma3-kernel]

// ---------------------------------------------------------------------------------------------
// Host side.

constexpr int kMaxRowTiles = 65535;  // gridDim.y

std::string gemm4_mma_unsupported(const DeviceQuant4& W, MmaVersion version) {
  if (W.shape.size() != 2) {
    return "the 4-bit weight must be 2-D (out x in), got " + std::to_string(W.shape.size()) + " dimensions";
  }
  const std::int64_t out = W.shape[0], in = W.shape[1];
  const int align = version == MmaVersion::exact ? 32 : kTileK2;
  if (in % align != 0) {
    return "W has in = " + std::to_string(in) + " columns, not a multiple of " + std::to_string(align) +
           (version == MmaVersion::exact ? "" : " (the k tiles of versions 2 and 3)");
  }
  if (in > (1 << 30)) return "W has in = " + std::to_string(in) + " columns, more than 2^30";
  if (out > static_cast<std::int64_t>(kMaxRowTiles) * kTileRows) {
    return "W has out = " + std::to_string(out) + " rows, more than " + std::to_string(kMaxRowTiles * kTileRows);
  }
  if (version != MmaVersion::exact && W.blocksize < kTileK2) {
    return "W has blocksize " + std::to_string(W.blocksize) + "; versions 2 and 3 scale whole 64-wide k tiles, so "
           "they need blocks of at least 64";
  }
  if (version == MmaVersion::pair_table && in % W.blocksize != 0) {
    return "W has in = " + std::to_string(in) + " columns, not a multiple of its blocksize " +
           std::to_string(W.blocksize) + " (version 3 finds a row's scales from the row alone)";
  }
  if (version == MmaVersion::pair_table && out * in / 2 > std::numeric_limits<unsigned>::max()) {
    return "W has " + std::to_string(out * in) + " values; version 3 counts its code bytes in 32 bits";
  }
  return {};
}

/// Below this |absmax| some table value times absmax may be subnormal, so the kernel flushes
/// (dequant_value_d); above it no product can be (|t·a| >= min|t|·|a| >= FLT_MIN for t != 0).
static float tiny_absmax_of(QuantType type) {
  const auto& table = type == QuantType::nf4 ? nf4_table : fp4_table;
  double smallest = INFINITY;
  for (float v : table)
    if (v != 0.0f) smallest = std::fmin(smallest, std::fabs(static_cast<double>(v)));
  return std::nextafter(static_cast<float>(FLT_MIN / smallest), INFINITY);  // rounded up: never too small
}

template <int kTokenTiles, class OutT>
static void launch_mma(const DeviceQuant4& W, const bf16* x, OutT* y, int out, int in, int tokens, MmaVersion version,
                       cudaStream_t stream) {
  const int tokens_per_block = 8 * kTokenTiles;
  // Token tiles vary fastest, so the blocks that share a row tile run together and the second
  // and later ones find its codes in the L2 cache.
  const dim3 grid(static_cast<unsigned>((tokens + tokens_per_block - 1) / tokens_per_block),
                  static_cast<unsigned>((out + kTileRows - 1) / kTileRows));
  const auto* xb = reinterpret_cast<const __nv_bfloat16*>(x);
  if (version == MmaVersion::exact) {
    gemm4_mma_kernel<kTokenTiles><<<grid, kMmaThreads, 0, stream>>>(W.view(), xb, y, out, in, tokens,
                                                                    tiny_absmax_of(W.type));
  } else {
    gemm4_mma2_kernel<kTokenTiles><<<grid, kMmaThreads, 0, stream>>>(W.view(), xb, y, out, in, tokens);
  }
  CUDA_CHECK_LAUNCH();
}

//! [mma3-launch]
/// Version 3's grid: as many warps as fit on the GPU at once (the occupancy calculator, with
/// the table's 64 KB of shared memory), at most one per unit; one grid row per token block.
template <class Kernel>
static int mma3_resident_warps(Kernel kernel) {
  CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kMma3Smem));
  int device = 0, sms = 0, blocks = 0;
  CUDA_CHECK(cudaGetDevice(&device));
  CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, kMma3Threads, kMma3Smem));
  if (blocks < 1) throw std::runtime_error("gemm4_mma version 3: no block fits on a multiprocessor");
  return sms * blocks * kMma3Warps;
}

/// Double quantization is a template argument of the kernel: predicated both ways, its scale loads
/// and arithmetic were a fifth of the inner loop's instructions (cuobjdump -sass).
template <int kTokenTiles, class OutT>
static void launch_mma3(const DeviceQuant4& W, const __nv_bfloat16* x, OutT* y, int out, int in, int tokens,
                        Mma3Workspace& ws, cudaStream_t stream) {
  static const int warps_dq = mma3_resident_warps(gemm4_mma3_kernel<kTokenTiles, true, OutT>);
  static const int warps_plain = mma3_resident_warps(gemm4_mma3_kernel<kTokenTiles, false, OutT>);
  const auto kernel =
      W.double_quant ? gemm4_mma3_kernel<kTokenTiles, true, OutT> : gemm4_mma3_kernel<kTokenTiles, false, OutT>;
  const int resident_warps = W.double_quant ? warps_dq : warps_plain;
  Mma3Plan plan;
  plan.row_tiles = (out + kTileRows - 1) / kTileRows;
  plan.k_tiles = in / kTileK2;
  plan.units = plan.row_tiles * plan.k_tiles;
  if (plan.units == 0) {  // in = 0: an empty sum
    CUDA_CHECK(cudaMemsetAsync(y, 0, sizeof(OutT) * static_cast<std::size_t>(tokens) * out, stream));
    return;
  }
  plan.warps = std::min(resident_warps, plan.units);
  const int per_warp = std::min(plan.units / plan.warps, plan.k_tiles);
  plan.max_pieces = std::min(plan.warps, plan.k_tiles / per_warp + 2);
  const int token_blocks = (tokens + 8 * kTokenTiles - 1) / (8 * kTokenTiles);
  const std::int64_t tiles = static_cast<std::int64_t>(token_blocks) * plan.row_tiles;
  ws.reserve(tiles * plan.max_pieces * 4 * kTokenTiles * 32, tiles);
  const dim3 grid(static_cast<unsigned>((plan.warps + kMma3Warps - 1) / kMma3Warps), static_cast<unsigned>(token_blocks));
  kernel<<<grid, kMma3Threads, kMma3Smem, stream>>>(W.view(), x, y, out, in, tokens, plan, ws.partials(),
                                                    ws.counters());
  CUDA_CHECK_LAUNCH();
}
//! [mma3-launch]

template <class OutT>
static void launch_for_tokens(const DeviceQuant4& W, const bf16* x, OutT* y, int out, int in, int tokens,
                              MmaVersion version, Mma3Workspace* ws, cudaStream_t stream) {
  // One token tile (8 tokens) per block up to 8 tokens, two up to 16, four beyond: the
  // decoded weights serve every token tile of the block.
  if (version == MmaVersion::pair_table) {
    const auto* xb = reinterpret_cast<const __nv_bfloat16*>(x);
    if (tokens <= 8) {
      launch_mma3<1>(W, xb, y, out, in, tokens, *ws, stream);
    } else if (tokens <= 16) {
      launch_mma3<2>(W, xb, y, out, in, tokens, *ws, stream);
    } else {
      launch_mma3<4>(W, xb, y, out, in, tokens, *ws, stream);
    }
  } else if (tokens <= 8) {
    launch_mma<1>(W, x, y, out, in, tokens, version, stream);
  } else if (tokens <= 16) {
    launch_mma<2>(W, x, y, out, in, tokens, version, stream);
  } else {
    launch_mma<4>(W, x, y, out, in, tokens, version, stream);
  }
}

void Mma3Workspace::reserve(std::int64_t floats, std::int64_t counters) {
  if (floats < 0 || counters < 0) throw std::invalid_argument("Mma3Workspace::reserve: negative size");
  if (static_cast<std::size_t>(floats) > partials_.size() || static_cast<std::size_t>(counters) > counters_.size()) {
    // As DequantScratch: launches queued on the old buffers finish before they are freed.
    CUDA_CHECK(cudaDeviceSynchronize());
    const auto f = std::max(static_cast<std::size_t>(floats), partials_.size());
    const auto c = std::max(static_cast<std::size_t>(counters), counters_.size());
    partials_ = DeviceBuffer<float>();
    counters_ = DeviceBuffer<unsigned>();
    partials_ = DeviceBuffer<float>(f);
    counters_ = DeviceBuffer<unsigned>(c);
    CUDA_CHECK(cudaMemset(counters_.data(), 0, counters_.bytes()));
  }
}

void gemm4_mma(const DeviceQuant4& W, const bf16* x, void* y, OutType y_type, int tokens, MmaVersion version,
               cudaStream_t stream, Mma3Workspace* workspace) {
  const std::string why = gemm4_mma_unsupported(W, version);
  if (!why.empty()) throw std::invalid_argument("gemm4_mma: " + why);
  if (tokens < 0) throw std::invalid_argument("gemm4_mma: tokens = " + std::to_string(tokens) + " is negative");
  const int out = static_cast<int>(W.shape[0]), in = static_cast<int>(W.shape[1]);
  if (tokens == 0 || out == 0) return;
  if (x == nullptr || y == nullptr) throw std::invalid_argument("gemm4_mma: null input or output pointer");
  if (reinterpret_cast<std::uintptr_t>(x) % 16 != 0) {
    throw std::invalid_argument("gemm4_mma: x (tokens x in bf16) must be 16-byte aligned");
  }
  if (version == MmaVersion::pair_table && workspace == nullptr) {
    throw std::invalid_argument("gemm4_mma: version 3 needs an Mma3Workspace");
  }
  if (y_type == OutType::bf16) {
    launch_for_tokens(W, x, static_cast<__nv_bfloat16*>(y), out, in, tokens, version, workspace, stream);
  } else {
    launch_for_tokens(W, x, static_cast<float*>(y), out, in, tokens, version, workspace, stream);
  }
}

}  // namespace qlora::cuda
