// The LLaMA building blocks on the GPU (chapter 7, "The model"). See llama_ops.cuh;
// the CPU references are in src/llama_ops.cpp. The kernels are the CPU loops with
// the outer loop spread over threads: one block per row where a row needs a sum
// (RMSNorm, cross-entropy), one warp per attention row, one thread per element
// otherwise. They sum in float where the CPU sums in double; the tests bound the
// difference.
#include "llama_ops.cuh"

#include "warp_ops.cuh"

#include "cuda_check.cuh"

#include <algorithm>
#include <stdexcept>
#include <string>

namespace qlora::cuda {

namespace {

constexpr int kThreads = 256;      // elementwise kernels and row blocks
// RMSNorm's row blocks: at a decode step there is one row per sequence, so one block does all
// the work, and with 256 threads each walks 16 dependent loads of a 4096-wide row (Nsight
// Compute: 13.8 µs per call on an H200, 17 % of a 7B decode step's kernel time). 1024 threads
// take 4 each.
constexpr int kNormThreads = 1024;
constexpr int kWarpsPerBlock = 4;  // attention: one warp per row
constexpr int kMaxT = 1024;        // attention rows are looped over by one warp; keep them bounded
constexpr int kDecodeWarps = 8;    // attention_cached version 2: warps per query row

// Enough blocks for n elements (grid-stride loops cover the rest beyond the cap).
unsigned blocks_for(std::int64_t n) {
  return static_cast<unsigned>(std::min<std::int64_t>((n + kThreads - 1) / kThreads, 1 << 20));
}

// Over the block, returned to every thread. `buf` holds 32 floats of shared memory;
// the trailing barrier makes it safe to call again at once.
template <class Op>
__device__ float block_reduce(float v, float* buf) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  v = warp_reduce<Op>(v);
  if (lane == 0) buf[warp] = v;
  __syncthreads();
  v = lane < static_cast<int>(blockDim.x / 32) ? buf[lane] : Op::identity();
  v = warp_reduce<Op>(v);  // every warp reduces the partial results: no second broadcast needed
  __syncthreads();
  return v;
}

__device__ float block_sum(float v, float* buf) { return block_reduce<Sum>(v, buf); }
__device__ float block_max(float v, float* buf) { return block_reduce<Max>(v, buf); }

// The integer rounding of f32_to_bf16 (src/bf16.cpp), operation for operation: to_bf16 and
// the decode kernels that write a BF16 copy of their output round through this one function.
__device__ __forceinline__ bf16 round_bf16(float x) {
  std::uint32_t u = __float_as_uint(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<bf16>((u >> 16) | 0x0040u);  // NaN stays a quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
  return static_cast<bf16>(u >> 16);
}

void require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument(what);
}

// ---------------------------------------------------------------------------------
// Elementwise

__global__ void embedding_kernel(const bf16* __restrict__ table, const int* __restrict__ tokens,
                                 float* __restrict__ x, std::int64_t n, int D) {
  for (std::int64_t i = blockIdx.x * (std::int64_t)blockDim.x + threadIdx.x; i < n;
       i += (std::int64_t)gridDim.x * blockDim.x) {
    const std::int64_t row = i / D;
    x[i] = __uint_as_float(static_cast<unsigned>(table[(std::int64_t)tokens[row] * D + (i - row * D)]) << 16);
  }
}

// gb, when given, gets g rounded to BF16 (decoding: the down projection's operand), so the
// rounding needs no launch of its own; the value is the same either way.
__global__ void swiglu_forward_kernel(const float* __restrict__ h1, const float* __restrict__ h3,
                                      float* __restrict__ g, bf16* __restrict__ gb, std::int64_t n) {
  for (std::int64_t i = blockIdx.x * (std::int64_t)blockDim.x + threadIdx.x; i < n;
       i += (std::int64_t)gridDim.x * blockDim.x) {
    const float z = h1[i];
    const float v = z / (1.0f + expf(-z)) * h3[i];
    g[i] = v;
    if (gb != nullptr) gb[i] = round_bf16(v);
  }
}

// dh1 may be h1 and dh3 may be h3 (no __restrict__ there): each element is read before it is written.
__global__ void swiglu_backward_kernel(const float* h1, const float* h3, const float* __restrict__ dg, float* dh1,
                                       float* dh3, std::int64_t n) {
  for (std::int64_t i = blockIdx.x * (std::int64_t)blockDim.x + threadIdx.x; i < n;
       i += (std::int64_t)gridDim.x * blockDim.x) {
    const float z = h1[i], u = h3[i], d = dg[i], sig = 1.0f / (1.0f + expf(-z));
    dh3[i] = d * z * sig;
    dh1[i] = d * u * sig * (1.0f + z * (1.0f - sig));
  }
}

__global__ void add_kernel(float* __restrict__ y, const float* __restrict__ x, std::int64_t n) {
  for (std::int64_t i = blockIdx.x * (std::int64_t)blockDim.x + threadIdx.x; i < n;
       i += (std::int64_t)gridDim.x * blockDim.x)
    y[i] += x[i];
}

__global__ void to_bf16_kernel(const float* __restrict__ x, bf16* __restrict__ y, std::int64_t n) {
  for (std::int64_t i = blockIdx.x * (std::int64_t)blockDim.x + threadIdx.x; i < n;
       i += (std::int64_t)gridDim.x * blockDim.x)
    y[i] = round_bf16(x[i]);
}

//! [rope-cuda]
// The rotate-half pair (x0, x1) = (x[i], x[i + hs/2]) turned by the angle of cosine c, sine s.
// Every RoPE kernel here rotates through this function, so the fused decode kernel below gives
// rope_at's bits.
__device__ __forceinline__ float2 rotate(float x0, float x1, float c, float s) {
  return make_float2(x0 * c - x1 * s, x0 * s + x1 * c);
}

// One thread per rotated pair (row n, head h, pair i): the rotate-half pair
// (x[i], x[i + hs/2]) of head h, as the CPU's rope. Row n sits at position pos[n] when
// the rows carry their positions (decoding), else at n % T (a batch of whole sequences).
__global__ void rope_kernel(float* __restrict__ v, std::int64_t pairs, int T, const int* __restrict__ pos,
                            int n_heads, int half, const float* __restrict__ cos_t, const float* __restrict__ sin_t,
                            float sign) {
  for (std::int64_t j = blockIdx.x * (std::int64_t)blockDim.x + threadIdx.x; j < pairs;
       j += (std::int64_t)gridDim.x * blockDim.x) {
    const int i = static_cast<int>(j % half);
    const std::int64_t head = j / half;  // row n's head h, counted over all rows
    const std::int64_t n = head / n_heads;
    const std::int64_t tab = (pos ? pos[n] : n % T) * half + i;
    float* x = v + head * 2 * half + i;
    const float2 r = rotate(x[0], x[half], cos_t[tab], sign * sin_t[tab]);
    x[0] = r.x;
    x[half] = r.y;
  }
}
//! [rope-cuda]

// Where row `row`'s entry starts in a cache of slots × max_seq × KV: its slot, its position.
__device__ __forceinline__ std::int64_t cache_row(const int* pos, const int* slot, std::int64_t row, int KV,
                                                  int max_seq) {
  return ((std::int64_t)slot[row] * max_seq + pos[row]) * KV;
}

// Row n's key or value (KV values) into its cache slot at its position: the CPU's
// decode_step writes k and v straight into kcache_/vcache_ the same way.
__global__ void kv_cache_write_kernel(const float* __restrict__ x, float* __restrict__ cache,
                                      const int* __restrict__ pos, const int* __restrict__ slot, std::int64_t n,
                                      int KV, int max_seq) {
  for (std::int64_t j = blockIdx.x * (std::int64_t)blockDim.x + threadIdx.x; j < n;
       j += (std::int64_t)gridDim.x * blockDim.x) {
    const std::int64_t row = j / KV;
    cache[cache_row(pos, slot, row, KV, max_seq) + j % KV] = x[j];
  }
}

//! [rope-kv-cuda]
// Decoding's step between the projections and attention in one launch, the work of rope_at(q),
// rope_at(k), kv_cache_write(k) and kv_cache_write(v): one thread per q pair, then per k pair,
// then per v value. q turns in place; the turned keys go straight into the cache (nothing
// else reads them), the values are copied.
__global__ void rope_kv_write_kernel(float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
                                     float* __restrict__ kc, float* __restrict__ vc, const int* __restrict__ pos,
                                     const int* __restrict__ slot, int N, int H, int KVH, int half, int max_seq,
                                     const float* __restrict__ cos_t, const float* __restrict__ sin_t) {
  const int KV = KVH * 2 * half;
  const std::int64_t q_pairs = (std::int64_t)N * H * half, k_pairs = (std::int64_t)N * KVH * half;
  const std::int64_t total = q_pairs + k_pairs + (std::int64_t)N * KV;
  for (std::int64_t j = blockIdx.x * (std::int64_t)blockDim.x + threadIdx.x; j < total;
       j += (std::int64_t)gridDim.x * blockDim.x) {
    if (j < q_pairs + k_pairs) {
      const bool is_q = j < q_pairs;
      const std::int64_t p = is_q ? j : j - q_pairs;
      const int i = static_cast<int>(p % half);
      const std::int64_t head = p / half;  // counted over all rows, as in rope_kernel
      const std::int64_t n = head / (is_q ? H : KVH);
      const std::int64_t tab = (std::int64_t)pos[n] * half + i;
      const float* x = (is_q ? q : k) + head * 2 * half + i;
      const float2 r = rotate(x[0], x[half], cos_t[tab], sin_t[tab]);  // rope_at's sign is 1: 1·sin is sin exactly
      float* to = is_q ? q + head * 2 * half + i
                       : kc + cache_row(pos, slot, n, KV, max_seq) + (head % KVH) * 2 * half + i;
      to[0] = r.x;
      to[half] = r.y;
    } else {
      const std::int64_t e = j - q_pairs - k_pairs, row = e / KV;
      vc[cache_row(pos, slot, row, KV, max_seq) + e % KV] = v[e];
    }
  }
}
//! [rope-kv-cuda]

// ---------------------------------------------------------------------------------
// One block per row

// 1/rms of a row whose element i is value(i): thread k sums the squares of i = k, k + blockDim,
// …, then block_sum. Both RMSNorm kernels sum in this one order (with kNormThreads threads), so
// the decode kernel below gives rmsnorm_forward's bits.
template <class Value>
__device__ float inv_rms_row(Value value, int D, float eps, float* buf) {
  float ss = 0.0f;
  for (int i = threadIdx.x; i < D; i += blockDim.x) {
    const float v = value(i);
    ss += v * v;
  }
  ss = block_sum(ss, buf);
  return 1.0f / sqrtf(ss / static_cast<float>(D) + eps);
}

__global__ void rmsnorm_forward_kernel(const float* __restrict__ x, const float* __restrict__ w,
                                       float* __restrict__ y, float* __restrict__ inv_rms, int D, float eps) {
  __shared__ float buf[32];
  const float* xr = x + (std::int64_t)blockIdx.x * D;
  const float r = inv_rms_row([&](int i) { return xr[i]; }, D, eps, buf);
  if (threadIdx.x == 0) inv_rms[blockIdx.x] = r;
  float* yr = y + (std::int64_t)blockIdx.x * D;
  for (int i = threadIdx.x; i < D; i += blockDim.x) yr[i] = xr[i] * r * w[i];
}

//! [rmsnorm-rounded-cuda]
// Decoding's RMSNorm: add_inplace (when t is given: the residual stream takes the last
// projection's output, sum written to x_sum), rmsnorm_forward and to_bf16 in one launch, each
// element computed with their operations in their order. x_sum is x itself in the decoder: no
// __restrict__ on the two, and each element is read and then written by the same thread.
__global__ void rmsnorm_rounded_kernel(const float* x, const float* __restrict__ t, float* x_sum,
                                       const float* __restrict__ w, float* __restrict__ y, bf16* __restrict__ yb,
                                       int D, float eps) {
  __shared__ float buf[32];
  const std::int64_t off = (std::int64_t)blockIdx.x * D;
  const float* xr = x + off;
  float r;
  if (t == nullptr) {
    r = inv_rms_row([&](int i) { return xr[i]; }, D, eps, buf);
  } else {
    r = inv_rms_row(
        [&](int i) {
          const float v = xr[i] + t[off + i];
          x_sum[off + i] = v;
          return v;
        },
        D, eps, buf);
    xr = x_sum + off;  // this thread's own writes, read back
  }
  for (int i = threadIdx.x; i < D; i += blockDim.x) {
    const float v = xr[i] * r * w[i];
    y[off + i] = v;
    yb[off + i] = round_bf16(v);
  }
}
//! [rmsnorm-rounded-cuda]

__global__ void rmsnorm_backward_kernel(const float* __restrict__ x, const float* __restrict__ w,
                                        const float* __restrict__ inv_rms, const float* __restrict__ dy,
                                        float* __restrict__ dx, int D) {
  __shared__ float buf[32];
  const std::int64_t off = (std::int64_t)blockIdx.x * D;
  float dot = 0.0f;
  for (int i = threadIdx.x; i < D; i += blockDim.x) dot += dy[off + i] * w[i] * x[off + i];
  dot = block_sum(dot, buf);
  const float r = inv_rms[blockIdx.x];
  const float c = dot * r * r * r / static_cast<float>(D);
  for (int i = threadIdx.x; i < D; i += blockDim.x) dx[off + i] += r * w[i] * dy[off + i] - x[off + i] * c;
}

//! [cross-entropy-cuda]
// The max of a logits row, then Σ exp(l − max): two passes over the row, both block
// reductions, both results returned to every thread. The stable log-sum-exp that the
// loss and its gradient share.
struct MaxSum {
  float max, sum;
};
__device__ MaxSum row_max_sumexp(const float* l, int V, float* buf) {
  float mx = -INFINITY;
  for (int v = threadIdx.x; v < V; v += blockDim.x) mx = fmaxf(mx, l[v]);
  mx = block_max(mx, buf);
  float sum = 0.0f;
  for (int v = threadIdx.x; v < V; v += blockDim.x) sum += expf(l[v] - mx);
  return {mx, block_sum(sum, buf)};
}

__global__ void cross_entropy_loss_kernel(const float* __restrict__ logits, const int* __restrict__ targets,
                                          float* __restrict__ row_loss, int V) {
  __shared__ float buf[32];
  const int target = targets[blockIdx.x];
  if (target < 0) {  // the whole block leaves together: no barrier is skipped by some threads only
    if (threadIdx.x == 0) row_loss[blockIdx.x] = 0.0f;
    return;
  }
  const float* l = logits + (std::int64_t)blockIdx.x * V;
  const MaxSum ms = row_max_sumexp(l, V, buf);
  if (threadIdx.x == 0) row_loss[blockIdx.x] = ms.max + logf(ms.sum) - l[target];
}

__global__ void cross_entropy_backward_kernel(float* __restrict__ logits, const int* __restrict__ targets, int V,
                                              float scale) {
  __shared__ float buf[32];
  const int target = targets[blockIdx.x];
  float* l = logits + (std::int64_t)blockIdx.x * V;
  if (target < 0) {
    for (int v = threadIdx.x; v < V; v += blockDim.x) l[v] = 0.0f;
    return;
  }
  const MaxSum ms = row_max_sumexp(l, V, buf);
  const float w = scale / ms.sum;
  for (int v = threadIdx.x; v < V; v += blockDim.x) l[v] = expf(l[v] - ms.max) * w;
  __syncthreads();  // the thread that wrote l[target] may not be thread 0
  if (threadIdx.x == 0) l[target] -= scale;
}
//! [cross-entropy-cuda]

// ---------------------------------------------------------------------------------
// Attention: one warp per query row (b, h, t), or per key row (b, kv head, s).

// Where the tensors of query row id = (b·H + h)·T + t start (the same for forward and backward).
struct QueryRow {
  std::int64_t act;  // its head's slice of q, out, dout: (b·T + t)·D + h·hs
  std::int64_t kv;   // key/value 0 of its kv head (grouped-query: h / (H / KVH)): b·T·KV + g·hs
  int t;
};

__device__ __forceinline__ QueryRow query_row(std::int64_t id, int T, int H, int KVH, int hs) {
  const int t = static_cast<int>(id % T), h = static_cast<int>(id / T % H), b = static_cast<int>(id / T / H);
  const std::int64_t D = (std::int64_t)H * hs, KV = (std::int64_t)KVH * hs;
  return {((std::int64_t)b * T + t) * D + (std::int64_t)h * hs, (std::int64_t)b * T * KV + (std::int64_t)(h / (H / KVH)) * hs,
          t};
}

// out[i] = Σ_{s ≤ t} w[s]·rows[s·stride + i]; lane takes the head dimensions i = lane, lane+32, …
__device__ __forceinline__ void weighted_rows(const float* w, const float* rows, int t, int stride, int hs,
                                              float* out, int lane) {
  for (int i = lane; i < hs; i += 32) {
    float acc = 0.0f;
    for (int s = 0; s <= t; ++s) acc += w[s] * rows[(std::int64_t)s * stride + i];
    out[i] = acc;
  }
}

// p[s] = scale·(q·k_s) for the keys s ≤ t (k_s at K + s·stride); lane takes s = lane,
// lane+32, … and returns the largest score it wrote.
__device__ __forceinline__ float causal_scores(const float* qr, const float* K, int t, int stride, int hs, float scale,
                                               float* p, int lane) {
  float mx = -INFINITY;
  for (int s = lane; s <= t; s += 32) {
    float d = 0.0f;
    for (int i = 0; i < hs; ++i) d += qr[i] * K[(std::int64_t)s * stride + i];
    d *= scale;
    p[s] = d;
    mx = fmaxf(mx, d);
  }
  return mx;
}

//! [attention-forward-cuda]
// The lanes take the keys s = lane, lane+32, … for the scores and softmax (att's row is
// the scratch), then the head dimensions i = lane, lane+32, … for out = Σ_s p_s·v_s.
__global__ void attention_forward_kernel(const float* __restrict__ q, const float* __restrict__ k,
                                         const float* __restrict__ v, float* __restrict__ att,
                                         float* __restrict__ out, int B, int T, int H, int KVH, int hs,
                                         float scale) {
  const std::int64_t row_id = (std::int64_t)blockIdx.x * kWarpsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row_id >= (std::int64_t)B * H * T) return;  // uniform over the warp
  const QueryRow r = query_row(row_id, T, H, KVH, hs);
  const int t = r.t, KV = KVH * hs;
  const float* qr = q + r.act;
  const float* K = k + r.kv;
  float* p = att + row_id * T;  // row_id = (b·H + h)·T + t

