// The LLaMA building blocks on the CPU, chapter 7 "The model". See llama_ops.hpp.
// Plain loops: they are cheap next to the matmuls, obviously right, and the same
// code serves the reference model, the BLAS model and the GPU kernels' tests.
#include "llama_ops.hpp"

#include <algorithm>
#include <cmath>
#include <numbers>

namespace qlora {

namespace {
std::size_t usz(std::int64_t a) { return static_cast<std::size_t>(a); }
}  // namespace

//! [rmsnorm]
// y = x / rms(x) · w,  rms(x) = sqrt(mean(x²) + eps). Keeps 1/rms per row for backward.
void rmsnorm_forward(const float* x, const float* w, float* y, float* inv_rms, int N, int D, float eps) {
  for (int n = 0; n < N; ++n) {
    const float* xr = x + usz(n) * D;
    double ss = 0.0;
    for (int i = 0; i < D; ++i) ss += static_cast<double>(xr[i]) * xr[i];
    const float r = static_cast<float>(1.0 / std::sqrt(ss / D + eps));
    inv_rms[n] = r;
    for (int i = 0; i < D; ++i) y[usz(n) * D + i] = xr[i] * r * w[i];
  }
}
//! [rmsnorm]

//! [rmsnorm-backward]
// dx_i = r·w_i·dy_i − x_i·r³/D · Σ_j dy_j·w_j·x_j   (the weight w is frozen: no dw).
// ADDS into dx (the residual stream already carries the gradient of the skip path).
void rmsnorm_backward(const float* x, const float* w, const float* inv_rms, const float* dy, float* dx, int N, int D) {
  for (int n = 0; n < N; ++n) {
    const float* xr = x + usz(n) * D;
    const float* dyr = dy + usz(n) * D;
    double dot = 0.0;
    for (int i = 0; i < D; ++i) dot += static_cast<double>(dyr[i]) * w[i] * xr[i];
    const double r = inv_rms[n];
    const double c = dot * r * r * r / D;
    for (int i = 0; i < D; ++i) dx[usz(n) * D + i] += static_cast<float>(r * w[i] * dyr[i] - xr[i] * c);
  }
}
//! [rmsnorm-backward]

// transformers builds inv_freq from float32 torch ops at model creation. The same float
// operations in the same order give the same values (up to powf's last bit), so the
// angles, and the logits, agree to float rounding. x / y in torch's `scalar / tensor`
// is reciprocal(y) · x, hence the (1 / y) * x below.
std::vector<float> rope_inv_freq(const LlamaConfig& c) {
  const int hs = c.head_size(), half = hs / 2;
  std::vector<float> inv(usz(half));
  for (int i = 0; i < half; ++i)
    inv[usz(i)] = 1.0f / std::pow(c.rope_theta, static_cast<float>(2 * i) / static_cast<float>(hs));
  if (c.rope_scaling.type == RopeScaling::Type::none) return inv;

  //! [rope-llama3]
  // LLaMA 3.1: a frequency whose wavelength (in positions) is longer than original/low
  // never completed a turn within the pretraining context, so it is slowed down by
  // `factor`; one shorter than original/high is kept; in between, the two are blended
  // linearly in original/wavelength.
  const RopeScaling& s = c.rope_scaling;
  const auto original = static_cast<double>(s.original_max_position_embeddings);
  const auto low_wavelen = static_cast<float>(original / s.low_freq_factor);
  const auto high_wavelen = static_cast<float>(original / s.high_freq_factor);
  const auto band = static_cast<float>(static_cast<double>(s.high_freq_factor) - s.low_freq_factor);
  const auto two_pi = static_cast<float>(2.0 * std::numbers::pi);
  for (float& f : inv) {
    const float wavelen = (1.0f / f) * two_pi;
    const float slow = wavelen > low_wavelen ? f / s.factor : f;
    const float smooth = ((1.0f / wavelen) * static_cast<float>(original) - s.low_freq_factor) / band;
    const bool medium = !(wavelen < high_wavelen) && !(wavelen > low_wavelen);
    f = medium ? (1.0f - smooth) * slow / s.factor + smooth * slow : slow;
  }
  //! [rope-llama3]
  return inv;
}

// RoPE angle tables for every position. The angle is rounded to float like transformers'
// float32 position × inv_freq; its cos and sin are computed in double and rounded once.
void rope_tables(const LlamaConfig& c, std::vector<float>& cos_t, std::vector<float>& sin_t) {
  const auto inv = rope_inv_freq(c);
  const std::size_t half = inv.size();
  cos_t.resize(usz(c.seq_len) * half);
  sin_t.resize(cos_t.size());
  for (int pos = 0; pos < c.seq_len; ++pos)
    for (std::size_t i = 0; i < half; ++i) {
      const double angle = static_cast<float>(pos) * inv[i];
      cos_t[usz(pos) * half + i] = static_cast<float>(std::cos(angle));
      sin_t[usz(pos) * half + i] = static_cast<float>(std::sin(angle));
    }
}

//! [rope]
// RoPE, Hugging Face's rotate-half convention: in every head, the pair
// (x[i], x[i + hs/2]) is rotated by the angle pos·θ^(−2i/head_size). Row n holds
// position pos0 + n % T. `inverse` rotates by −angle: the transpose of the rotation,
// which is RoPE's backward.
void rope(float* v, int N, int T, int pos0, int n_heads, int hs, const std::vector<float>& cos_t,
          const std::vector<float>& sin_t, bool inverse) {
  const int half = hs / 2;
  for (int n = 0; n < N; ++n) {
    const int pos = pos0 + n % T;
    const float* c = &cos_t[usz(pos) * half];
    const float* s = &sin_t[usz(pos) * half];
    for (int h = 0; h < n_heads; ++h) {
      float* x = v + (usz(n) * n_heads + h) * hs;
      for (int i = 0; i < half; ++i) {
        const float x0 = x[i], x1 = x[i + half];
        const float si = inverse ? -s[i] : s[i];
        x[i] = x0 * c[i] - x1 * si;
        x[i + half] = x0 * si + x1 * c[i];
      }
    }
  }
}
//! [rope]

//! [attention-one]
// One query head attending to n_keys keys of its kv head (grouped-query attention:
// several query heads share one kv head). K, V point at key 0 of that kv head; rows
// are `stride` floats apart. p gets the softmax weights, out the weighted sum of V.
void attend(const float* q, const float* K, const float* V, int n_keys, int stride, int hs, float* p, float* out) {
  const double scale = 1.0 / std::sqrt(static_cast<double>(hs));
  double mx = -INFINITY;
  thread_local std::vector<double> sc;  // scores, reused across calls
  sc.resize(usz(n_keys));
  for (int s = 0; s < n_keys; ++s) {
    double d = 0.0;
    for (int i = 0; i < hs; ++i) d += static_cast<double>(q[i]) * K[usz(s) * stride + i];
    sc[s] = d * scale;
    mx = std::max(mx, sc[s]);
  }
  double sum = 0.0;
  for (int s = 0; s < n_keys; ++s) sum += (sc[s] = std::exp(sc[s] - mx));
  for (int i = 0; i < hs; ++i) out[i] = 0.0f;
  for (int s = 0; s < n_keys; ++s) {
    p[s] = static_cast<float>(sc[s] / sum);
    for (int i = 0; i < hs; ++i) out[i] += p[s] * V[usz(s) * stride + i];
  }
}
//! [attention-one]

//! [attention-forward]
// Causal: the query at position t sees the keys at positions 0..t of its own sequence.
void attention_forward(const float* q, const float* k, const float* v, float* att, float* out, int B, int T, int H,
                       int KVH, int hs) {
  const int D = H * hs, KV = KVH * hs, group = H / KVH;
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < H; ++h) {
      const std::size_t kv_off = usz(b) * T * KV + usz(h / group) * hs;
      for (int t = 0; t < T; ++t) {
        const std::size_t row = usz(b) * T + t;
        float* p = &att[((usz(b) * H + h) * T + t) * T];
        attend(&q[row * D + usz(h) * hs], &k[kv_off], &v[kv_off], t + 1, KV, hs, p, &out[row * D + usz(h) * hs]);
        std::fill(p + t + 1, p + T, 0.0f);  // the future: never attended to
      }
    }
}
//! [attention-forward]

