// Chapter 7 GPU tests: every kernel of kernels/llama_ops.cu against its CPU
// reference in src/llama_ops.cpp (or src/bf16.cpp), on fresh random inputs
// (a new seed every run, never zeros), awkward shapes (row counts that are not
// multiples of 32, grouped-query heads, a kjv15M-sized layer), with every
// output poisoned to NaN (0xFF bytes) before the launch, so an element the
// kernel forgets to write fails the comparison.
//
// Tolerances. The kernels sum in float32 where the references sum in double,
// so the difference is the float32 rounding of the GPU's sums (u = 2⁻²⁴ ≈ 6e-8
// per operation): a sum of K terms is off by at most ≈ K·u·Σ|terms| (random
// signs make it ≈ √K·u in practice). Each check bounds max|gpu − cpu| by
// tol·max|cpu|; the tol of each kernel is argued at its check.
#include "attention_gemm.cuh"
#include "device_buffer.cuh"
#include "linear4.cuh"
#include "llama_ops.cuh"
#include "llama_ops.hpp"
#include "lora.hpp"

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <span>
#include <vector>

using namespace qlora;
namespace gpu = qlora::cuda;
using gpu::DeviceBuffer;

namespace {

std::mt19937_64 fresh_rng() { return std::mt19937_64(std::random_device{}() * 0x100000001ull + std::random_device{}()); }

std::vector<float> random_vec(std::size_t n, std::mt19937_64& rng, double lo = -1.0, double hi = 1.0) {
  std::vector<float> v(n);
  for (float& x : v) x = static_cast<float>(lo + (hi - lo) * uniform01(rng));
  return v;
}

template <class T>
DeviceBuffer<T> dev(const std::vector<T>& v) {
  return gpu::to_device(std::span<const T>(v));
}

// A device output of n values, poisoned: 0xFFFFFFFF is a float NaN, 0xFFFF a BF16 NaN.
template <class T = float>
DeviceBuffer<T> poisoned(std::size_t n) {
  DeviceBuffer<T> d(n);
  d.poison();
  return d;
}

template <class T>
std::vector<T> host(const DeviceBuffer<T>& d) {
  CUDA_CHECK(cudaDeviceSynchronize());
  return d.download();
}

// Every element finite and max|gpu − ref| ≤ tol·max|ref|; the relative Frobenius
// error is printed for the record.
void check_close(const std::vector<float>& got, const std::vector<float>& ref, double tol, const char* what) {
  REQUIRE(got.size() == ref.size());
  double scale = 0.0, worst = 0.0, num = 0.0, den = 0.0;
  std::size_t not_finite = 0;
  for (std::size_t i = 0; i < ref.size(); ++i) {
    scale = std::max(scale, (double)std::fabs(ref[i]));
    not_finite += !std::isfinite(got[i]);
    const double d = (double)got[i] - ref[i];
    worst = std::max(worst, std::fabs(d));
    num += d * d;
    den += (double)ref[i] * ref[i];
  }
  INFO(what << ": max |gpu - cpu| = " << worst << ", max |cpu| = " << scale
            << ", relative Frobenius = " << std::sqrt(num / std::max(den, 1e-300)));
  CHECK(not_finite == 0);
  CHECK(scale > 0.0);  // a reference of zeros would prove nothing
  CHECK(worst <= tol * scale);
}

// Bit for bit (float or BF16 values): a NaN equals only the same NaN.
template <class T>
void check_equal(const std::vector<T>& got, const std::vector<T>& ref, const char* what) {
  REQUIRE(got.size() == ref.size());
  std::size_t differ = 0;
  for (std::size_t i = 0; i < ref.size(); ++i) differ += std::memcmp(&got[i], &ref[i], sizeof(T)) != 0;
  INFO(what << ": " << differ << " of " << ref.size() << " values differ");
  CHECK(differ == 0);
}

}  // namespace

TEST_CASE("GPU embedding copies the table rows of the tokens", "[ch07][gpu]") {
  auto rng = fresh_rng();
  const int V = 515, D = 72, N = 77;  // N not a multiple of 32
  const std::vector<bf16> table = to_bf16(random_vec(static_cast<std::size_t>(V) * D, rng));
  std::vector<int> tokens(N);
  for (int& t : tokens) t = static_cast<int>(rng() % V);
  std::vector<float> ref(static_cast<std::size_t>(N) * D);
  for (int n = 0; n < N; ++n)
    for (int d = 0; d < D; ++d)
      ref[static_cast<std::size_t>(n) * D + d] = bf16_to_f32(table[static_cast<std::size_t>(tokens[n]) * D + d]);
  auto d_table = dev(table);
  auto d_tok = dev(tokens);
  auto x = poisoned(ref.size());
  gpu::embedding_forward(d_table.data(), d_tok.data(), x.data(), N, D, nullptr);
  check_equal(host(x), ref, "embedding");  // a copy: exact
}

