// Chapter 6 on the GPU: the AdamW kernels (FP32 and 8-bit blockwise) and the global
// gradient norm against their CPU references, and the paged state buffer: prefetch
// round trips keep values, page_out() frees device memory, and a request above free
// memory is refused before anything is allocated.
//
// Tolerances. The update kernels perform every float operation with one rounding in
// the reference's order (adamw.cuh), and the host computes the step constants for
// both, so the GPU should reproduce the CPU bit for bit; the FP32 checks still allow
// 1e-6 relative (a few ulps) so that a compiler's different but correctly rounded
// sqrt or division would not fail them, and they report how many values were exact.
// The 8-bit codes then depend only on identical floats: they must be equal, except
// that a value lying within an ulp of a midpoint between two codes may go to either
// neighbour if an input differs by an ulp — hence at most 1 in 10⁴ codes may differ,
// and only by ±1.
#include "adamw.cuh"
#include "paged.cuh"

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <random>
#include <span>
#include <vector>

using namespace qlora;
using namespace qlora::cuda;

namespace {

/// A cudaMalloc'd array that copies to and from host vectors.
template <class T>
struct DeviceArray {
  T* ptr = nullptr;
  std::size_t n = 0;
  explicit DeviceArray(const std::vector<T>& host) : n(host.size()) {
    CUDA_CHECK(cudaMalloc(&ptr, std::max<std::size_t>(n, 1) * sizeof(T)));
    CUDA_CHECK(cudaMemcpy(ptr, host.data(), n * sizeof(T), cudaMemcpyHostToDevice));
  }
  ~DeviceArray() { cudaFree(ptr); }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  std::vector<T> host() const {
    std::vector<T> out(n);
    CUDA_CHECK(cudaDeviceSynchronize());
    CUDA_CHECK(cudaMemcpy(out.data(), ptr, n * sizeof(T), cudaMemcpyDeviceToHost));
    return out;
  }
};

std::vector<float> normal(std::size_t n, float scale, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = nd(rng);
  return v;
}

std::vector<float> positive(std::size_t n, float scale, unsigned seed) {
  auto v = normal(n, scale, seed);
  for (auto& x : v) x = x * x + 1e-12f;
  return v;
}

struct Compare {
  std::size_t bad = 0, exact = 0, first_bad = 0;
  double worst = 0;
};

/// |gpu − cpu| ≤ rel·|cpu| element by element; reports the first failure.
Compare compare(std::span<const float> gpu, std::span<const float> cpu, double rel) {
  Compare c;
  for (std::size_t i = 0; i < cpu.size(); ++i) {
    const double d = std::abs(double(gpu[i]) - double(cpu[i]));
    const double r = d / std::max(std::abs(double(cpu[i])), 1e-30);
    c.worst = std::max(c.worst, r);
    if (gpu[i] == cpu[i]) ++c.exact;
    if (!(d <= rel * std::abs(double(cpu[i])))) {  // NaN fails too
      if (c.bad == 0) c.first_bad = i;
      ++c.bad;
    }
  }
  return c;
}

#define CHECK_CLOSE(what, gpu, cpu, rel)                                                                    \
  do {                                                                                                    \
    const Compare c_ = compare(gpu, cpu, rel);                                                            \
    INFO(what << ": " << c_.bad << " of " << (cpu).size() << " beyond " << (rel) << " relative (first at " \
              << c_.first_bad << ": gpu " << ((cpu).empty() ? 0.0f : (gpu)[c_.first_bad]) << " cpu "          \
              << ((cpu).empty() ? 0.0f : (cpu)[c_.first_bad])          \
              << "), worst " << c_.worst << ", bit-identical " << c_.exact);                               \
    CHECK(c_.bad == 0);                                                                                   \
  } while (0)

/// Counts elements equal to their value before the update. The reference must change
/// nearly all of them, so an element the kernel skipped cannot pass unnoticed; in float32 a
/// few (measured on the H100 run of 2026-11-23: 3718 of 1,000,003 for 32-bit, 33 of
/// 1,000,123 for 8-bit) keep their value because decay and Adam step round away.
std::size_t unchanged(const std::vector<float>& after, const std::vector<float>& before) {
  std::size_t k = 0;
  for (std::size_t i = 0; i < after.size(); ++i) k += after[i] == before[i];
  return k;
}

}  // namespace

