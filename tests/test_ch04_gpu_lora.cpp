// Chapter 4 GPU tests: the cuBLAS LoRA forward/backward (kernels/lora.cu) against
// the CPU reference (lora_forward_ref / lora_backward_ref) on fresh random inputs,
// with poisoned scratch buffers so a value that is never written shows up as NaN.
#include "lora.cuh"
#include "lora.hpp"

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <vector>

using namespace qlora;
using namespace qlora::cuda;

namespace {

std::vector<float> random_vec(std::size_t n, std::mt19937_64& rng) {
  std::vector<float> v(n);
  for (float& x : v) x = static_cast<float>(2.0 * uniform01(rng) - 1.0);
  return v;
}

DeviceFloats to_device(const std::vector<float>& v) {
  DeviceFloats d;
  d.upload(v.data(), v.size());
  return d;
}

std::vector<float> to_host(const DeviceFloats& d, std::size_t n) {
  std::vector<float> v(n);
  d.download(v.data(), n);
  return v;
}

void poison(DeviceFloats& d) {
  if (d.size() > 0) CUDA_CHECK(cudaMemset(d.data(), 0xFF, d.size() * sizeof(float)));  // 0xFFFFFFFF is a NaN
}

// Every element finite and within tol·max|ref| of the reference.
void check_close(const std::vector<float>& gpu, const std::vector<float>& ref, double tol, const char* what) {
  REQUIRE(gpu.size() == ref.size());
  double scale = 0.0, worst = 0.0;
  std::size_t not_finite = 0;
  for (float v : ref) scale = std::max(scale, (double)std::fabs(v));
  for (std::size_t k = 0; k < gpu.size(); ++k) {
    not_finite += !std::isfinite(gpu[k]);
    worst = std::max(worst, std::fabs((double)gpu[k] - ref[k]));
  }
  INFO(what << ": max |gpu - cpu| = " << worst << ", max |cpu| = " << scale);
  CHECK(not_finite == 0);
  CHECK(worst <= tol * scale);
}

struct Handle {
  cublasHandle_t h = nullptr;
  Handle() {
    CUBLAS_CHECK(cublasCreate(&h));
    // Plain FP32 GEMMs: no TF32 tensor-core shortcut, so the FP32 tolerance below holds.
    CUBLAS_CHECK(cublasSetMathMode(h, CUBLAS_DEFAULT_MATH));
  }
  ~Handle() { cublasDestroy(h); }
};

}  // namespace