TEST_CASE("GPU RMSNorm forward and backward match the CPU reference", "[ch07][gpu]") {
  auto rng = fresh_rng();
  struct Shape { int N, D; };
  const auto sh = GENERATE(Shape{37, 64}, Shape{1000, 288}, Shape{5, 1030});
  CAPTURE(sh.N, sh.D);
  const std::size_t n = static_cast<std::size_t>(sh.N) * sh.D;
  const auto x = random_vec(n, rng, -2.0, 2.0);
  const auto w = random_vec(static_cast<std::size_t>(sh.D), rng, 0.5, 1.5);
  const auto dy = random_vec(n, rng);
  const auto dx0 = random_vec(n, rng);  // backward ADDS into dx: start from nonzero values
  const float eps = 1e-5f;
  std::vector<float> y_ref(n), inv_ref(static_cast<std::size_t>(sh.N)), dx_ref = dx0;
  rmsnorm_forward(x.data(), w.data(), y_ref.data(), inv_ref.data(), sh.N, sh.D, eps);
  rmsnorm_backward(x.data(), w.data(), inv_ref.data(), dy.data(), dx_ref.data(), sh.N, sh.D);

  auto d_x = dev(x), d_w = dev(w), d_dy = dev(dy), d_dx = dev(dx0), d_inv_in = dev(inv_ref);
  auto d_y = poisoned(n), d_inv = poisoned(static_cast<std::size_t>(sh.N));
  gpu::rmsnorm_forward(d_x.data(), d_w.data(), d_y.data(), d_inv.data(), sh.N, sh.D, eps, nullptr);
  // The sum of D ≤ 1030 squares (positive terms) is off by ≤ D·u ≈ 6e-5 relative in the
  // worst case, ≈ √D·u ≈ 2e-6 with per-thread partial sums and a tree; 1/√ halves it,
  // and y = x·r·w adds two roundings. Bound: 2e-5.
  check_close(host(d_inv), inv_ref, 2e-5, "inv_rms");
  check_close(host(d_y), y_ref, 2e-5, "y");
  // Backward from the reference's inv_rms, so only the backward's own rounding counts:
  // one D-term dot product (same bound) and r³ (three roundings).
  gpu::rmsnorm_backward(d_x.data(), d_w.data(), d_inv_in.data(), d_dy.data(), d_dx.data(), sh.N, sh.D, nullptr);
  check_close(host(d_dx), dx_ref, 2e-5, "dx");
}

// Decoding's fused norms (kernels/generate_gpu.cu) against the launches they replace, on the
// GPU: the same float operations in the same order, so the same bits. Shapes: a 7B decode row
// (one row of 4096), a batch of 32 kjv15M rows, and widths that are not multiples of the block.
TEST_CASE("GPU rmsnorm_rounded and add_rmsnorm_rounded equal add_inplace, rmsnorm_forward and to_bf16, bit for bit",
          "[ch07][gpu]") {
  auto rng = fresh_rng();
  struct Shape { int N, D; };
  const auto sh = GENERATE(Shape{1, 4096}, Shape{32, 288}, Shape{37, 64}, Shape{5, 1030});
  CAPTURE(sh.N, sh.D);
  const std::size_t n = static_cast<std::size_t>(sh.N) * sh.D;
  const auto x = random_vec(n, rng, -2.0, 2.0);
  const auto t = random_vec(n, rng);
  const auto w = random_vec(static_cast<std::size_t>(sh.D), rng, 0.5, 1.5);
  const float eps = 1e-5f;
  auto d_x = dev(x), d_t = dev(t), d_w = dev(w);

  // The unfused launches, as the decoder ran them: norm, rounding.
  auto y_ref = poisoned(n), inv = poisoned(static_cast<std::size_t>(sh.N));
  auto yb_ref = poisoned<bf16>(n);
  gpu::rmsnorm_forward(d_x.data(), d_w.data(), y_ref.data(), inv.data(), sh.N, sh.D, eps, nullptr);
  gpu::to_bf16(y_ref.data(), yb_ref.data(), static_cast<std::int64_t>(n), nullptr);
  auto y = poisoned(n);
  auto yb = poisoned<bf16>(n);
  gpu::rmsnorm_rounded(d_x.data(), d_w.data(), y.data(), yb.data(), sh.N, sh.D, eps, nullptr);
  check_equal(host(y), host(y_ref), "rmsnorm_rounded y");
  check_equal(host(yb), host(yb_ref), "rmsnorm_rounded yb");
  check_equal(host(d_x), x, "rmsnorm_rounded leaves x");
  // And it is the norm, not an agreement of two wrong kernels: the RMSNorm test's bound.
  std::vector<float> y_cpu(n), inv_cpu(static_cast<std::size_t>(sh.N));
  rmsnorm_forward(x.data(), w.data(), y_cpu.data(), inv_cpu.data(), sh.N, sh.D, eps);
  // (At D = 4096 the 1024 threads add ≤ 4 squares each, then a 10-level tree: ≤ 14·u on the sum.)
  check_close(host(y), y_cpu, 2e-5, "rmsnorm_rounded y against the CPU");

  // With the residual add first: add_inplace, then the same two.
  auto x_ref = dev(x);
  y_ref.poison();
  yb_ref.poison();
  gpu::add_inplace(x_ref.data(), d_t.data(), static_cast<std::int64_t>(n), nullptr);
  gpu::rmsnorm_forward(x_ref.data(), d_w.data(), y_ref.data(), inv.data(), sh.N, sh.D, eps, nullptr);
  gpu::to_bf16(y_ref.data(), yb_ref.data(), static_cast<std::int64_t>(n), nullptr);
  y.poison();
  yb.poison();
  gpu::add_rmsnorm_rounded(d_x.data(), d_t.data(), d_w.data(), y.data(), yb.data(), sh.N, sh.D, eps, nullptr);
  std::vector<float> sum(n);
  for (std::size_t i = 0; i < n; ++i) sum[i] = x[i] + t[i];
  check_equal(host(d_x), sum, "add_rmsnorm_rounded x + t");  // one float addition: the CPU's too
  check_equal(host(d_x), host(x_ref), "add_rmsnorm_rounded x + t against add_inplace");
  check_equal(host(y), host(y_ref), "add_rmsnorm_rounded y");
  check_equal(host(yb), host(yb_ref), "add_rmsnorm_rounded yb");
  rmsnorm_forward(sum.data(), w.data(), y_cpu.data(), inv_cpu.data(), sh.N, sh.D, eps);
  check_close(host(y), y_cpu, 2e-5, "add_rmsnorm_rounded y against the CPU");
}

