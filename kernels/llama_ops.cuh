// The LLaMA building blocks on the GPU (chapter 7, "The model"): embedding,
// RMSNorm, rotary embedding, causal attention with grouped-query heads, SwiGLU,
// cross-entropy, and two small helpers. Each kernel repeats the plain loop of
// its CPU reference in src/llama_ops.cpp (or src/bf16.cpp), one thread, warp or
// block per independent row, so tests/test_ch07_gpu_ops.cpp can compare them
// element by element. No atomics anywhere: every output has exactly one writer,
// so results are deterministic from run to run.
//
// Decoding (kernels/generate_gpu.cu) runs a few rows per step, where a launch costs more
// than its work: it has fused versions (rmsnorm_rounded, add_rmsnorm_rounded,
// rope_kv_cache_write, swiglu_rounded), each one launch computing exactly what two to four
// of the kernels here compute (the tests hold them to the same bits), and a second version
// of attention against the cache.
//
// Layout as on the CPU: activations are float32 row-major, N = B·T rows with
// row b·T + t holding token t of sequence b. All pointers are device pointers;
// work is enqueued on stream `s` and every launch is checked.
#pragma once

#include "bf16.hpp"

#include <cuda_runtime.h>

#include <cstdint>

namespace qlora::cuda {

/// x[n·D + d] = table[tokens[n]·D + d], widened from BF16 (exact). The table is BF16 because
/// the model stores it so (half the bytes of float32: 0.5 GB less on a 65B LLaMA).
/// CPU reference: the embedding copy in LlamaModel::forward.
void embedding_forward(const bf16* table, const int* tokens, float* x, int N, int D, cudaStream_t s);

/// y = x / rms(x) ⊙ w per row, inv_rms[n] kept for backward. CPU reference: qlora::rmsnorm_forward.
void rmsnorm_forward(const float* x, const float* w, float* y, float* inv_rms, int N, int D, float eps,
                     cudaStream_t s);

/// Decoding's RMSNorm: y as rmsnorm_forward computes it (no inv_rms: nothing is differentiated),
/// and yb = bf16(y), the projections' operand, in one launch. Bit for bit rmsnorm_forward + to_bf16.
void rmsnorm_rounded(const float* x, const float* w, float* y, bf16* yb, int N, int D, float eps, cudaStream_t s);
/// x += t (the residual stream takes a projection's output), then rmsnorm_rounded of the new x, in
/// one launch. Bit for bit add_inplace + rmsnorm_forward + to_bf16.
void add_rmsnorm_rounded(float* x, const float* t, const float* w, float* y, bf16* yb, int N, int D, float eps,
                         cudaStream_t s);

/// dx += ∂loss/∂x of RMSNorm (ADDS into dx; the norm weight is frozen). CPU reference: qlora::rmsnorm_backward.
void rmsnorm_backward(const float* x, const float* w, const float* inv_rms, const float* dy, float* dx, int N, int D,
                      cudaStream_t s);

/// Rotates each head's rotate-half pairs (i, i + hs/2) in place; row n is at position n % T.
/// cos_t, sin_t: seq_len × hs/2 as built by qlora::rope_tables. inverse rotates backwards (the
/// backward pass). CPU reference: qlora::rope.
void rope(float* v, int N, int T, int n_heads, int hs, const float* cos_t, const float* sin_t, bool inverse,
          cudaStream_t s);

/// rope with each row's position given: row n at pos[n] (device array of N), forward only.
/// The decode step's rows are tokens of different sequences at different positions. The decoder
/// runs rope_kv_cache_write below; rope_at and kv_cache_write are its pieces, which its test
/// composes as the reference.
void rope_at(float* v, int N, const int* pos, int n_heads, int hs, const float* cos_t, const float* sin_t,
             cudaStream_t s);
/// The KV cache's write: row n of x (N×KV) goes to cache[(slot[n]·max_seq + pos[n])·KV …], the cache
/// being slots × max_seq × KV. CPU reference: LlamaModel::decode_step's k and v projections into its cache.
void kv_cache_write(const float* x, float* cache, const int* pos, const int* slot, int N, int KV, int max_seq,
                    cudaStream_t s);
/// Decoding's step between the projections and attention in one launch: q (N×H·hs) rotated in
/// place as rope_at, k (N×KVH·hs) rotated into kc, v copied into vc, each row at pos[n] of slot
/// slot[n]; k itself is left as it was. Bit for bit rope_at(q), rope_at(k), kv_cache_write(k),
/// kv_cache_write(v) (the cache's entries; k then differs: it is not rotated in place).
void rope_kv_cache_write(float* q, const float* k, const float* v, float* kc, float* vc, const int* pos,
                         const int* slot, int N, int H, int KVH, int hs, int max_seq, const float* cos_t,
                         const float* sin_t, cudaStream_t s);
/// Attention of N query rows (q, out: N×(H·hs)) against a KV cache (kc, vc: slots × max_seq × KVH·hs):
/// row n sees positions 0..pos[n] of slot slot[n]. scores: N×H×max_seq scratch. CPU reference:
/// qlora::attend, as LlamaModel::decode_step calls it. Version 1, the simplest: a warp per
/// query row, a lane per key.
void attention_cached(const float* q, const float* kc, const float* vc, float* scores, float* out, const int* pos,
                      const int* slot, int N, int H, int KVH, int hs, int max_seq, cudaStream_t s);
/// Version 2 of attention_cached, what the decoder runs: the same function (same arguments, the
/// float32 sums in another order), a block per query row with the keys split over its warps and
/// the head dimensions over the lanes, and out_b = bf16(out) besides (the o projection's
/// operand). hs·32 bytes of shared memory per block: hs ≤ 1536. q, kc and vc are read 16 bytes
/// at a time where hs and their alignment allow (8 or 4 otherwise).
void attention_cached_v2(const float* q, const float* kc, const float* vc, float* scores, float* out, bf16* out_b,
                         const int* pos, const int* slot, int N, int H, int KVH, int hs, int max_seq, cudaStream_t s);
/// Causal softmax attention with H query heads sharing KVH key/value heads. q, out: N×(H·hs); k, v: N×(KVH·hs);
/// att: B×H×T×T softmax weights, zero above the diagonal. T ≤ 1024. CPU reference: qlora::attention_forward.
void attention_forward(const float* q, const float* k, const float* v, float* att, float* out, int B, int T, int H,
                       int KVH, int hs, cudaStream_t s);

/// Gradients of attention_forward. ds: scratch B×H×T×T (the softmax input gradient); dq, dk, dv OVERWRITTEN.
/// Deterministic: one pass per query row writes ds and dq, one pass per key row writes dk and dv, summing over
/// the query heads of its kv group. CPU reference: qlora::attention_backward.
void attention_backward(const float* q, const float* k, const float* v, const float* att, const float* dout,
                        float* ds, float* dq, float* dk, float* dv, int B, int T, int H, int KVH, int hs,
                        cudaStream_t s);

/// g = silu(h1) ⊙ h3. CPU reference: qlora::swiglu_forward.
void swiglu_forward(const float* h1, const float* h3, float* g, std::int64_t n, cudaStream_t s);
/// swiglu_forward that also writes gb = bf16(g), the down projection's operand: bit for bit
/// swiglu_forward + to_bf16, in one launch.
void swiglu_rounded(const float* h1, const float* h3, float* g, bf16* gb, std::int64_t n, cudaStream_t s);

/// dh1, dh3 (overwritten) from dg; in place allowed (dh1 = h1, dh3 = h3). CPU reference: qlora::swiglu_backward.
void swiglu_backward(const float* h1, const float* h3, const float* dg, float* dh1, float* dh3, std::int64_t n,
                     cudaStream_t s);

/// row_loss[n] = logsumexp(logits row n) − logits[n, targets[n]]; 0 when targets[n] < 0.
/// CPU reference: qlora::cross_entropy_loss_row.
void cross_entropy_loss(const float* logits, const int* targets, float* row_loss, int N, int V, cudaStream_t s);

/// In place: logits row n → scale·(softmax − onehot(targets[n])); rows with targets[n] < 0 → 0.
/// CPU reference: qlora::cross_entropy_backward_row with weight = scale.
void cross_entropy_backward(float* logits, const int* targets, int N, int V, float scale, cudaStream_t s);

/// y += x elementwise (the residual stream).
void add_inplace(float* y, const float* x, std::int64_t n, cudaStream_t s);

/// y = bf16(x), round to nearest even. CPU reference: qlora::f32_to_bf16 (src/bf16.cpp).
void to_bf16(const float* x, bf16* y, std::int64_t n, cudaStream_t s);

}  // namespace qlora::cuda