  normalize_causal_row(p, t, T, warp_max(causal_scores(qr, K, t, KV, hs, scale, p, lane)), lane);
  __syncwarp();  // every lane now reads every p[s]
  weighted_rows(p, v + r.kv, t, KV, hs, out + r.act, lane);
}
//! [attention-forward-cuda]

//! [attention-cached-cuda]
// Decoding: query row (n, h) against its sequence's cache, keys 0..pos[n] of slot
// slot[n] (the CPU's attend). The same warp-per-row scheme as the kernel above: lanes
// over the keys for scores and softmax, then over the head dimensions for Σ_s p_s·v_s.
__global__ void attention_cached_kernel(const float* __restrict__ q, const float* __restrict__ kc,
                                        const float* __restrict__ vc, float* __restrict__ scores,
                                        float* __restrict__ out, const int* __restrict__ pos,
                                        const int* __restrict__ slot, int N, int H, int KVH, int hs, int max_seq,
                                        float scale) {
  const std::int64_t row_id = (std::int64_t)blockIdx.x * kWarpsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row_id >= (std::int64_t)N * H) return;  // uniform over the warp
  const int n = static_cast<int>(row_id / H), h = static_cast<int>(row_id % H);
  const int t = pos[n], KV = KVH * hs;
  const float* qr = q + (std::int64_t)n * H * hs + (std::int64_t)h * hs;
  const std::int64_t base = (std::int64_t)slot[n] * max_seq * KV + (std::int64_t)(h / (H / KVH)) * hs;
  const float* K = kc + base;
  float* p = scores + row_id * max_seq;

  normalize_causal_row(p, t, t + 1, warp_max(causal_scores(qr, K, t, KV, hs, scale, p, lane)), lane);
  __syncwarp();  // every lane now reads every p[s]
  weighted_rows(p, vc + base, t, KV, hs, out + (std::int64_t)n * H * hs + (std::int64_t)h * hs, lane);
}
//! [attention-cached-cuda]

