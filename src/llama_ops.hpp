// The LLaMA building blocks on the CPU, chapter 7 "The model": RMSNorm, rotary
// embedding, causal grouped-query attention, SwiGLU and cross-entropy, each with
// its backward. Plain loops, sums in double: these are the references that the
// GPU kernels of kernels/llama_ops.cuh are tested against, and the CPU model
// (llama_model.cpp) is built from them.
//
// Layout: N = B·T rows, row b·T + t holds token t of sequence b; a row of q or
// out holds n_heads heads of head_size (hs) values, a row of k or v n_kv_heads.
#pragma once

#include "llama2c.hpp"

#include <cstdint>
#include <vector>

namespace qlora {

/// y = x / rms(x) ⊙ w per row of D values, rms(x) = sqrt(mean(x²) + eps); inv_rms[n] = 1/rms of row n.
void rmsnorm_forward(const float* x, const float* w, float* y, float* inv_rms, int N, int D, float eps);

/// Gradient of rmsnorm_forward with respect to x, ADDED into dx (the weight w is frozen: no dw).
void rmsnorm_backward(const float* x, const float* w, const float* inv_rms, const float* dy, float* dx, int N, int D);

/// RoPE's head_size/2 inverse frequencies θ^(−2i/head_size), rescaled as c.rope_scaling says,
/// in float32 with transformers' order of operations (so the angles round the same way).
std::vector<float> rope_inv_freq(const LlamaConfig& c);

/// RoPE angle tables, seq_len × head_size/2 each: cos and sin of pos·rope_inv_freq(c)[i].
void rope_tables(const LlamaConfig& c, std::vector<float>& cos_t, std::vector<float>& sin_t);

/// Rotates the pairs (i, i + hs/2) of every head in place (Hugging Face's rotate-half
/// order); row n is at position pos0 + n % T. inverse rotates by −angle (the transpose: RoPE's backward).
void rope(float* v, int N, int T, int pos0, int n_heads, int hs, const std::vector<float>& cos_t,
          const std::vector<float>& sin_t, bool inverse);

/// One query head q (hs values) attending to n_keys keys K and values V whose rows are `stride`
/// floats apart: p gets the n_keys softmax weights, out (hs values) the weighted sum of V.
void attend(const float* q, const float* K, const float* V, int n_keys, int stride, int hs, float* p, float* out);

/// Causal attention of a whole batch, H query heads sharing KVH kv heads (head h uses kv head
/// h / (H/KVH)). q, out: N×(H·hs); k, v: N×(KVH·hs); att: B×H×T×T softmax weights, 0 for s > t.
void attention_forward(const float* q, const float* k, const float* v, float* att, float* out, int B, int T, int H,
                       int KVH, int hs);

/// Gradients of attention_forward given att and dout; dq, dk, dv are OVERWRITTEN.
void attention_backward(const float* q, const float* k, const float* v, const float* att, const float* dout,
                        float* dq, float* dk, float* dv, int B, int T, int H, int KVH, int hs);

/// silu(z) = z·sigmoid(z).
float silu(float z);

/// g = silu(h1) ⊙ h3 over n values.
void swiglu_forward(const float* h1, const float* h3, float* g, std::int64_t n);

/// dh1 = dg·h3·silu'(h1), dh3 = dg·silu(h1) (both overwritten).
void swiglu_backward(const float* h1, const float* h3, const float* dg, float* dh1, float* dh3, std::int64_t n);

/// Cross-entropy of one row of V logits: logsumexp(logits) − logits[target].
double cross_entropy_loss_row(const float* logits, int V, int target);

/// Overwrites one row of logits with weight·(softmax(logits) − onehot(target)).
void cross_entropy_backward_row(float* logits, int V, int target, float weight);

}  // namespace qlora