TEST_CASE("ch06: GPU AdamW 32-bit kernel matches adamw_update", "[ch06][gpu]") {
  const std::size_t n = 1'000'003;
  const AdamWConfig cfg{0.9f, 0.999f, 1e-8f, 0.01f};
  const float lr = 2e-4f;
  const BiasCorrection bc = bias_correction(cfg, 7);
  // Fresh random state as after a few steps: never zeros.
  std::vector<float> p = normal(n, 1.0f, 1), g = normal(n, 1e-2f, 2), m = normal(n, 1e-3f, 3),
                     v = positive(n, 1e-2f, 4);
  DeviceArray<float> dp(p), dg(g), dm(m), dv(v);
  const std::vector<float> p0 = p, m0 = m, v0 = v;
  adamw_update(p.data(), g.data(), m.data(), v.data(), n, lr, cfg, bc);
  adamw32_update(dp.ptr, dg.ptr, dm.ptr, dv.ptr, n, lr, cfg, bc, nullptr);
  REQUIRE(unchanged(p, p0) * 100 < n);
  CHECK_CLOSE("p", dp.host(), p, 1e-6);
  CHECK_CLOSE("m", dm.host(), m, 1e-6);
  CHECK_CLOSE("v", dv.host(), v, 1e-6);
}

TEST_CASE("ch06: GPU 8-bit blockwise AdamW kernel matches adamw8bit_update", "[ch06][gpu]") {
  const std::size_t n = 1'000'000 + 123;  // a partial last block
  const std::size_t blocks = (n + kOptimBlock - 1) / kOptimBlock;
  const AdamWConfig cfg{0.9f, 0.999f, 1e-8f, 0.01f};
  const Adam8bitStepConsts k = adam8bit_consts(cfg, 2e-4f, 9);
  std::mt19937 rng(8);
  std::uniform_int_distribution<int> code(0, 255);
  std::vector<std::uint8_t> c1(n), c2(n);
  for (auto& c : c1) c = static_cast<std::uint8_t>(code(rng));
  for (auto& c : c2) c = static_cast<std::uint8_t>(code(rng));
  std::vector<float> p = normal(n, 1.0f, 5), g = normal(n, 1e-2f, 6), a1 = positive(blocks, 1e-2f, 7),
                     a2 = positive(blocks, 1e-4f, 8);
  DeviceArray<float> dp(p), dg(g), da1(a1), da2(a2);
  DeviceArray<std::uint8_t> dc1(c1), dc2(c2);
  std::vector<float> maps(512);
  std::copy(adam8bit_map1().begin(), adam8bit_map1().end(), maps.begin());
  std::copy(adam8bit_map2().begin(), adam8bit_map2().end(), maps.begin() + 256);
  DeviceArray<float> dmaps(maps);
  const std::vector<float> p0 = p, a10 = a1;

  adamw8bit_update(p.data(), g.data(), c1.data(), c2.data(), a1.data(), a2.data(), n, k);
  cuda::adamw8bit_update(dp.ptr, dg.ptr, dc1.ptr, dc2.ptr, da1.ptr, da2.ptr, n, k, dmaps.ptr, nullptr);
  REQUIRE(unchanged(p, p0) * 100 < n);
  REQUIRE(unchanged(a1, a10) == 0);
  CHECK_CLOSE("p", dp.host(), p, 1e-6);
  CHECK_CLOSE("absmax1", da1.host(), a1, 1e-6);
  CHECK_CLOSE("absmax2", da2.host(), a2, 1e-6);
  for (int which = 1; which <= 2; ++which) {
    const auto gpu = which == 1 ? dc1.host() : dc2.host();
    const auto& cpu = which == 1 ? c1 : c2;
    std::size_t differ = 0, far = 0;
    for (std::size_t i = 0; i < n; ++i) {
      const int d = std::abs(int(gpu[i]) - int(cpu[i]));
      differ += d != 0;
      far += d > 1;
    }
    INFO("state" << which << " codes: " << differ << " of " << n << " differ, " << far << " by more than 1");
    CHECK(far == 0);
    CHECK(differ * 10000 <= n);
  }
}

