// LoRA forward, backward, initialisation and merge on the CPU (chapter 4, "LoRA").
// Two versions of forward/backward: plain loops accumulating in double (the
// reference every other version is tested against) and the same algebra through
// the BLAS products of matmul.hpp (the CPU execution path). See lora.hpp.
#include "lora.hpp"

#include "counter_hash.hpp"

#include "matmul.hpp"

#include <cmath>
#include <stdexcept>
#include <string>

namespace qlora {

float LoraConfig::scale() const {
  if (r <= 0) throw std::invalid_argument("LoRA rank r must be positive, got " + std::to_string(r));
  //! [lora-scale]
  // rsLoRA (Kalajdzievski, 2023) divides by √r so the update's size does not shrink as r grows.
  return use_rslora ? alpha / std::sqrt(static_cast<float>(r)) : alpha / static_cast<float>(r);
  //! [lora-scale]
}

LoraAdapter::LoraAdapter(int in_features, int out_features, int rank) : in(in_features), out(out_features), r(rank) {
  if (in <= 0 || out <= 0 || r <= 0)
    throw std::invalid_argument("LoraAdapter: in, out and r must be positive (got in=" + std::to_string(in) +
                                ", out=" + std::to_string(out) + ", r=" + std::to_string(r) + ")");
  A.assign(static_cast<std::size_t>(r) * in, 0.0f);
  B.assign(static_cast<std::size_t>(out) * r, 0.0f);
  dA.assign(A.size(), 0.0f);
  dB.assign(B.size(), 0.0f);
}

double uniform01(std::mt19937_64& rng) { return static_cast<double>(rng() >> 11) * 0x1.0p-53; }

//! [lora-init]
void LoraAdapter::init_peft(std::mt19937_64& rng) {
  // PEFT calls nn.init.kaiming_uniform_(A, a=√5): gain √(2/(1+a²)) = √(1/3), bound
  // gain·√(3/fan_in) = 1/√in. B starts at zero, so B·A = 0 and the model is unchanged.
  const double bound = 1.0 / std::sqrt(static_cast<double>(in));
  for (float& a : A) a = static_cast<float>((2.0 * uniform01(rng) - 1.0) * bound);
  for (float& b : B) b = 0.0f;
  zero_grad();
}
//! [lora-init]

void LoraAdapter::zero_grad() {
  dA.assign(A.size(), 0.0f);
  dB.assign(B.size(), 0.0f);
}

//! [lora-dropout]
// Counter-based randomness: element i's uniform number is a hash of (seed, i), not the
// i-th draw of a sequential generator. Any element can be computed on its own — on the
// CPU in a loop, or in one GPU thread each — so the GPU makes the very same mask in
// place without a host-side draw or an upload. splitmix64 (Steele et al., 2014) is the
// hash: its finalizer mixes every input bit into every output bit.
std::vector<float> lora_dropout_mask_hashed(std::int64_t n, float p, std::uint64_t seed) {
  if (!(p >= 0.0f && p < 1.0f)) throw std::invalid_argument("LoRA dropout must be in [0, 1), got " + std::to_string(p));
  if (n < 0) throw std::invalid_argument("LoRA dropout mask: negative size " + std::to_string(n));
  // Inverted dropout: kept values are scaled by 1/(1-p) so E[mask·x] = x and
  // nothing needs rescaling at inference time.
  const float keep_scale = 1.0f / (1.0f - p);
  std::vector<float> mask(static_cast<std::size_t>(n));
  for (std::int64_t i = 0; i < n; ++i) {
    const std::uint64_t z = counter_hash(seed, static_cast<std::uint64_t>(i));
    // 24 random bits: u is exact in float, so the CPU and GPU comparisons agree.
    const float u = static_cast<float>(z >> 40) * 0x1.0p-24f;
    mask[static_cast<std::size_t>(i)] = u >= p ? keep_scale : 0.0f;
  }
  return mask;
}

std::vector<float> lora_dropout_mask(std::int64_t n, float p, std::mt19937_64& rng) {
  return lora_dropout_mask_hashed(n, p, rng());
}
//! [lora-dropout]

namespace {

void check_adapter(const LoraAdapter& ad, const LoraConfig& cfg, int T) {
  if (ad.r != cfg.r)
    throw std::invalid_argument("LoRA adapter rank " + std::to_string(ad.r) + " differs from config r " +
                                std::to_string(cfg.r));
  if (ad.A.size() != static_cast<std::size_t>(ad.r) * ad.in || ad.B.size() != static_cast<std::size_t>(ad.out) * ad.r)
    throw std::invalid_argument("LoRA adapter: A must hold r×in and B out×r values");
  if (T < 0) throw std::invalid_argument("LoRA: negative number of rows T=" + std::to_string(T));
}

void check_grads(const LoraAdapter& ad, const LoraCache& cache, int T) {
  if (ad.dA.size() != ad.A.size() || ad.dB.size() != ad.B.size())
    throw std::invalid_argument("LoRA backward: gradients dA/dB not allocated (call zero_grad)");
  if (cache.xa.size() != static_cast<std::size_t>(T) * ad.r)
    throw std::invalid_argument("LoRA backward: cache does not come from a forward pass over " + std::to_string(T) +
                                " rows");
  if (!cache.mask.empty() && cache.mask.size() != static_cast<std::size_t>(T) * ad.in)
    throw std::invalid_argument("LoRA backward: dropout mask has the wrong size");
}

// Draws the mask (training with p > 0) or clears it: the only use of rng in forward. The
// mask starts `skip` elements into the stream of the drawn seed.
void make_mask(const LoraConfig& cfg, std::int64_t n, bool training, std::mt19937_64& rng, LoraCache& cache,
               std::int64_t skip) {
  if (training && cfg.dropout > 0.0f)
    cache.mask = lora_dropout_mask_hashed(n, cfg.dropout, counter_skip(rng(), static_cast<std::uint64_t>(skip)));
  else
    cache.mask.clear();
}

// The LoRA input: x, or x⊙mask with dropout.
inline double dropped(const float* x, const LoraCache& cache, std::size_t k) {
  return cache.mask.empty() ? static_cast<double>(x[k]) : static_cast<double>(x[k]) * cache.mask[k];
}

}  // namespace

//! [lora-forward-ref]
void lora_forward_ref(const LoraAdapter& ad, const LoraConfig& cfg, const float* x, float* y, int T, bool training,
                      std::mt19937_64& rng, LoraCache& cache, std::int64_t first_row) {
  check_adapter(ad, cfg, T);
  const int in = ad.in, out = ad.out, r = ad.r;
  const double s = cfg.scale();
  make_mask(cfg, static_cast<std::int64_t>(T) * in, training, rng, cache, first_row * in);
  cache.xa.assign(static_cast<std::size_t>(T) * r, 0.0f);
  std::vector<double> xa(static_cast<std::size_t>(r));
  for (int t = 0; t < T; ++t) {
    // xa = dropout(x)·Aᵀ: the input squeezed down to r numbers.
    for (int k = 0; k < r; ++k) {
      double acc = 0.0;
      for (int i = 0; i < in; ++i) acc += dropped(x, cache, (std::size_t)t * in + i) * ad.A[(std::size_t)k * in + i];
      xa[k] = acc;
      cache.xa[(std::size_t)t * r + k] = static_cast<float>(acc);
    }
    // y += s·xa·Bᵀ: expanded back to out numbers and added to the base output.
    for (int o = 0; o < out; ++o) {
      double acc = 0.0;
      for (int k = 0; k < r; ++k) acc += xa[k] * ad.B[(std::size_t)o * r + k];
      y[(std::size_t)t * out + o] = static_cast<float>(y[(std::size_t)t * out + o] + s * acc);
    }
  }
}
//! [lora-forward-ref]

//! [lora-backward-ref]
void lora_backward_ref(LoraAdapter& ad, const LoraConfig& cfg, const float* x, const float* dy, float* dx, int T,
                       const LoraCache& cache) {
  check_adapter(ad, cfg, T);
  check_grads(ad, cache, T);
  const int in = ad.in, out = ad.out, r = ad.r;
  const double s = cfg.scale();
  // dxa = s·dy·B (T×r): the gradient arriving at the rank-r bottleneck.
  std::vector<double> dxa(static_cast<std::size_t>(T) * r, 0.0);
  for (int t = 0; t < T; ++t)
    for (int k = 0; k < r; ++k) {
      double acc = 0.0;
      for (int o = 0; o < out; ++o) acc += (double)dy[(std::size_t)t * out + o] * ad.B[(std::size_t)o * r + k];
      dxa[(std::size_t)t * r + k] = s * acc;
    }
  // dB += s·dyᵀ·xa (out×r).
  for (int o = 0; o < out; ++o)
    for (int k = 0; k < r; ++k) {
      double acc = 0.0;
      for (int t = 0; t < T; ++t) acc += (double)dy[(std::size_t)t * out + o] * cache.xa[(std::size_t)t * r + k];
      ad.dB[(std::size_t)o * r + k] = static_cast<float>(ad.dB[(std::size_t)o * r + k] + s * acc);
    }
  // dA += dxaᵀ·dropout(x) (r×in).
  for (int k = 0; k < r; ++k)
    for (int i = 0; i < in; ++i) {
      double acc = 0.0;
      for (int t = 0; t < T; ++t) acc += dxa[(std::size_t)t * r + k] * dropped(x, cache, (std::size_t)t * in + i);
      ad.dA[(std::size_t)k * in + i] = static_cast<float>(ad.dA[(std::size_t)k * in + i] + acc);
    }
  // dx += (dxa·A)⊙mask (T×in): dropout's backward is the same mask.
  for (int t = 0; t < T; ++t)
    for (int i = 0; i < in; ++i) {
      double acc = 0.0;
      for (int k = 0; k < r; ++k) acc += dxa[(std::size_t)t * r + k] * ad.A[(std::size_t)k * in + i];
      const std::size_t ti = (std::size_t)t * in + i;
      if (!cache.mask.empty()) acc *= cache.mask[ti];
      dx[ti] = static_cast<float>(dx[ti] + acc);
    }
}
//! [lora-backward-ref]

namespace {

// x⊙mask into a fresh buffer (BLAS path); the caller uses x itself when there is no mask.
std::vector<float> apply_mask(const float* x, const std::vector<float>& mask) {
  std::vector<float> xd(mask.size());
  for (std::size_t k = 0; k < mask.size(); ++k) xd[k] = x[k] * mask[k];
  return xd;
}

std::vector<float> scaled(const std::vector<float>& v, float s) {
  std::vector<float> out(v.size());
  for (std::size_t k = 0; k < v.size(); ++k) out[k] = s * v[k];
  return out;
}

}  // namespace

//! [lora-forward-blas]
void lora_forward(const LoraAdapter& ad, const LoraConfig& cfg, const float* x, float* y, int T, bool training,
                  std::mt19937_64& rng, LoraCache& cache, std::int64_t first_row) {
  check_adapter(ad, cfg, T);
  make_mask(cfg, static_cast<std::int64_t>(T) * ad.in, training, rng, cache, first_row * ad.in);
  std::vector<float> xd;
  if (!cache.mask.empty()) xd = apply_mask(x, cache.mask);
  const float* xin = cache.mask.empty() ? x : xd.data();
  cache.xa.resize(static_cast<std::size_t>(T) * ad.r);
  // Two thin GEMMs, T×in·in×r then T×r·r×out: 2·T·r·(in+out) flops instead of
  // T·in·out for a dense update — the point of the low rank.
  matmul_xwt(xin, ad.A.data(), cache.xa.data(), T, ad.in, ad.r, false);
  const std::vector<float> sxa = scaled(cache.xa, cfg.scale());
  matmul_xwt(sxa.data(), ad.B.data(), y, T, ad.r, ad.out, true);
}
//! [lora-forward-blas]

//! [lora-backward-blas]
void lora_backward(LoraAdapter& ad, const LoraConfig& cfg, const float* x, const float* dy, float* dx, int T,
                   const LoraCache& cache) {
  check_adapter(ad, cfg, T);
  check_grads(ad, cache, T);
  const float s = cfg.scale();
  std::vector<float> dxa(static_cast<std::size_t>(T) * ad.r);
  matmul_dyw(dy, ad.B.data(), dxa.data(), T, ad.r, ad.out, false);
  for (float& v : dxa) v *= s;
  const std::vector<float> sxa = scaled(cache.xa, s);
  matmul_dytx(dy, sxa.data(), ad.dB.data(), T, ad.r, ad.out, true);
  if (cache.mask.empty()) {
    matmul_dytx(dxa.data(), x, ad.dA.data(), T, ad.in, ad.r, true);
    matmul_dyw(dxa.data(), ad.A.data(), dx, T, ad.in, ad.r, true);
  } else {
    const std::vector<float> xd = apply_mask(x, cache.mask);
    matmul_dytx(dxa.data(), xd.data(), ad.dA.data(), T, ad.in, ad.r, true);
    std::vector<float> dxd(static_cast<std::size_t>(T) * ad.in);
    matmul_dyw(dxa.data(), ad.A.data(), dxd.data(), T, ad.in, ad.r, false);
    for (std::size_t k = 0; k < dxd.size(); ++k) dx[k] += dxd[k] * cache.mask[k];
  }
}
//! [lora-backward-blas]

namespace {

// W += sign·s·B·A, accumulating each entry in double.
void add_delta(const LoraAdapter& ad, const LoraConfig& cfg, float* W, double sign) {
  check_adapter(ad, cfg, 0);
  const double s = sign * cfg.scale();
  for (int o = 0; o < ad.out; ++o)
    for (int i = 0; i < ad.in; ++i) {
      double acc = 0.0;
      for (int k = 0; k < ad.r; ++k) acc += (double)ad.B[(std::size_t)o * ad.r + k] * ad.A[(std::size_t)k * ad.in + i];
      float& w = W[(std::size_t)o * ad.in + i];
      w = static_cast<float>(w + s * acc);
    }
}

}  // namespace

//! [lora-merge]
void lora_merge(const LoraAdapter& ad, const LoraConfig& cfg, float* W) { add_delta(ad, cfg, W, +1.0); }
void lora_unmerge(const LoraAdapter& ad, const LoraConfig& cfg, float* W) { add_delta(ad, cfg, W, -1.0); }
//! [lora-merge]

}  // namespace qlora