// W consecutive floats (W = 4, 2 or 1) in one load: attention version 2's lanes read their
// head dimensions W at a time (16-byte loads for hs % 4 == 0, the usual case).
template <int W>
__device__ __forceinline__ void load_vec(const float* p, float (&v)[W]) {
  if constexpr (W == 4) {
    const float4 t = *reinterpret_cast<const float4*>(p);
    v[0] = t.x, v[1] = t.y, v[2] = t.z, v[3] = t.w;
  } else if constexpr (W == 2) {
    const float2 t = *reinterpret_cast<const float2*>(p);
    v[0] = t.x, v[1] = t.y;
  } else {
    v[0] = *p;
  }
}

//! [attention-cached-v2-cuda]
// Version 2 of decoding's attention: one block of kDecodeWarps warps per query row (n, h).
// Version 1's warp gives each lane a whole key (a chain of hs multiply-adds, neighbouring
// lanes hs·KVH floats apart) and then walks every key once per head dimension. Here the warps
// split the keys and the lanes a key's head dimensions, W-wide loads of consecutive floats: a
// score is one load per lane (hs ≤ 4·32) and a butterfly sum. Then the softmax over the block, and out = (Σ_s e_s·v_s)/Σ_s e_s
// with the same split; the warps' partial sums are added in warp order. Every sum has a fixed
// order (no atomics): the same bits every run. out_b gets out rounded to BF16, the o
// projection's operand.
template <int W>
__global__ void attention_cached_v2_kernel(const float* __restrict__ q, const float* __restrict__ kc,
                                           const float* __restrict__ vc, float* __restrict__ scores,
                                           float* __restrict__ out, bf16* __restrict__ out_b,
                                           const int* __restrict__ pos, const int* __restrict__ slot, int H, int KVH,
                                           int hs, int max_seq, float scale) {
  extern __shared__ float part[];  // kDecodeWarps × hs: each warp's Σ e_s·v_s
  __shared__ float buf[32];
  const int n = static_cast<int>(blockIdx.x / H), h = static_cast<int>(blockIdx.x % H);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int t = pos[n], KV = KVH * hs, chunks = hs / W;
  const float* qr = q + (std::int64_t)blockIdx.x * hs;  // blockIdx.x = n·H + h
  const std::int64_t base = (std::int64_t)slot[n] * max_seq * KV + (std::int64_t)(h / (H / KVH)) * hs;
  const float* K = kc + base;
  const float* V = vc + base;
  float* p = scores + (std::int64_t)blockIdx.x * max_seq;

  // Scores: warp w takes the keys s = w, w + kDecodeWarps, … (unrolled: several keys' loads
  // in flight at once on long rows).
  float mx = -INFINITY;
#pragma unroll 4
  for (int s = warp; s <= t; s += kDecodeWarps) {
    float d = 0.0f;
    for (int c = lane; c < chunks; c += 32) {
      float a[W], b[W];
      load_vec<W>(qr + c * W, a);
      load_vec<W>(K + (std::int64_t)s * KV + c * W, b);
#pragma unroll
      for (int j = 0; j < W; ++j) d += a[j] * b[j];
    }
    d = warp_sum(d) * scale;  // every lane holds the score
    if (lane == 0) p[s] = d;
    mx = fmaxf(mx, d);
  }
  mx = block_max(mx, buf);  // its barriers also publish the scores to the block

  // Softmax numerators e_s = exp(score − max) in place, and their sum.
  float sum = 0.0f;
  for (int s = threadIdx.x; s <= t; s += blockDim.x) {
    const float e = expf(p[s] - mx);
    p[s] = e;
    sum += e;
  }
  const float inv = 1.0f / block_sum(sum, buf);  // its barriers publish the e_s

  // Σ_s e_s·v_s: warp w over its keys again, each lane over its W-wide slices of the head.
  for (int c = lane; c < chunks; c += 32) {
    float acc[W] = {};
#pragma unroll 4
    for (int s = warp; s <= t; s += kDecodeWarps) {
      float b[W];
      load_vec<W>(V + (std::int64_t)s * KV + c * W, b);
      const float e = p[s];
#pragma unroll
      for (int j = 0; j < W; ++j) acc[j] += e * b[j];
    }
#pragma unroll
    for (int j = 0; j < W; ++j) part[warp * hs + c * W + j] = acc[j];
  }
  __syncthreads();
  for (int i = threadIdx.x; i < hs; i += blockDim.x) {
    float o = 0.0f;
    for (int w = 0; w < kDecodeWarps; ++w) o += part[w * hs + i];
    o *= inv;
    const std::int64_t at = (std::int64_t)blockIdx.x * hs + i;
    out[at] = o;
    out_b[at] = round_bf16(o);
  }
}
//! [attention-cached-v2-cuda]