TEST_CASE("ch06: GPU optimizers follow the CPU optimizers over several steps, paged or not", "[ch06][gpu]") {
  // A big tensor (8-bit states) and a small one (FP32 states in the 8-bit optimizer); the paged
  // runs page their states out after every step, so each step must page them back in.
  const std::size_t nb = 3 * kMin8bitSize + 100, ns = 1000;
  const AdamWConfig cfg{0.9f, 0.999f, 1e-8f, 0.01f};
  for (StatePlacement where : {StatePlacement::Device, StatePlacement::Paged}) {
    INFO("states: " << to_string(where));
    std::vector<float> pb = normal(nb, 1.0f, 11), ps = normal(ns, 1.0f, 12);
    std::vector<float> pb8 = pb, ps8 = ps, gb(nb), gs(ns);
    DeviceArray<float> dpb(pb), dps(ps), dpb8(pb), dps8(ps), dgb(gb), dgs(gs);
    AdamW cpu32({{"big", pb.data(), gb.data(), nb}, {"small", ps.data(), gs.data(), ns}}, cfg);
    AdamW8bit cpu8({{"big", pb8.data(), gb.data(), nb}, {"small", ps8.data(), gs.data(), ns}}, cfg);
    CudaAdamW gpu32({{"big", dpb.ptr, dgb.ptr, nb}, {"small", dps.ptr, dgs.ptr, ns}}, cfg, where);
    CudaAdamW8bit gpu8({{"big", dpb8.ptr, dgb.ptr, nb}, {"small", dps8.ptr, dgs.ptr, ns}}, cfg, where);
    CHECK(gpu8.state_bytes() >= adam8bit_state_bytes(nb) + adam8bit_state_bytes(ns));
    CHECK(gpu8.state_bytes() < adam8bit_state_bytes(nb) + adam8bit_state_bytes(ns) + 8 * 256);
    for (int t = 1; t <= 5; ++t) {
      // Copy into the vectors (not assign): the CPU optimizers hold pointers to their buffers.
      const auto new_gb = normal(nb, 1e-2f, 100u + unsigned(t)), new_gs = normal(ns, 1e-2f, 200u + unsigned(t));
      std::copy(new_gb.begin(), new_gb.end(), gb.begin());
      std::copy(new_gs.begin(), new_gs.end(), gs.begin());
      CUDA_CHECK(cudaMemcpy(dgb.ptr, gb.data(), nb * sizeof(float), cudaMemcpyHostToDevice));
      CUDA_CHECK(cudaMemcpy(dgs.ptr, gs.data(), ns * sizeof(float), cudaMemcpyHostToDevice));
      cpu32.step(1e-3f);
      cpu8.step(1e-3f);
      gpu32.step(1e-3f);
      gpu8.step(1e-3f);
      gpu32.page_out();
      gpu8.page_out();
    }
    CUDA_CHECK(cudaDeviceSynchronize());
    CHECK_CLOSE("32-bit big p", dpb.host(), pb, 1e-6);
    CHECK_CLOSE("32-bit small p", dps.host(), ps, 1e-6);
    CHECK_CLOSE("32-bit big m", gpu32.exp_avg(0), cpu32.exp_avg(0), 1e-6);
    CHECK_CLOSE("32-bit small v", gpu32.exp_avg_sq(1), cpu32.exp_avg_sq(1), 1e-6);
    CHECK_CLOSE("8-bit big p", dpb8.host(), pb8, 1e-6);
    CHECK_CLOSE("8-bit small p", dps8.host(), ps8, 1e-6);
    const AdamW8bit::State sb = gpu8.state(0), ss = gpu8.state(1);
    CHECK_CLOSE("8-bit absmax1", sb.absmax1, cpu8.state(0).absmax1, 1e-6);
    CHECK_CLOSE("8-bit small m (FP32)", ss.m32, cpu8.state(1).m32, 1e-6);
    std::size_t differ = 0;
    for (std::size_t i = 0; i < nb; ++i) differ += sb.c1[i] != cpu8.state(0).c1[i];
    INFO("8-bit state1 codes differing after 5 steps: " << differ << " of " << nb);
    CHECK(differ * 1000 <= nb);
  }
}