//! [attention-backward]
void attention_backward(const float* q, const float* k, const float* v, const float* att, const float* dout,
                        float* dq, float* dk, float* dv, int B, int T, int H, int KVH, int hs) {
  const int D = H * hs, KV = KVH * hs, group = H / KVH;
  std::fill_n(dq, usz(B) * T * D, 0.0f);
  std::fill_n(dk, usz(B) * T * KV, 0.0f);
  std::fill_n(dv, usz(B) * T * KV, 0.0f);
  const double scale = 1.0 / std::sqrt(static_cast<double>(hs));
  std::vector<double> dp(usz(T));
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < H; ++h) {
      const std::size_t kv_off = usz(b) * T * KV + usz(h / group) * hs;
      for (int t = 0; t < T; ++t) {
        const std::size_t row = usz(b) * T + t;
        const float* p = &att[((usz(b) * H + h) * T + t) * T];
        const float* dor = &dout[row * D + usz(h) * hs];
        const float* qr = &q[row * D + usz(h) * hs];
        float* dqr = &dq[row * D + usz(h) * hs];
        // out_t = Σ_s p_s v_s  →  dv_s += p_s·dout_t, dp_s = dout_t·v_s.
        double pdp = 0.0;
        for (int s = 0; s <= t; ++s) {
          const float* vs = &v[kv_off + usz(s) * KV];
          float* dvs = &dv[kv_off + usz(s) * KV];
          double d = 0.0;
          for (int i = 0; i < hs; ++i) {
            d += static_cast<double>(dor[i]) * vs[i];
            dvs[i] += p[s] * dor[i];
          }
          dp[s] = d;
          pdp += p[s] * d;
        }
        // Softmax backward: dscore_s = p_s (dp_s − Σ p·dp); score = q·k·scale.
        for (int s = 0; s <= t; ++s) {
          const float ds = static_cast<float>(p[s] * (dp[s] - pdp) * scale);
          const float* ks = &k[kv_off + usz(s) * KV];
          float* dks = &dk[kv_off + usz(s) * KV];
          for (int i = 0; i < hs; ++i) {
            dqr[i] += ds * ks[i];
            dks[i] += ds * qr[i];
          }
        }
      }
    }
}
//! [attention-backward]