//! [attention-backward-cuda]
// Pass 1, per query row: dp_s = dout_t·v_s, ds_s = p_s (dp_s − Σ p·dp)·scale (the
// gradient of the score), dq_t = Σ_s ds_s·k_s. Only this warp writes row t of ds and dq.
__global__ void attention_backward_q_kernel(const float* __restrict__ q, const float* __restrict__ k,
                                            const float* __restrict__ v, const float* __restrict__ att,
                                            const float* __restrict__ dout, float* __restrict__ ds,
                                            float* __restrict__ dq, int B, int T, int H, int KVH, int hs,
                                            float scale) {
  const std::int64_t row_id = (std::int64_t)blockIdx.x * kWarpsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row_id >= (std::int64_t)B * H * T) return;
  const QueryRow r = query_row(row_id, T, H, KVH, hs);
  const int t = r.t, KV = KVH * hs;
  const float* V = v + r.kv;
  const float* dor = dout + r.act;
  const float* p = att + row_id * T;
  float* dsr = ds + row_id * T;

  float pdp = 0.0f;
  for (int s = lane; s <= t; s += 32) {
    float d = 0.0f;
    for (int i = 0; i < hs; ++i) d += dor[i] * V[(std::int64_t)s * KV + i];
    dsr[s] = d;  // dp_s for now
    pdp += p[s] * d;
  }
  pdp = warp_sum(pdp);
  for (int s = lane; s < T; s += 32) dsr[s] = s <= t ? p[s] * (dsr[s] - pdp) * scale : 0.0f;
  __syncwarp();
  weighted_rows(dsr, k + r.kv, t, KV, hs, dq + r.act, lane);
}