TEST_CASE("ch06: GPU global gradient norm and clipping match clip_grad_norm", "[ch06][gpu]") {
  std::vector<std::vector<float>> host = {normal(3'000'001, 1e-2f, 31), normal(777, 1.0f, 32), {},
                                          normal(65'536, 0.1f, 33)};
  std::vector<std::unique_ptr<DeviceArray<float>>> dev;
  std::vector<DeviceSpan> spans;
  for (const auto& h : host) {
    dev.push_back(std::make_unique<DeviceArray<float>>(h));
    spans.push_back({dev.back()->ptr, h.size()});
  }
  GradClipper clipper(spans);
  std::vector<std::span<const float>> views(host.begin(), host.end());
  const double cpu_norm = global_grad_norm(views);
  // Both sides add float squares in double; only the order differs (~1e-15 relative).
  CHECK(clipper.norm(nullptr) == Approx(cpu_norm).epsilon(1e-9));

  std::vector<std::span<float>> grads(host.begin(), host.end());
  const double cpu_before = clip_grad_norm(grads, 0.3);
  const double gpu_before = clipper.clip(0.3, nullptr);
  CHECK(gpu_before == Approx(cpu_before).epsilon(1e-9));
  for (std::size_t t = 0; t < host.size(); ++t) CHECK_CLOSE("clipped grad " << t, dev[t]->host(), host[t], 1e-6);
  CHECK(clipper.norm(nullptr) == Approx(0.3).epsilon(1e-6));
  // Below the limit nothing changes.
  const auto before = dev[1]->host();
  clipper.clip(100.0, nullptr);
  CHECK(dev[1]->host() == before);
}

TEST_CASE("ch06: Paged state: prefetch round trips keep every value", "[ch06][gpu][paged]") {
  const std::size_t n = std::size_t{64} << 20;  // 256 MiB of floats
  StateBuffer buf(n * sizeof(float), StatePlacement::Paged, "test buffer");
  auto* f = static_cast<float*>(buf.data());
  std::vector<float> pattern = normal(n, 1.0f, 41);
  CUDA_CHECK(cudaMemcpy(f, pattern.data(), n * sizeof(float), cudaMemcpyDefault));
  buf.page_out(nullptr);
  CUDA_CHECK(cudaDeviceSynchronize());
  CHECK_FALSE(buf.on_device());
  // On the host now: read and change it directly through the same pointer.
  REQUIRE(std::memcmp(f, pattern.data(), n * sizeof(float)) == 0);
  for (std::size_t i = 0; i < n; i += 4097) f[i] = pattern[i] = -pattern[i];
  buf.page_in(nullptr);
  CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<float> back(n);
  CUDA_CHECK(cudaMemcpy(back.data(), f, n * sizeof(float), cudaMemcpyDefault));
  CHECK(back == pattern);
}

TEST_CASE("ch06: Paged state: page_out frees device memory, page_in takes it back", "[ch06][gpu][paged]") {
  const std::size_t bytes = std::size_t{2} << 30;
  StateBuffer buf(bytes, StatePlacement::Paged, "2 GiB test state");
  CUDA_CHECK(cudaDeviceSynchronize());
  const std::size_t resident = device_memory().free;
  buf.page_out(nullptr);
  CUDA_CHECK(cudaDeviceSynchronize());
  const std::size_t out = device_memory().free;
  buf.page_in(nullptr);
  CUDA_CHECK(cudaDeviceSynchronize());
  const std::size_t in = device_memory().free;
  INFO("free MiB: resident " << (resident >> 20) << ", after page_out " << (out >> 20) << ", after page_in "
                              << (in >> 20) << " (state " << (bytes >> 20) << " MiB)");
  // The driver may keep a little back; at least 90 % of the state must leave the GPU.
  CHECK(out >= resident + bytes / 10 * 9);
  CHECK(in + bytes / 10 * 9 <= out);
}

TEST_CASE("ch06: Paged state: a request above free memory is refused without allocating", "[ch06][gpu][paged]") {
  const DeviceMemory before = device_memory();
  const std::size_t too_much = before.free + (std::size_t{1} << 30);
  CHECK_THROWS_WITH(StateBuffer(too_much, StatePlacement::Paged, "huge state"),
                    Catch::Contains("huge state") && Catch::Contains("refusing") && Catch::Contains("MiB free"));
  // Inside free memory but inside the safety margin: refused too.
  CHECK_THROWS_WITH(check_managed_request(before.free - kManagedSafetyMargin / 2, kManagedSafetyMargin, "margin"),
                    Catch::Contains("must stay free"));
  const DeviceMemory after = device_memory();
  INFO("free MiB before " << (before.free >> 20) << ", after " << (after.free >> 20));
  CHECK(after.free + (std::size_t{64} << 20) >= before.free);  // nothing was allocated
  // A modest request still works.
  StateBuffer ok(std::size_t{16} << 20, StatePlacement::Paged, "small state");
  CHECK(ok.data() != nullptr);
}