TEST_CASE("GPU RoPE matches the CPU reference, forward and inverse", "[ch07][gpu]") {
  auto rng = fresh_rng();
  struct Shape { int B, T, heads, hs; };
  const auto sh = GENERATE(Shape{3, 37, 6, 48}, Shape{2, 256, 6, 48}, Shape{5, 19, 4, 8});
  CAPTURE(sh.B, sh.T, sh.heads, sh.hs);
  LlamaConfig c;
  c.n_heads = c.n_kv_heads = sh.heads;
  c.dim = sh.heads * sh.hs;
  c.seq_len = 256;
  std::vector<float> cos_t, sin_t;
  rope_tables(c, cos_t, sin_t);
  auto d_cos = dev(cos_t), d_sin = dev(sin_t);
  const int N = sh.B * sh.T;
  const auto v0 = random_vec(static_cast<std::size_t>(N) * sh.heads * sh.hs, rng);
  for (bool inverse : {false, true}) {
    std::vector<float> ref = v0;
    rope(ref.data(), N, sh.T, 0, sh.heads, sh.hs, cos_t, sin_t, inverse);
    auto d_v = dev(v0);
    gpu::rope(d_v.data(), N, sh.T, sh.heads, sh.hs, d_cos.data(), d_sin.data(), inverse, nullptr);
    // Two products and a sum per value: a few ulp (an FMA may fuse one rounding away).
    check_close(host(d_v), ref, 1e-6, inverse ? "rope inverse" : "rope");
  }
}

// Both GPU versions: 1, a warp per query row; 2, the products through cuBLAS, in float32
// and in TF32 (the model's default).
TEST_CASE("GPU attention forward and backward match the CPU reference", "[ch07][gpu]") {
  auto rng = fresh_rng();
  const int version = GENERATE(1, 2, 3);  // 3: version 2 with FloatMath::tf32
  const gpu::FloatMath math = version == 3 ? gpu::FloatMath::tf32 : gpu::FloatMath::fp32;
  // TF32 rounds the inputs of every product to a 10-bit mantissa: each term is off by ≤ 2⁻¹⁰
  // relative, independently, so a dot product of random-sign terms is off by ≈ 1e-3 of its
  // typical size. Forward chains two products (scores, then P·V), backward three; the float32
  // bounds below become 4e-3 and 1e-2 of the largest value.
  const double fwd_tol = version == 3 ? 4e-3 : 5e-5, bwd_tol = version == 3 ? 1e-2 : 1e-4;
  gpu::CublasHandle cublas;
  auto forward = [&](const float* q, const float* k, const float* v, float* att, float* out, int B, int T, int H,
                     int KVH, int hs) {
    if (version == 1)
      gpu::attention_forward(q, k, v, att, out, B, T, H, KVH, hs, nullptr);
    else
      gpu::attention_forward_v2(cublas.get(), q, k, v, att, out, B, T, H, KVH, hs, nullptr, math);
  };
  auto backward = [&](const float* q, const float* k, const float* v, const float* att, const float* dout, float* ds,
                      float* dq, float* dk, float* dv, int B, int T, int H, int KVH, int hs) {
    if (version == 1)
      gpu::attention_backward(q, k, v, att, dout, ds, dq, dk, dv, B, T, H, KVH, hs, nullptr);
    else
      gpu::attention_backward_v2(cublas.get(), q, k, v, att, dout, ds, dq, dk, dv, B, T, H, KVH, hs, nullptr, math);
  };
  struct Shape { int B, T, H, KVH, hs; };
  // stories260K-like GQA (8 query heads on 4 kv heads, hs 8), an odd T with 2:1 and
  // 3:1 groups, and a kjv15M layer (6 heads of 48) at T = 256.
  const auto sh = GENERATE(Shape{3, 37, 8, 4, 8}, Shape{2, 45, 6, 2, 16}, Shape{2, 256, 6, 6, 48},
                           Shape{1, 1, 2, 1, 4});
  CAPTURE(version, sh.B, sh.T, sh.H, sh.KVH, sh.hs);
  const int N = sh.B * sh.T, D = sh.H * sh.hs, KV = sh.KVH * sh.hs;
  const std::size_t natt = static_cast<std::size_t>(sh.B) * sh.H * sh.T * sh.T;
  const auto q = random_vec(static_cast<std::size_t>(N) * D, rng, -2.0, 2.0);
  const auto k = random_vec(static_cast<std::size_t>(N) * KV, rng, -2.0, 2.0);
  const auto v = random_vec(static_cast<std::size_t>(N) * KV, rng);
  const auto dout = random_vec(static_cast<std::size_t>(N) * D, rng);
  std::vector<float> att_ref(natt), out_ref(static_cast<std::size_t>(N) * D);
  attention_forward(q.data(), k.data(), v.data(), att_ref.data(), out_ref.data(), sh.B, sh.T, sh.H, sh.KVH, sh.hs);
  std::vector<float> dq_ref(q.size()), dk_ref(k.size()), dv_ref(v.size());
  attention_backward(q.data(), k.data(), v.data(), att_ref.data(), dout.data(), dq_ref.data(), dk_ref.data(),
                     dv_ref.data(), sh.B, sh.T, sh.H, sh.KVH, sh.hs);

  auto d_q = dev(q), d_k = dev(k), d_v = dev(v), d_dout = dev(dout), d_att_ref = dev(att_ref);
  auto d_att = poisoned(natt), d_out = poisoned(out_ref.size());
  forward(d_q.data(), d_k.data(), d_v.data(), d_att.data(), d_out.data(), sh.B, sh.T, sh.H, sh.KVH, sh.hs);
  // Scores: hs-term dot products, |q·k| ≤ 4·hs, error ≤ hs·u·4·hs·scale ≈ 5e-5 for hs 48 in the
  // worst case, ≈ 1e-6 typically; softmax turns an absolute score error e into a relative
  // weight error e. out sums ≤ T weights ≤ 1 times |v| ≤ 1: ≤ T·u ≈ 1.5e-5 at T 256, far less
  // with random signs. Bound: 5e-5 of the largest value.
  const auto att = host(d_att);
  check_close(att, att_ref, fwd_tol, "att");
  check_close(host(d_out), out_ref, fwd_tol, "out");
  std::size_t future_nonzero = 0;  // the causal mask: exact zeros above the diagonal
  for (std::size_t r = 0; r < natt / sh.T; ++r)
    for (int s = static_cast<int>(r % sh.T) + 1; s < sh.T; ++s) future_nonzero += att[r * sh.T + s] != 0.0f;
  CHECK(future_nonzero == 0);

  // Backward from the reference's att, so the comparison sees only the backward's rounding.
  auto d_ds = poisoned(natt), d_dq = poisoned(q.size()), d_dk = poisoned(k.size()), d_dv = poisoned(v.size());
  backward(d_q.data(), d_k.data(), d_v.data(), d_att_ref.data(), d_dout.data(), d_ds.data(), d_dq.data(), d_dk.data(),
           d_dv.data(), sh.B, sh.T, sh.H, sh.KVH, sh.hs);
  // dv_s and dk_s sum group·(T − s) ≤ 3·256 float terms, dq_t sums t + 1 terms, each term
  // from an hs-term dot product. Worst case ≈ K·u·Σ|terms| with Σ|terms| up to ~6× the
  // largest gradient (Σ_t p_ts ≈ ln T for the first key): ≈ 256·6e-8·6 ≈ 1e-4 of it;
  // typical ≈ √K·u ≈ 1e-6. Bound: 1e-4.
  const auto dq = host(d_dq), dk = host(d_dk), dv = host(d_dv);
  if (sh.T == 1) {
    // One key: the softmax weight is 1 whatever the score, so dq and dk are exactly zero.
    check_equal(dq, dq_ref, "dq (T = 1)");
    check_equal(dk, dk_ref, "dk (T = 1)");
  } else {
    check_close(dq, dq_ref, bwd_tol, "dq");
    check_close(dk, dk_ref, bwd_tol, "dk");
  }
  check_close(dv, dv_ref, bwd_tol, "dv");
  // Deterministic: no atomics, so a second run gives the same bits.
  d_dq.poison();
  d_dk.poison();
  d_dv.poison();
  backward(d_q.data(), d_k.data(), d_v.data(), d_att_ref.data(), d_dout.data(), d_ds.data(), d_dq.data(), d_dk.data(),
           d_dv.data(), sh.B, sh.T, sh.H, sh.KVH, sh.hs);
  check_equal(host(d_dq), dq, "dq, second run");
  check_equal(host(d_dk), dk, "dk, second run");
  check_equal(host(d_dv), dv, "dv, second run");
}