// Pass 2, per key row s of kv head g: dk_s = Σ_h Σ_{t≥s} ds[h,t,s]·q_t,h and
// dv_s = Σ_h Σ_{t≥s} p[h,t,s]·dout_t,h over the query heads h of the group.
// Each output has one writer, so no atomics and the same bits every run.
__global__ void attention_backward_kv_kernel(const float* __restrict__ q, const float* __restrict__ att,
                                             const float* __restrict__ dout, const float* __restrict__ ds,
                                             float* __restrict__ dk, float* __restrict__ dv, int B, int T, int H,
                                             int KVH, int hs) {
  const std::int64_t row_id = (std::int64_t)blockIdx.x * kWarpsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row_id >= (std::int64_t)B * KVH * T) return;
  const int s = static_cast<int>(row_id % T), g = static_cast<int>(row_id / T % KVH),
            b = static_cast<int>(row_id / T / KVH);
  const int D = H * hs, KV = KVH * hs, group = H / KVH;
  for (int i = lane; i < hs; i += 32) {
    float acc_k = 0.0f, acc_v = 0.0f;
    for (int h = g * group; h < (g + 1) * group; ++h)
      for (int t = s; t < T; ++t) {
        const std::int64_t a = (((std::int64_t)b * H + h) * T + t) * T + s;
        const std::int64_t x = ((std::int64_t)b * T + t) * D + (std::int64_t)h * hs + i;
        acc_k += ds[a] * q[x];
        acc_v += att[a] * dout[x];
      }
    const std::int64_t o = ((std::int64_t)b * T + s) * KV + (std::int64_t)g * hs + i;
    dk[o] = acc_k;
    dv[o] = acc_v;
  }
}
//! [attention-backward-cuda]