// Both arithmetics: fp32 (cuBLAS's float32 product, PEFT's) and tf32 (the tensor cores).
TEST_CASE("CUDA LoRA forward/backward match the CPU reference", "[ch04][gpu]") {
  struct Shape {
    int in, out, r, T;
    float p;
    bool rslora;
  };
  auto sh = GENERATE(Shape{512, 384, 16, 37, 0.1f, false}, Shape{256, 688, 64, 64, 0.0f, true},
                     Shape{96, 40, 8, 5, 0.5f, false}, Shape{33, 17, 3, 1, 0.05f, true});
  const FloatMath math = GENERATE(FloatMath::fp32, FloatMath::tf32);
  CAPTURE(sh.in, sh.out, sh.r, sh.T, sh.p, sh.rslora, math == FloatMath::tf32);
  std::mt19937_64 init(std::random_device{}());  // fresh inputs every run
  LoraAdapter ad(sh.in, sh.out, sh.r);
  ad.A = random_vec(ad.A.size(), init);
  ad.B = random_vec(ad.B.size(), init);  // nonzero B so every gradient is nonzero
  ad.dA = random_vec(ad.dA.size(), init);  // gradients accumulate: start from nonzero values
  ad.dB = random_vec(ad.dB.size(), init);
  LoraConfig cfg;
  cfg.r = sh.r;
  cfg.alpha = 2.0f * static_cast<float>(sh.r);
  cfg.dropout = sh.p;
  cfg.use_rslora = sh.rslora;
  const auto x = random_vec((std::size_t)sh.T * sh.in, init);
  const auto y0 = random_vec((std::size_t)sh.T * sh.out, init);  // base output already in y
  const auto dy = random_vec((std::size_t)sh.T * sh.out, init);
  const auto dx0 = random_vec(x.size(), init);
  const std::uint64_t seed = init();

  // CPU reference.
  LoraAdapter ref = ad;
  std::vector<float> y_ref = y0, dx_ref = dx0;
  LoraCache cache_ref;
  std::mt19937_64 rng_cpu(seed);
  lora_forward_ref(ref, cfg, x.data(), y_ref.data(), sh.T, true, rng_cpu, cache_ref);
  lora_backward_ref(ref, cfg, x.data(), dy.data(), dx_ref.data(), sh.T, cache_ref);

  // GPU: a first pass over more rows sizes the cache; then every buffer is poisoned.
  Handle h;
  DeviceLoraAdapter dad(ad);
  DeviceLoraCache cache;
  DeviceLoraScratch scratch;
  {
    const int T2 = sh.T + 3;
    std::mt19937_64 warm(1);
    DeviceFloats xw = to_device(random_vec((std::size_t)T2 * sh.in, init));
    DeviceFloats yw = to_device(random_vec((std::size_t)T2 * sh.out, init));
    DeviceFloats dxw = to_device(random_vec((std::size_t)T2 * sh.in, init));
    lora_forward_cuda(h.h, nullptr, dad, cfg, xw.data(), yw.data(), T2, true, warm, cache, scratch, math);
    lora_backward_cuda(h.h, nullptr, dad, cfg, xw.data(), yw.data(), dxw.data(), T2, cache, scratch, math);
    dad.upload(ad);  // back to the initial weights and gradients
  }
  for (DeviceFloats* buf : {&cache.xa, &scratch.xd, &scratch.dxa, &scratch.dxd}) poison(*buf);

  DeviceFloats xg = to_device(x), dy_d = to_device(dy), dxg = to_device(dx0), yg = to_device(y0);
  std::mt19937_64 rng_gpu(seed);
  lora_forward_cuda(h.h, nullptr, dad, cfg, xg.data(), yg.data(), sh.T, true, rng_gpu, cache, scratch, math);
  // Between forward and backward every other adapter reuses the scratch: poison it again.
  for (DeviceFloats* buf : {&scratch.xd, &scratch.dxa, &scratch.dxd}) poison(*buf);
  lora_backward_cuda(h.h, nullptr, dad, cfg, xg.data(), dy_d.data(), dxg.data(), sh.T, cache, scratch, math);
  CUDA_CHECK(cudaDeviceSynchronize());

  // The device hashes the mask from the seed drawn where the CPU drew its own: the same
  // mask, bit for bit (the hash itself is compared in the next test).
  if (sh.p > 0.0f)
    CHECK(lora_dropout_mask_hashed(static_cast<std::int64_t>(x.size()), sh.p, cache.seed) == cache_ref.mask);
  else
    CHECK(!cache.masked);
  CHECK(rng_cpu() == rng_gpu());  // both consumed the same number of draws

  LoraAdapter got = ad;
  dad.download(got);
  // Tolerance: cuBLAS sums at most K = 688 float32 products per output (the
  // reference sums in double). The float32 rounding error of such a sum is at most
  // about K·u·Σ|terms| with u = 2^-24 ≈ 6e-8, i.e. 688·6e-8 ≈ 4e-5 of the term
  // magnitude in the worst case (random signs give ≈ √K·u ≈ 1.6e-6). We allow 5e-5
  // of the largest reference value.
  // TF32 rounds both inputs of every product to a 10-bit mantissa: each term is off by
  // at most 2·2⁻¹¹ ≈ 1e-3 relative, independently of the others, so a K-term sum of
  // random-sign terms is off by ≈ 1e-3·√K·|term|, against a result of ≈ √K·|term|: about
  // 1e-3 of a typical output, 3e-4 of the largest. Chained products (y through xa, dx
  // through dxa) add one such error per stage. We allow 4e-3 of the largest value.
  const double tol = math == FloatMath::fp32 ? 5e-5 : 4e-3;
  check_close(to_host(cache.xa, cache_ref.xa.size()), cache_ref.xa, tol, "xa");
  check_close(to_host(yg, y_ref.size()), y_ref, tol, "y");
  check_close(got.dA, ref.dA, tol, "dA");
  check_close(got.dB, ref.dB, tol, "dB");
  check_close(to_host(dxg, dx_ref.size()), dx_ref, tol, "dx");
}

TEST_CASE("CUDA hashed dropout mask equals the CPU mask bit for bit", "[ch04][gpu]") {
  // n not a multiple of the block size, a fresh seed every run, p from small to large.
  const std::int64_t n = GENERATE(1, 255, 1000003);
  const float p = GENERATE(0.05f, 0.1f, 0.5f, 0.9f);
  const std::uint64_t seed = std::random_device{}() * 0x100000001ull + std::random_device{}();
  CAPTURE(n, p, seed);
  const std::vector<float> ref = lora_dropout_mask_hashed(n, p, seed);
  DeviceFloats mask(static_cast<std::size_t>(n));
  poison(mask);
  lora_dropout_mask_cuda(mask.data(), n, p, seed, nullptr);
  CUDA_CHECK(cudaDeviceSynchronize());
  const std::vector<float> got = to_host(mask, static_cast<std::size_t>(n));
  std::int64_t differ = 0;
  for (std::size_t i = 0; i < got.size(); ++i) differ += std::memcmp(&got[i], &ref[i], sizeof(float)) != 0;
  CHECK(differ == 0);
  CHECK_THROWS_AS(lora_dropout_mask_cuda(mask.data(), n, 1.0f, seed, nullptr), std::invalid_argument);
}

TEST_CASE("CUDA LoRA rejects a rank that differs from the config", "[ch04][gpu]") {
  LoraAdapter ad(8, 4, 2);
  DeviceLoraAdapter dad(ad);
  LoraConfig cfg;
  cfg.r = 4;
  DeviceLoraCache cache;
  DeviceLoraScratch scratch;
  Handle h;
  std::mt19937_64 rng(1);
  DeviceFloats x(8), y(4);
  CHECK_THROWS_WITH(lora_forward_cuda(h.h, nullptr, dad, cfg, x.data(), y.data(), 1, false, rng, cache, scratch),
                    Catch::Contains("rank 2") && Catch::Contains("r 4"));
}