// Decoding's pieces (kernels/generate_gpu.cu): rows of different sequences at different
// positions, against what LlamaModel::decode_step does per token on the CPU: rope at
// position pos, k and v written into the cache row pos, attend over keys 0..pos.
// The decoding tests' rows: 4 rows of different sequences at different positions in a cache of
// 3 slots × 40 positions; two rows share slot 1, so the later position reads the key the earlier
// row writes. With the RoPE tables of that shape.
struct DecodeRows {
  struct Shape {
    int H, KVH, hs;
  };
  Shape sh;
  int slots = 3, max_seq = 40, D, KV;
  std::vector<int> slot{0, 1, 2, 1}, pos{0, 17, 39, 5};
  int N = 4;
  std::size_t cache_n;
  std::vector<float> cos_t, sin_t;
  explicit DecodeRows(Shape s)
      : sh(s), D(s.H * s.hs), KV(s.KVH * s.hs), cache_n(static_cast<std::size_t>(slots) * max_seq * KV) {
    LlamaConfig c;
    c.n_heads = s.H;
    c.n_kv_heads = s.KVH;
    c.dim = D;
    c.seq_len = max_seq;
    rope_tables(c, cos_t, sin_t);
  }
};

TEST_CASE("GPU decoding ops: rope_at, kv_cache_write and attention_cached match decode_step's pieces", "[ch07][gpu]") {
  auto rng = fresh_rng();
  using Shape = DecodeRows::Shape;
  const DecodeRows r(GENERATE(Shape{6, 2, 16}, Shape{6, 6, 48}, Shape{8, 4, 8}));
  const auto& [sh, slots, max_seq, D, KV, slot, pos, N, cache_n, cos_t, sin_t] = r;
  CAPTURE(sh.H, sh.KVH, sh.hs);
  const auto q0 = random_vec(static_cast<std::size_t>(N) * D, rng, -2.0, 2.0);
  const auto k0 = random_vec(static_cast<std::size_t>(N) * KV, rng, -2.0, 2.0);
  const auto v = random_vec(static_cast<std::size_t>(N) * KV, rng);
  std::vector<float> kc = random_vec(cache_n, rng, -2.0, 2.0), vc = random_vec(cache_n, rng);

  // CPU: decode_step's steps, every row's write before any row's attention.
  std::vector<float> q = q0, k = k0, kc_ref = kc, vc_ref = vc, out_ref(static_cast<std::size_t>(N) * D);
  for (int n = 0; n < N; ++n) {
    const auto un = static_cast<std::size_t>(n);
    rope(&q[un * D], 1, 1, pos[un], sh.H, sh.hs, cos_t, sin_t, false);
    rope(&k[un * KV], 1, 1, pos[un], sh.KVH, sh.hs, cos_t, sin_t, false);
    const std::size_t row = (static_cast<std::size_t>(slot[un]) * max_seq + pos[un]) * KV;
    std::copy_n(&k[un * KV], KV, &kc_ref[row]);
    std::copy_n(&v[un * KV], KV, &vc_ref[row]);
  }
  std::vector<float> p(max_seq);
  for (int n = 0; n < N; ++n) {
    const auto un = static_cast<std::size_t>(n);
    const std::size_t base = static_cast<std::size_t>(slot[un]) * max_seq * KV;
    for (int h = 0; h < sh.H; ++h) {
      const std::size_t g = static_cast<std::size_t>(h / (sh.H / sh.KVH)) * sh.hs;
      attend(&q[un * D + static_cast<std::size_t>(h) * sh.hs], &kc_ref[base + g], &vc_ref[base + g], pos[un] + 1, KV,
             sh.hs, p.data(), &out_ref[un * D + static_cast<std::size_t>(h) * sh.hs]);
    }
  }

  auto d_cos = dev(cos_t), d_sin = dev(sin_t), d_q = dev(q0), d_k = dev(k0), d_v = dev(v), d_kc = dev(kc),
       d_vc = dev(vc);
  auto d_pos = dev(pos), d_slot = dev(slot);
  auto d_scores = poisoned(static_cast<std::size_t>(N) * sh.H * max_seq), d_out = poisoned(out_ref.size());
  gpu::rope_at(d_q.data(), N, d_pos.data(), sh.H, sh.hs, d_cos.data(), d_sin.data(), nullptr);
  gpu::rope_at(d_k.data(), N, d_pos.data(), sh.KVH, sh.hs, d_cos.data(), d_sin.data(), nullptr);
  check_close(host(d_q), q, 1e-6, "rope_at q");  // rope's arithmetic: a few ulp
  check_close(host(d_k), k, 1e-6, "rope_at k");
  gpu::kv_cache_write(d_k.data(), d_kc.data(), d_pos.data(), d_slot.data(), N, KV, max_seq, nullptr);
  gpu::kv_cache_write(d_v.data(), d_vc.data(), d_pos.data(), d_slot.data(), N, KV, max_seq, nullptr);
  gpu::attention_cached(d_q.data(), d_kc.data(), d_vc.data(), d_scores.data(), d_out.data(), d_pos.data(),
                        d_slot.data(), N, sh.H, sh.KVH, sh.hs, max_seq, nullptr);
  // The cache: the rows written exactly, every other row untouched (the rope'd k from the GPU
  // may differ from the CPU's by an ulp, hence the bound, not equality, for kc).
  check_close(host(d_kc), kc_ref, 1e-6, "k cache");
  check_equal(host(d_vc), vc_ref, "v cache");
  // The attention forward test's bound (float32 sums against double): 5e-5 of the largest value.
  check_close(host(d_out), out_ref, 5e-5, "attention_cached");
}