void check_attention(int B, int T, int H, int KVH, int hs, const char* who) {
  const std::string w = who;
  require(B > 0 && T > 0 && H > 0 && KVH > 0 && hs > 0,
          w + ": B, T, H, KVH and hs must be positive (got B=" + std::to_string(B) + ", T=" + std::to_string(T) +
              ", H=" + std::to_string(H) + ", KVH=" + std::to_string(KVH) + ", hs=" + std::to_string(hs) + ")");
  require(H % KVH == 0, w + ": " + std::to_string(H) + " query heads cannot share " + std::to_string(KVH) +
                            " kv heads evenly");
  require(T <= kMaxT, w + ": T=" + std::to_string(T) + " exceeds the supported " + std::to_string(kMaxT));
}

unsigned warp_blocks(std::int64_t rows) { return static_cast<unsigned>((rows + kWarpsPerBlock - 1) / kWarpsPerBlock); }

}  // namespace

void embedding_forward(const bf16* table, const int* tokens, float* x, int N, int D, cudaStream_t s) {
  require(N >= 0 && D > 0, "embedding_forward: need N >= 0 and D > 0");
  const std::int64_t n = (std::int64_t)N * D;
  if (n == 0) return;
  embedding_kernel<<<blocks_for(n), kThreads, 0, s>>>(table, tokens, x, n, D);
  CUDA_CHECK_LAUNCH();
}

void rmsnorm_forward(const float* x, const float* w, float* y, float* inv_rms, int N, int D, float eps,
                     cudaStream_t s) {
  require(N >= 0 && D > 0, "rmsnorm_forward: need N >= 0 and D > 0");
  if (N == 0) return;
  rmsnorm_forward_kernel<<<N, kNormThreads, 0, s>>>(x, w, y, inv_rms, D, eps);
  CUDA_CHECK_LAUNCH();
}

void rmsnorm_rounded(const float* x, const float* w, float* y, bf16* yb, int N, int D, float eps, cudaStream_t s) {
  require(N >= 0 && D > 0, "rmsnorm_rounded: need N >= 0 and D > 0");
  if (N == 0) return;
  rmsnorm_rounded_kernel<<<N, kNormThreads, 0, s>>>(x, nullptr, nullptr, w, y, yb, D, eps);
  CUDA_CHECK_LAUNCH();
}

