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

__global__ void swiglu_forward_kernel(const float* __restrict__ h1, const float* __restrict__ h3,
                                      float* __restrict__ g, std::int64_t n) {
  for (std::int64_t i = blockIdx.x * (std::int64_t)blockDim.x + threadIdx.x; i < n;
       i += (std::int64_t)gridDim.x * blockDim.x) {
    const float z = h1[i];
    g[i] = z / (1.0f + expf(-z)) * h3[i];
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

// The integer rounding of f32_to_bf16 (src/bf16.cpp), operation for operation.
__global__ void to_bf16_kernel(const float* __restrict__ x, bf16* __restrict__ y, std::int64_t n) {
  for (std::int64_t i = blockIdx.x * (std::int64_t)blockDim.x + threadIdx.x; i < n;
       i += (std::int64_t)gridDim.x * blockDim.x) {
    std::uint32_t u = __float_as_uint(x[i]);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
      y[i] = static_cast<bf16>((u >> 16) | 0x0040u);  // NaN stays a quiet NaN
    } else {
      u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
      y[i] = static_cast<bf16>(u >> 16);
    }
  }
}

//! [rope-cuda]
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
    const float c = cos_t[tab], s = sign * sin_t[tab];
    float* x = v + head * 2 * half + i;
    const float x0 = x[0], x1 = x[half];
    x[0] = x0 * c - x1 * s;
    x[half] = x0 * s + x1 * c;
  }
}
//! [rope-cuda]

// Row n's key or value (KV values) into its cache slot at its position: the CPU's
// decode_step writes k and v straight into kcache_/vcache_ the same way.
__global__ void kv_cache_write_kernel(const float* __restrict__ x, float* __restrict__ cache,
                                      const int* __restrict__ pos, const int* __restrict__ slot, std::int64_t n,
                                      int KV, int max_seq) {
  for (std::int64_t j = blockIdx.x * (std::int64_t)blockDim.x + threadIdx.x; j < n;
       j += (std::int64_t)gridDim.x * blockDim.x) {
    const std::int64_t row = j / KV;
    cache[((std::int64_t)slot[row] * max_seq + pos[row]) * KV + j % KV] = x[j];
  }
}

// ---------------------------------------------------------------------------------
// One block per row

__global__ void rmsnorm_forward_kernel(const float* __restrict__ x, const float* __restrict__ w,
                                       float* __restrict__ y, float* __restrict__ inv_rms, int D, float eps) {
  __shared__ float buf[32];
  const float* xr = x + (std::int64_t)blockIdx.x * D;
  float ss = 0.0f;
  for (int i = threadIdx.x; i < D; i += blockDim.x) ss += xr[i] * xr[i];
  ss = block_sum(ss, buf);
  const float r = 1.0f / sqrtf(ss / static_cast<float>(D) + eps);
  if (threadIdx.x == 0) inv_rms[blockIdx.x] = r;
  float* yr = y + (std::int64_t)blockIdx.x * D;
  for (int i = threadIdx.x; i < D; i += blockDim.x) yr[i] = xr[i] * r * w[i];
}

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
  swiglu_forward_kernel<<<blocks_for(n), kThreads, 0, s>>>(h1, h3, g, n);
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