TEST_CASE("GPU rope_kv_cache_write equals rope_at, rope_at, kv_cache_write and kv_cache_write, bit for bit",
          "[ch07][gpu]") {
  auto rng = fresh_rng();
  using Shape = DecodeRows::Shape;
  const DecodeRows r(GENERATE(Shape{6, 2, 16}, Shape{6, 6, 48}, Shape{8, 4, 8}, Shape{32, 32, 128}, Shape{32, 8, 128}));
  const auto& [sh, slots, max_seq, D, KV, slot, pos, N, cache_n, cos_t, sin_t] = r;
  CAPTURE(sh.H, sh.KVH, sh.hs);
  const auto q = random_vec(static_cast<std::size_t>(N) * D, rng, -2.0, 2.0);
  const auto k = random_vec(static_cast<std::size_t>(N) * KV, rng, -2.0, 2.0);
  const auto v = random_vec(static_cast<std::size_t>(N) * KV, rng);
  auto d_cos = dev(cos_t), d_sin = dev(sin_t), d_v = dev(v);
  auto d_pos = dev(pos), d_slot = dev(slot);

  // The four launches the decoder ran, on poisoned caches: rows nobody writes stay NaN in both.
  auto q_ref = dev(q), k_ref = dev(k);
  auto kc_ref = poisoned(cache_n), vc_ref = poisoned(cache_n);
  gpu::rope_at(q_ref.data(), N, d_pos.data(), sh.H, sh.hs, d_cos.data(), d_sin.data(), nullptr);
  gpu::rope_at(k_ref.data(), N, d_pos.data(), sh.KVH, sh.hs, d_cos.data(), d_sin.data(), nullptr);
  gpu::kv_cache_write(k_ref.data(), kc_ref.data(), d_pos.data(), d_slot.data(), N, KV, max_seq, nullptr);
  gpu::kv_cache_write(d_v.data(), vc_ref.data(), d_pos.data(), d_slot.data(), N, KV, max_seq, nullptr);

  auto d_q = dev(q), d_k = dev(k);
  auto kc = poisoned(cache_n), vc = poisoned(cache_n);
  gpu::rope_kv_cache_write(d_q.data(), d_k.data(), d_v.data(), kc.data(), vc.data(), d_pos.data(), d_slot.data(), N,
                           sh.H, sh.KVH, sh.hs, max_seq, d_cos.data(), d_sin.data(), nullptr);
  check_equal(host(d_q), host(q_ref), "q");
  check_equal(host(kc), host(kc_ref), "k cache");  // a written row left NaN would differ here
  check_equal(host(vc), host(vc_ref), "v cache");
  check_equal(host(d_k), k, "k, left unrotated");
  std::size_t written = 0;  // the rows' entries, and only those, hold numbers
  for (float x : host(kc)) written += std::isfinite(x);
  CHECK(written == static_cast<std::size_t>(N) * KV);
}