void add_rmsnorm_rounded(float* x, const float* t, const float* w, float* y, bf16* yb, int N, int D, float eps,
                         cudaStream_t s) {
  require(N >= 0 && D > 0, "add_rmsnorm_rounded: need N >= 0 and D > 0");
  if (N == 0) return;
  rmsnorm_rounded_kernel<<<N, kNormThreads, 0, s>>>(x, t, x, w, y, yb, D, eps);
  CUDA_CHECK_LAUNCH();
}

void rmsnorm_backward(const float* x, const float* w, const float* inv_rms, const float* dy, float* dx, int N, int D,
                      cudaStream_t s) {
  require(N >= 0 && D > 0, "rmsnorm_backward: need N >= 0 and D > 0");
  if (N == 0) return;
  rmsnorm_backward_kernel<<<N, kNormThreads, 0, s>>>(x, w, inv_rms, dy, dx, D);
  CUDA_CHECK_LAUNCH();
}

void rope(float* v, int N, int T, int n_heads, int hs, const float* cos_t, const float* sin_t, bool inverse,
          cudaStream_t s) {
  require(N >= 0 && T > 0 && n_heads > 0 && hs > 0 && hs % 2 == 0,
          "rope: need N >= 0, T > 0, n_heads > 0 and an even head size (got hs=" + std::to_string(hs) + ")");
  const std::int64_t pairs = (std::int64_t)N * n_heads * (hs / 2);
  if (pairs == 0) return;
  rope_kernel<<<blocks_for(pairs), kThreads, 0, s>>>(v, pairs, T, nullptr, n_heads, hs / 2, cos_t, sin_t,
                                                     inverse ? -1.0f : 1.0f);
  CUDA_CHECK_LAUNCH();
}

void rope_at(float* v, int N, const int* pos, int n_heads, int hs, const float* cos_t, const float* sin_t,
             cudaStream_t s) {
  require(N >= 0 && n_heads > 0 && hs > 0 && hs % 2 == 0,
          "rope_at: need N >= 0, n_heads > 0 and an even head size (got hs=" + std::to_string(hs) + ")");
  const std::int64_t pairs = (std::int64_t)N * n_heads * (hs / 2);
  if (pairs == 0) return;
  rope_kernel<<<blocks_for(pairs), kThreads, 0, s>>>(v, pairs, 1, pos, n_heads, hs / 2, cos_t, sin_t, 1.0f);
  CUDA_CHECK_LAUNCH();
}

void kv_cache_write(const float* x, float* cache, const int* pos, const int* slot, int N, int KV, int max_seq,
                    cudaStream_t s) {
  require(N >= 0 && KV > 0 && max_seq > 0, "kv_cache_write: need N >= 0, KV > 0 and max_seq > 0");
  const std::int64_t n = (std::int64_t)N * KV;
  if (n == 0) return;
  kv_cache_write_kernel<<<blocks_for(n), kThreads, 0, s>>>(x, cache, pos, slot, n, KV, max_seq);
  CUDA_CHECK_LAUNCH();
}

void rope_kv_cache_write(float* q, const float* k, const float* v, float* kc, float* vc, const int* pos,
                         const int* slot, int N, int H, int KVH, int hs, int max_seq, const float* cos_t,
                         const float* sin_t, cudaStream_t s) {
  require(N >= 0 && H > 0 && KVH > 0 && hs > 0 && hs % 2 == 0 && max_seq > 0,
          "rope_kv_cache_write: need N >= 0, H > 0, KVH > 0, max_seq > 0 and an even head size (got hs=" +
              std::to_string(hs) + ")");
  const std::int64_t total = (std::int64_t)N * (H + KVH) * (hs / 2) + (std::int64_t)N * KVH * hs;
  if (total == 0) return;
  rope_kv_write_kernel<<<blocks_for(total), kThreads, 0, s>>>(q, k, v, kc, vc, pos, slot, N, H, KVH, hs / 2, max_seq,
                                                             cos_t, sin_t);
  CUDA_CHECK_LAUNCH();
}

void attention_cached(const float* q, const float* kc, const float* vc, float* scores, float* out, const int* pos,
                      const int* slot, int N, int H, int KVH, int hs, int max_seq, cudaStream_t s) {
  check_attention(1, 1, H, KVH, hs, "attention_cached");
  require(N >= 0 && max_seq > 0, "attention_cached: need N >= 0 and max_seq > 0");
  if (N == 0) return;
  const float scale = 1.0f / sqrtf(static_cast<float>(hs));
  attention_cached_kernel<<<warp_blocks((std::int64_t)N * H), 32 * kWarpsPerBlock, 0, s>>>(
      q, kc, vc, scores, out, pos, slot, N, H, KVH, hs, max_seq, scale);
  CUDA_CHECK_LAUNCH();
}