float silu(float z) { return z / (1.0f + std::exp(-z)); }

//! [swiglu]
void swiglu_forward(const float* h1, const float* h3, float* g, std::int64_t n) {
  for (std::int64_t i = 0; i < n; ++i) g[i] = silu(h1[i]) * h3[i];
}

void swiglu_backward(const float* h1, const float* h3, const float* dg, float* dh1, float* dh3, std::int64_t n) {
  for (std::int64_t i = 0; i < n; ++i) {
    const float z = h1[i], sig = 1.0f / (1.0f + std::exp(-z));
    dh3[i] = dg[i] * z * sig;                                 // d/d(up)   = silu(gate)
    dh1[i] = dg[i] * h3[i] * sig * (1.0f + z * (1.0f - sig));  // d/d(gate) = up · silu'(gate)
  }
}
//! [swiglu]

//! [cross-entropy]
double cross_entropy_loss_row(const float* logits, int V, int target) {
  const float mx = *std::max_element(logits, logits + V);
  double sum = 0.0;
  for (int v = 0; v < V; ++v) sum += std::exp(logits[v] - mx);  // float exp, double sum
  return mx + std::log(sum) - logits[target];
}

void cross_entropy_backward_row(float* logits, int V, int target, float weight) {
  // Overwrites one row of logits with d(loss)/d(logits) = weight·(softmax − onehot).
  // float exp (the vocabulary is large; each term has relative error ~1e-7), sums in double.
  const float mx = *std::max_element(logits, logits + V);
  double sum = 0.0;
  for (int v = 0; v < V; ++v) sum += (logits[v] = std::exp(logits[v] - mx));
  const float w = static_cast<float>(weight / sum);
  for (int v = 0; v < V; ++v) logits[v] *= w;
  logits[target] -= weight;
}
//! [cross-entropy]

}  // namespace qlora