// Version 2 against the CPU's attend, as version 1 in the decoding test above, with longer
// rows (up to 300 keys: 38 per warp) and head sizes for each load width (hs % 4 == 0: 16-byte
// loads; hs 6: 8-byte; hs 5: one float).
TEST_CASE("GPU attention_cached version 2 matches the CPU's attend and writes its BF16 copy", "[ch07][gpu]") {
  auto rng = fresh_rng();
  struct Shape { int H, KVH, hs; };
  const auto sh = GENERATE(Shape{6, 2, 16}, Shape{6, 6, 48}, Shape{8, 4, 8}, Shape{32, 32, 128}, Shape{32, 8, 128},
                           Shape{4, 2, 6}, Shape{3, 1, 5});
  CAPTURE(sh.H, sh.KVH, sh.hs);
  const int slots = 3, max_seq = 300, D = sh.H * sh.hs, KV = sh.KVH * sh.hs;
  const std::vector<int> slot = {0, 1, 2, 1, 0}, pos = {0, 17, 299, 5, 130};
  const int N = static_cast<int>(slot.size());
  const auto q = random_vec(static_cast<std::size_t>(N) * D, rng, -2.0, 2.0);
  const std::size_t cache_n = static_cast<std::size_t>(slots) * max_seq * KV;
  const auto kc = random_vec(cache_n, rng, -2.0, 2.0), vc = random_vec(cache_n, rng);
  std::vector<float> out_ref(static_cast<std::size_t>(N) * D), p(max_seq);
  for (int n = 0; n < N; ++n) {
    const auto un = static_cast<std::size_t>(n);
    const std::size_t base = static_cast<std::size_t>(slot[un]) * max_seq * KV;
    for (int h = 0; h < sh.H; ++h) {
      const std::size_t g = static_cast<std::size_t>(h / (sh.H / sh.KVH)) * sh.hs;
      attend(&q[un * D + static_cast<std::size_t>(h) * sh.hs], &kc[base + g], &vc[base + g], pos[un] + 1, KV, sh.hs,
             p.data(), &out_ref[un * D + static_cast<std::size_t>(h) * sh.hs]);
    }
  }
  auto d_q = dev(q), d_kc = dev(kc), d_vc = dev(vc);
  auto d_pos = dev(pos), d_slot = dev(slot);
  auto scores = poisoned(static_cast<std::size_t>(N) * sh.H * max_seq), out = poisoned(out_ref.size());
  auto out_b = poisoned<bf16>(out_ref.size());
  auto run = [&] {
    gpu::attention_cached_v2(d_q.data(), d_kc.data(), d_vc.data(), scores.data(), out.data(), out_b.data(),
                             d_pos.data(), d_slot.data(), N, sh.H, sh.KVH, sh.hs, max_seq, nullptr);
  };
  run();
  // Version 1's bound, argued in the attention forward test: float32 sums in another order
  // than the CPU's double ones. Here a score is ≤ 4 products per lane and a 5-level butterfly
  // (≈ 9 roundings of partial sums ≤ Σ|q_i·k_i|), the softmax's sum ≤ 2 terms per thread and
  // an 8-level tree, out ≤ 38 terms per warp then 8 partial sums: typical errors ≈ √K·u, about
  // 1e-6 of the largest value, far under the bound.
  const auto got = host(out);
  check_close(got, out_ref, 5e-5, "attention_cached_v2");
  check_equal(host(out_b), qlora::to_bf16(got), "out_b = bf16(out)");
  // No atomics, a fixed order of every sum: a second run gives the same bits.
  out.poison();
  out_b.poison();
  run();
  check_equal(host(out), got, "attention_cached_v2, second run");
}

TEST_CASE("GPU attention rejects shapes it does not support", "[ch07][gpu]") {
  DeviceBuffer<float> buf(16);
  float* p = buf.data();
  CHECK_THROWS_AS(gpu::attention_forward(p, p, p, p, p, 1, 1025, 1, 1, 4, nullptr), std::invalid_argument);
  CHECK_THROWS_AS(gpu::attention_forward(p, p, p, p, p, 1, 4, 6, 4, 4, nullptr), std::invalid_argument);
  CHECK_THROWS_AS(gpu::attention_backward(p, p, p, p, p, p, p, p, p, 1, 1025, 1, 1, 4, nullptr),
                  std::invalid_argument);
  CHECK_THROWS_AS(gpu::rope(p, 1, 1, 1, 3, p, p, false, nullptr), std::invalid_argument);
  bf16* b = nullptr;
  int* i = nullptr;
  // Version 2: heads that do not share kv heads evenly, and a head too large for its shared memory.
  CHECK_THROWS_AS(gpu::attention_cached_v2(p, p, p, p, p, b, i, i, 1, 6, 4, 4, 8, nullptr), std::invalid_argument);
  CHECK_THROWS_AS(gpu::attention_cached_v2(p, p, p, p, p, b, i, i, 1, 1, 1, 1600, 8, nullptr), std::invalid_argument);
  CHECK_THROWS_AS(gpu::rope_kv_cache_write(p, p, p, p, p, i, i, 1, 2, 1, 3, 8, p, p, nullptr), std::invalid_argument);
}