void attention_cached_v2(const float* q, const float* kc, const float* vc, float* scores, float* out, bf16* out_b,
                         const int* pos, const int* slot, int N, int H, int KVH, int hs, int max_seq, cudaStream_t s) {
  check_attention(1, 1, H, KVH, hs, "attention_cached_v2");
  require(N >= 0 && max_seq > 0, "attention_cached_v2: need N >= 0 and max_seq > 0");
  const std::size_t smem = sizeof(float) * kDecodeWarps * hs;
  require(smem <= 48 * 1024, "attention_cached_v2: head size " + std::to_string(hs) + " exceeds the supported " +
                                 std::to_string(48 * 1024 / (sizeof(float) * kDecodeWarps)));
  if (N == 0) return;
  // The widest load that the head size and the pointers allow (cudaMalloc's are 256-byte aligned).
  const auto aligned = [&](std::size_t bytes) {
    for (const float* ptr : {q, kc, vc})
      if (reinterpret_cast<std::uintptr_t>(ptr) % bytes != 0) return false;
    return true;
  };
  const int width = hs % 4 == 0 && aligned(16) ? 4 : hs % 2 == 0 && aligned(8) ? 2 : 1;
  auto kernel = width == 4 ? attention_cached_v2_kernel<4>
                           : width == 2 ? attention_cached_v2_kernel<2> : attention_cached_v2_kernel<1>;
  const float scale = 1.0f / sqrtf(static_cast<float>(hs));
  kernel<<<static_cast<unsigned>((std::int64_t)N * H), 32 * kDecodeWarps, smem, s>>>(
      q, kc, vc, scores, out, out_b, pos, slot, H, KVH, hs, max_seq, scale);
  CUDA_CHECK_LAUNCH();
}

void attention_forward(const float* q, const float* k, const float* v, float* att, float* out, int B, int T, int H,
                       int KVH, int hs, cudaStream_t s) {
  check_attention(B, T, H, KVH, hs, "attention_forward");
  const float scale = 1.0f / sqrtf(static_cast<float>(hs));
  attention_forward_kernel<<<warp_blocks((std::int64_t)B * H * T), 32 * kWarpsPerBlock, 0, s>>>(q, k, v, att, out, B,
                                                                                                T, H, KVH, hs, scale);
  CUDA_CHECK_LAUNCH();
}

void attention_backward(const float* q, const float* k, const float* v, const float* att, const float* dout,
                        float* ds, float* dq, float* dk, float* dv, int B, int T, int H, int KVH, int hs,
                        cudaStream_t s) {
  check_attention(B, T, H, KVH, hs, "attention_backward");
  const float scale = 1.0f / sqrtf(static_cast<float>(hs));
  attention_backward_q_kernel<<<warp_blocks((std::int64_t)B * H * T), 32 * kWarpsPerBlock, 0, s>>>(
      q, k, v, att, dout, ds, dq, B, T, H, KVH, hs, scale);
  CUDA_CHECK_LAUNCH();
  attention_backward_kv_kernel<<<warp_blocks((std::int64_t)B * KVH * T), 32 * kWarpsPerBlock, 0, s>>>(
      q, att, dout, ds, dk, dv, B, T, H, KVH, hs);
  CUDA_CHECK_LAUNCH();
}

void swiglu_forward(const float* h1, const float* h3, float* g, std::int64_t n, cudaStream_t s) {
  require(n >= 0, "swiglu_forward: negative size");
  if (n == 0) return;
  swiglu_forward_kernel<<<blocks_for(n), kThreads, 0, s>>>(h1, h3, g, nullptr, n);
  CUDA_CHECK_LAUNCH();
}

void swiglu_rounded(const float* h1, const float* h3, float* g, bf16* gb, std::int64_t n, cudaStream_t s) {
  require(n >= 0, "swiglu_rounded: negative size");
  if (n == 0) return;
  swiglu_forward_kernel<<<blocks_for(n), kThreads, 0, s>>>(h1, h3, g, gb, n);
  CUDA_CHECK_LAUNCH();
}

void swiglu_backward(const float* h1, const float* h3, const float* dg, float* dh1, float* dh3, std::int64_t n,
                     cudaStream_t s) {
  require(n >= 0, "swiglu_backward: negative size");
  if (n == 0) return;
  swiglu_backward_kernel<<<blocks_for(n), kThreads, 0, s>>>(h1, h3, dg, dh1, dh3, n);
  CUDA_CHECK_LAUNCH();
}

void cross_entropy_loss(const float* logits, const int* targets, float* row_loss, int N, int V, cudaStream_t s) {
  require(N >= 0 && V > 0, "cross_entropy_loss: need N >= 0 and V > 0");
  if (N == 0) return;
  cross_entropy_loss_kernel<<<N, kThreads, 0, s>>>(logits, targets, row_loss, V);
  CUDA_CHECK_LAUNCH();
}

void cross_entropy_backward(float* logits, const int* targets, int N, int V, float scale, cudaStream_t s) {
  require(N >= 0 && V > 0, "cross_entropy_backward: need N >= 0 and V > 0");
  if (N == 0) return;
  cross_entropy_backward_kernel<<<N, kThreads, 0, s>>>(logits, targets, V, scale);
  CUDA_CHECK_LAUNCH();
}

void add_inplace(float* y, const float* x, std::int64_t n, cudaStream_t s) {
  require(n >= 0, "add_inplace: negative size");
  if (n == 0) return;
  add_kernel<<<blocks_for(n), kThreads, 0, s>>>(y, x, n);
  CUDA_CHECK_LAUNCH();
}

void to_bf16(const float* x, bf16* y, std::int64_t n, cudaStream_t s) {
  require(n >= 0, "to_bf16: negative size");
  if (n == 0) return;
  to_bf16_kernel<<<blocks_for(n), kThreads, 0, s>>>(x, y, n);
  CUDA_CHECK_LAUNCH();
}

}  // namespace qlora::cuda