TEST_CASE("GPU SwiGLU forward and backward match the CPU reference", "[ch07][gpu]") {
  auto rng = fresh_rng();
  const std::int64_t n = GENERATE(std::int64_t{1}, std::int64_t{1001}, std::int64_t{8192} * 768 + 5);
  CAPTURE(n);
  const auto h1 = random_vec(static_cast<std::size_t>(n), rng, -6.0, 6.0);
  const auto h3 = random_vec(static_cast<std::size_t>(n), rng, -2.0, 2.0);
  const auto dg = random_vec(static_cast<std::size_t>(n), rng);
  std::vector<float> g_ref(static_cast<std::size_t>(n)), dh1_ref(static_cast<std::size_t>(n)), dh3_ref(static_cast<std::size_t>(n));
  swiglu_forward(h1.data(), h3.data(), g_ref.data(), n);
  swiglu_backward(h1.data(), h3.data(), dg.data(), dh1_ref.data(), dh3_ref.data(), n);
  auto d_h1 = dev(h1), d_h3 = dev(h3), d_dg = dev(dg);
  auto d_g = poisoned(static_cast<std::size_t>(n)), d_dh1 = poisoned(static_cast<std::size_t>(n)), d_dh3 = poisoned(static_cast<std::size_t>(n));
  gpu::swiglu_forward(d_h1.data(), d_h3.data(), d_g.data(), n, nullptr);
  gpu::swiglu_backward(d_h1.data(), d_h3.data(), d_dg.data(), d_dh1.data(), d_dh3.data(), n, nullptr);
  // Elementwise: expf (≤ 2 ulp on the GPU, ≤ 1 on the CPU) and ≤ 6 roundings per value, each
  // ≤ u relative: ≈ 8·6e-8 ≈ 5e-7 of the value. Bound: 2e-6 of the largest value.
  check_close(host(d_g), g_ref, 2e-6, "g");
  check_close(host(d_dh3), dh3_ref, 2e-6, "dh3");
  // dh1 = dg·h3·σ·(1 + z(1 − σ)) cancels where z(1 − σ) ≈ −1 (z ≈ −1.28): the roundings are
  // relative to the terms, dg·h3·σ·(1 + |z|(1 − σ)), not to the result. With one element
  // (n = 1) a bound on the largest result alone fails on such a draw.
  const auto dh1 = host(d_dh1);
  double worst = 0.0, terms = 0.0;
  for (std::size_t i = 0; i < dh1.size(); ++i) {
    const double z = h1[i], sig = 1.0 / (1.0 + std::exp(-z));
    terms = std::max(terms, std::fabs(dg[i] * h3[i] * sig) * (1.0 + std::fabs(z) * (1.0 - sig)));
    worst = std::max(worst, std::fabs(static_cast<double>(dh1[i]) - dh1_ref[i]));
  }
  INFO("dh1: max |gpu - cpu| = " << worst << ", largest term " << terms);
  CHECK(worst <= 2e-6 * terms);
  // In place (the model overwrites h1 and h3 with their gradients): the same bits.
  gpu::swiglu_backward(d_h1.data(), d_h3.data(), d_dg.data(), d_h1.data(), d_h3.data(), n, nullptr);
  check_equal(host(d_h1), dh1, "dh1 in place");
  check_equal(host(d_h3), host(d_dh3), "dh3 in place");
}

TEST_CASE("GPU swiglu_rounded equals swiglu_forward and to_bf16, bit for bit", "[ch07][gpu]") {
  auto rng = fresh_rng();
  const std::int64_t n = GENERATE(std::int64_t{1}, std::int64_t{1001}, std::int64_t{32} * 11008 + 5);
  CAPTURE(n);
  const auto un = static_cast<std::size_t>(n);
  const auto h1 = random_vec(un, rng, -6.0, 6.0), h3 = random_vec(un, rng, -2.0, 2.0);
  auto d_h1 = dev(h1), d_h3 = dev(h3);
  auto g_ref = poisoned(un), g = poisoned(un);
  auto gb_ref = poisoned<bf16>(un), gb = poisoned<bf16>(un);
  gpu::swiglu_forward(d_h1.data(), d_h3.data(), g_ref.data(), n, nullptr);
  gpu::to_bf16(g_ref.data(), gb_ref.data(), n, nullptr);
  gpu::swiglu_rounded(d_h1.data(), d_h3.data(), g.data(), gb.data(), n, nullptr);
  check_equal(host(g), host(g_ref), "g");
  check_equal(host(gb), host(gb_ref), "gb");
  std::vector<float> g_cpu(un);
  swiglu_forward(h1.data(), h3.data(), g_cpu.data(), n);
  check_close(host(g), g_cpu, 2e-6, "g against the CPU");  // the SwiGLU test's bound
}

TEST_CASE("GPU cross-entropy loss and backward match the CPU reference", "[ch07][gpu]") {
  auto rng = fresh_rng();
  struct Shape { int N, V; };
  const auto sh = GENERATE(Shape{37, 32000}, Shape{70, 512}, Shape{3, 7});
  CAPTURE(sh.N, sh.V);
  const std::size_t n = static_cast<std::size_t>(sh.N) * sh.V;
  const auto logits = random_vec(n, rng, -8.0, 8.0);
  std::vector<int> targets(static_cast<std::size_t>(sh.N));
  for (int& t : targets) t = static_cast<int>(rng() % sh.V);
  targets[0] = -1;  // ignored rows, first and in the middle
  targets[static_cast<std::size_t>(sh.N) / 2] = -1;
  const float scale = 1.0f / static_cast<float>(sh.N - 2);
  std::vector<float> loss_ref(static_cast<std::size_t>(sh.N)), grad_ref = logits;
  for (int r = 0; r < sh.N; ++r) {
    float* row = &grad_ref[static_cast<std::size_t>(r) * sh.V];
    if (targets[r] < 0) {
      loss_ref[r] = 0.0f;
      std::fill_n(row, sh.V, 0.0f);
    } else {
      loss_ref[r] = static_cast<float>(cross_entropy_loss_row(&logits[static_cast<std::size_t>(r) * sh.V], sh.V, targets[r]));
      cross_entropy_backward_row(row, sh.V, targets[r], scale);
    }
  }
  auto d_logits = dev(logits);
  auto d_targets = dev(targets);
  auto d_loss = poisoned(static_cast<std::size_t>(sh.N));
  gpu::cross_entropy_loss(d_logits.data(), d_targets.data(), d_loss.data(), sh.N, sh.V, nullptr);
  // Σ exp over V ≤ 32000 positive terms: each of 256 threads adds ≤ 125 (≤ 125·u relative),
  // then a tree of 8 levels: ≤ 1e-5 relative on the sum, so ≤ 1e-5 absolute on its log; the
  // loss is ≥ ~1 (here ≈ ln V + 8). Bound: 1e-5 of the largest loss.
  check_close(host(d_loss), loss_ref, 1e-5, "row loss");
  gpu::cross_entropy_backward(d_logits.data(), d_targets.data(), sh.N, sh.V, scale, nullptr);
  // softmax·scale with the same sum (≤ 1e-5 relative) and expf: bound 1e-5 of the largest
  // gradient (the target's −scale·(1 − p)).
  const auto grad = host(d_logits);
  check_close(grad, grad_ref, 1e-5, "dlogits");
  std::size_t ignored_nonzero = 0;
  for (int r : {0, sh.N / 2})
    for (int v = 0; v < sh.V; ++v) ignored_nonzero += grad[static_cast<std::size_t>(r) * sh.V + v] != 0.0f;
  CHECK(ignored_nonzero == 0);
}

TEST_CASE("GPU add_inplace adds exactly", "[ch07][gpu]") {
  auto rng = fresh_rng();
  const std::int64_t n = 300007;
  const auto y0 = random_vec(static_cast<std::size_t>(n), rng), x = random_vec(static_cast<std::size_t>(n), rng);
  std::vector<float> ref(static_cast<std::size_t>(n));
  for (std::size_t i = 0; i < ref.size(); ++i) ref[i] = y0[i] + x[i];
  auto d_y = dev(y0), d_x = dev(x);
  gpu::add_inplace(d_y.data(), d_x.data(), n, nullptr);
  check_equal(host(d_y), ref, "y + x");  // one float addition each: the same on both sides
}

TEST_CASE("GPU to_bf16 rounds exactly like f32_to_bf16", "[ch07][gpu]") {
  auto rng = fresh_rng();
  std::vector<float> x = random_vec(100003, rng, -1e3, 1e3);
  // Random bit patterns cover every exponent, subnormals, infinities and NaNs; then the edge cases.
  for (std::size_t i = 0; i < 50000; ++i) {
    const auto bits = static_cast<std::uint32_t>(rng());
    std::memcpy(&x[i], &bits, sizeof bits);
  }
  const std::uint32_t edges[] = {0x3f808000u /* tie, even below */, 0x3f818000u /* tie, odd below */,
                                 0x7f7fffffu /* rounds to inf */,   0x7f800000u, 0xff800000u,
                                 0x7f800001u /* signalling NaN */,  0x00000001u, 0x80000000u};
  for (std::size_t i = 0; i < std::size(edges); ++i) std::memcpy(&x[i], &edges[i], sizeof(float));
  const std::vector<bf16> ref = qlora::to_bf16(x);
  auto d_x = dev(x);
  DeviceBuffer<bf16> d_y(x.size());
  d_y.poison();
  gpu::to_bf16(d_x.data(), d_y.data(), static_cast<std::int64_t>(x.size()), nullptr);
  CUDA_CHECK(cudaDeviceSynchronize());
  const std::vector<bf16> got = d_y.download();
  std::size_t differ = 0;
  for (std::size_t i = 0; i < ref.size(); ++i) differ += got[i] != ref[i];
  CHECK(differ == 0);
}

TEST_CASE("GPU allocation that does not fit names its size and the device's free memory", "[ch07][gpu]") {
  // 2^50 bytes (1 PiB): more than any card has, refused at once by cudaMalloc without touching memory.
  const std::size_t pib = std::size_t{1} << 50;
  try {
    DeviceBuffer<std::uint8_t> too_big(pib);
    FAIL("a 1 PiB cudaMalloc succeeded");
  } catch (const gpu::OutOfDeviceMemory& e) {
    const std::string msg = e.what();
    CHECK_THAT(msg, Catch::Contains("CUDA out of memory in cudaMalloc of 1048576.00 GiB"));
    CHECK_THAT(msg, Catch::Contains("device_buffer.cuh"));
    CHECK_THAT(msg, Catch::Contains("GiB free of"));
  }
  DeviceBuffer<float> fine(16);  // the failure left no error behind for the next call
  fine.poison();
  CUDA_CHECK(cudaDeviceSynchronize());
}
