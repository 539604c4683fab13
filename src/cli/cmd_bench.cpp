// `qlora bench kernels` (chapter 5, "BF16 dequant-matmul on the GPU"): one run that
// measures the GPU's own ceilings and then our 4-bit kernels against them, on the
// weight shapes of 7B-70B LLaMA layers (out × in): 4096×4096, 11008×4096,
// 8192×8192, 28672×8192, NF4 with blocksize 64 and double quantization.
//  - copy bandwidth: cudaMemcpy device-to-device of a large buffer, bytes read + written;
//  - write bandwidth: cudaMemset of the same buffer (dequantize's traffic is mostly writes);
//  - dequantize (each version): GB/s over packed codes + scales + bf16 output, and % of copy;
//  - GEMV at 1, 4, 8 tokens (each version): µs and speedup over cuBLAS bf16 GEMV on the
//    original bf16 weights;
//  - linear forward at 512 and 4096 tokens: time / cuBLAS bf16 GEMM time;
//  - matmul at 1 to 4096 tokens: the tensor-core 4-bit matmul (gemm4_mma, versions 1 and 2), GEMV version 4 (up to
//    8 tokens) and dequantize + cuBLAS beside cuBLAS on the bf16 weight: µs, effective GB/s
//    (the weight as that variant reads it, bf16 or 4-bit, plus x and y), TFLOP/s, time / cuBLAS.
// Every variant is validated once before it is timed (byte equality with the CPU
// reference for quantize/dequantize, an FP64 CPU reference on sampled outputs for the
// matmuls); a variant that fails is reported and skipped, the others go on. Timing:
// CUDA events, warm-up, median over repetitions, and inputs rotated over several
// copies when one set would fit in the L2 cache. The numbers go to docs/benchmarks.md;
// notebooks/05-kernels.ipynb plots the JSON.
#include "command.hpp"

#include "atomic_file.hpp"

#include <nlohmann/json.hpp>

#include <cstdio>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#ifdef QLORA_HAVE_CUDA
#include "bf16.hpp"
#include "dequant4.cuh"
#include "gemm4_mma.cuh"
#include "gemv4.cuh"
#include "linear4.cuh"
#include "quant4.hpp"
#include "quantize4.cuh"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <ctime>
#include <functional>
#include <limits>
#endif

namespace {

struct BenchKernelsArgs {
  std::string json;
  bool quick = false;
  bool profile = false;
  std::vector<std::string> shapes;
};

#ifdef QLORA_HAVE_CUDA

using namespace qlora;
using namespace qlora::cuda;
using nlohmann::json;

// ---------------------------------------------------------------------------------------------
// Inputs: approximately normal values from a counter-based hash (fast for 235 M values;
// a sum of four uniforms, Irwin-Hall, scaled to unit variance). Never zeros.

std::uint64_t splitmix64(std::uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

std::vector<float> normal_values(std::size_t n, std::uint64_t seed, float scale) {
  std::vector<float> v(n);
  const std::uint64_t base = splitmix64(seed);
  for (std::size_t i = 0; i < n; ++i) {
    const std::uint64_t h = splitmix64(base + i);
    double s = 0.0;
    for (int k = 0; k < 4; ++k) s += static_cast<double>((h >> (16 * k)) & 0xffff) / 65536.0;
    v[i] = static_cast<float>((s - 2.0) * std::sqrt(3.0) * scale);
  }
  return v;
}

// ---------------------------------------------------------------------------------------------
// Timing.

struct Events {
  cudaEvent_t start = nullptr, stop = nullptr;
  Events() {
    CUDA_CHECK(cudaEventCreate(&start));
    CUDA_CHECK(cudaEventCreate(&stop));
  }
  ~Events() {
    cudaEventDestroy(start);
    cudaEventDestroy(stop);
  }
  Events(const Events&) = delete;
  Events& operator=(const Events&) = delete;
};

//! [bench-timing]
/// Median time of one call in µs. `call(i)` launches call number i (callers rotate
/// buffers with it). A warm-up call first; then each repetition times enough calls
/// back to back (one event pair) to last ~0.5 ms, so launch gaps and event
/// resolution stay out of µs-scale numbers.
double median_us(const std::function<void(int)>& call, int reps) {
  if (reps == 0) return std::numeric_limits<double>::quiet_NaN();  // --profile: no timing launches at all
  Events ev;
  int counter = 0;
  call(counter++);  // warm-up: module load, cuBLAS heuristics, first-touch
  CUDA_CHECK(cudaEventRecord(ev.start));
  call(counter++);
  CUDA_CHECK(cudaEventRecord(ev.stop));
  CUDA_CHECK(cudaEventSynchronize(ev.stop));
  float once_ms = 0.0f;
  CUDA_CHECK(cudaEventElapsedTime(&once_ms, ev.start, ev.stop));
  const int per_rep = std::clamp(static_cast<int>(0.5 / std::max(once_ms, 1e-4f)), 1, 200);
  std::vector<double> us;
  for (int r = 0; r < reps; ++r) {
    CUDA_CHECK(cudaEventRecord(ev.start));
    for (int k = 0; k < per_rep; ++k) call(counter++);
    CUDA_CHECK(cudaEventRecord(ev.stop));
    CUDA_CHECK(cudaEventSynchronize(ev.stop));
    float ms = 0.0f;
    CUDA_CHECK(cudaEventElapsedTime(&ms, ev.start, ev.stop));
    us.push_back(1000.0 * ms / per_rep);
  }
  std::nth_element(us.begin(), us.begin() + static_cast<std::ptrdiff_t>(us.size() / 2), us.end());
  return us[us.size() / 2];
}
//! [bench-timing]

/// How many copies of a working set of `bytes` to rotate over so that consecutive
/// calls never find their inputs in the L2 cache: at least 3·L2 in total.
int rotation_copies(std::size_t bytes, std::size_t l2_bytes) {
  return static_cast<int>(std::clamp<std::size_t>((3 * l2_bytes + bytes - 1) / std::max<std::size_t>(bytes, 1), 1, 32));
}

// ---------------------------------------------------------------------------------------------
// Validation against the CPU.

/// An FP64 dot product and the sum of |terms| that bounds its float32/bf16 error.
struct Dot {
  double value = 0.0, abs_sum = 0.0;
};

Dot dot_ref(const bf16* x, const bf16* w, std::int64_t n) {
  Dot d;
  for (std::int64_t i = 0; i < n; ++i) {
    const double t = static_cast<double>(bf16_to_f32(x[i])) * bf16_to_f32(w[i]);
    d.value += t;
    d.abs_sum += std::fabs(t);
  }
  return d;
}

/// The same bound as tests/test_ch05_gpu_kernels.cpp: float32 accumulation over K terms,
/// the fused GEMV's unrounded weights and the bf16 output rounding.
bool within_bound(double got, const Dot& ref, std::int64_t K, double& worst_ratio) {
  const double bound = (static_cast<double>(K) * std::ldexp(1.0, -23) + 2.0 * std::ldexp(1.0, -8)) * ref.abs_sum + 1e-30;
  if (!std::isfinite(got)) {
    worst_ratio = INFINITY;
    return false;
  }
  worst_ratio = std::max(worst_ratio, std::fabs(got - ref.value) / bound);
  return std::fabs(got - ref.value) <= bound;
}

/// Index of the first differing element, or -1.
template <class T>
std::int64_t first_difference(const std::vector<T>& a, const std::vector<T>& b) {
  if (a.size() != b.size()) return 0;
  for (std::size_t i = 0; i < a.size(); ++i)
    if (std::memcmp(&a[i], &b[i], sizeof(T)) != 0) return static_cast<std::int64_t>(i);
  return -1;
}

std::int64_t first_quant_difference(const Quant4Tensor& want, const Quant4Tensor& got, std::string& where) {
  const std::pair<const char*, std::int64_t> diffs[] = {
      {"packed", first_difference(want.packed, got.packed)},
      {"absmax", first_difference(want.absmax, got.absmax)},
      {"nested codes", first_difference(want.nested.codes, got.nested.codes)},
      {"nested absmax", first_difference(want.nested.absmax, got.nested.absmax)},
      {"offset", std::memcmp(&want.nested.offset, &got.nested.offset, sizeof(float)) != 0 ? 0 : -1}};
  for (const auto& [name, at] : diffs) {
    if (at >= 0) {
      where = name;
      return at;
    }
  }
  return -1;
}

std::vector<bf16> download_bf16(const bf16* d, std::size_t n) {
  std::vector<bf16> h(n);
  CUDA_CHECK(cudaMemcpy(h.data(), d, n * sizeof(bf16), cudaMemcpyDeviceToHost));
  return h;
}

/// A result row's status: "ok" or why the variant was not timed.
json failed(const std::string& why) {
  std::printf("    FAILED: %s\n", why.c_str());
  return json{{"valid", false}, {"error", why}};
}

// ---------------------------------------------------------------------------------------------
// The measurements.

struct Context {
  std::size_t l2_bytes = 0;
  double copy_gbs = 0.0;
  int reps = 15;
  CublasHandle cublas;
};

//! [bench-copy]
double copy_bandwidth_gbs(std::size_t bytes, int reps) {
  DeviceBuffer<std::uint8_t> a(bytes), b(bytes);
  CUDA_CHECK(cudaMemset(a.data(), 0x5A, bytes));
  const double us = median_us(
      [&](int) { CUDA_CHECK(cudaMemcpyAsync(b.data(), a.data(), bytes, cudaMemcpyDeviceToDevice)); }, reps);
  return 2.0 * static_cast<double>(bytes) / (us * 1e3);  // read + write, GB/s
}
//! [bench-copy]

/// Write-only bandwidth (cudaMemset): dequantize's traffic is 80% writes, so this is
/// its second yardstick, reported next to the copy bandwidth.
double write_bandwidth_gbs(std::size_t bytes, int reps) {
  DeviceBuffer<std::uint8_t> a(bytes);
  const double us = median_us([&](int i) { CUDA_CHECK(cudaMemsetAsync(a.data(), i & 0xff, bytes)); }, reps);
  return static_cast<double>(bytes) / (us * 1e3);
}

/// Everything measured on one weight shape.
struct Shape {
  int out = 0, in = 0;
};

json bench_dequant(Context& ctx, const DeviceQuant4& q, const std::vector<bf16>& want) {
  json rows = json::array();
  const std::size_t n = static_cast<std::size_t>(q.numel);
  const double bytes = static_cast<double>(q.storage_bytes()) + 2.0 * static_cast<double>(n);
  const int copies = rotation_copies(static_cast<std::size_t>(bytes), ctx.l2_bytes);
  std::vector<DeviceQuant4> qs;
  std::vector<DeviceBuffer<bf16>> outs;
  for (int c = 0; c < copies; ++c) {
    qs.push_back(q.clone());
    outs.emplace_back(n);
  }
  for (auto version : {DequantVersion::naive, DequantVersion::vectorized, DequantVersion::coalesced}) {
    const int v = static_cast<int>(version);
    const char* name = version == DequantVersion::naive        ? "naive"
                       : version == DequantVersion::vectorized ? "vectorized"
                                                               : "coalesced";
    std::printf("  dequantize v%d (%s)\n", v, name);
    std::fflush(stdout);
    json row = {{"version", v}, {"name", name}};
    try {
      outs[0].poison();
      dequantize4(qs[0], outs[0].data(), version);
      CUDA_CHECK(cudaDeviceSynchronize());
      const auto at = first_difference(want, download_bf16(outs[0].data(), n));
      if (at >= 0) {
        row.update(failed("output differs from dequantize_4bit_bf16 at element " + std::to_string(at)));
        rows.push_back(row);
        continue;
      }
      const double us = median_us(
          [&](int i) { dequantize4(qs[static_cast<std::size_t>(i % copies)], outs[static_cast<std::size_t>(i % copies)].data(), version); },
          ctx.reps);
      const double gbs = bytes / (us * 1e3);
      row.update({{"valid", true}, {"us", us}, {"gbs", gbs}, {"pct_copy", 100.0 * gbs / ctx.copy_gbs},
                  {"bytes", bytes}, {"rotation_copies", copies}});
    } catch (const std::exception& e) {
      row.update(failed(e.what()));
    }
    rows.push_back(row);
  }
  return rows;
}

/// Output rows the matmul checks compare: spread over the matrix, the last one included.
std::vector<int> sample_rows(int out) {
  std::vector<int> rows;
  for (int k = 0; k < 48; ++k) rows.push_back(static_cast<int>(static_cast<std::int64_t>(k) * out / 48));
  rows.push_back(out - 1);
  return rows;
}

/// Tokens the matmul checks compare: all of up to 64, else 64 spread out and the last.
std::vector<int> sample_tokens(int tokens) {
  std::vector<int> ts;
  const int n = std::min(tokens, 64);
  for (int k = 0; k < n; ++k) ts.push_back(static_cast<int>(static_cast<std::int64_t>(k) * tokens / n));
  if (ts.back() != tokens - 1) ts.push_back(tokens - 1);
  return ts;
}

/// Checks y (tokens × out, bf16, device) on sampled rows and tokens against FP64 dot products with
/// host weights w (out × in, bf16). Returns an empty string or what went wrong.
std::string check_matmul(const bf16* y_dev, const std::vector<bf16>& x, const std::vector<bf16>& w, int tokens,
                         int in, int out, double& worst_ratio) {
  const auto y = download_bf16(y_dev, static_cast<std::size_t>(tokens) * out);
  for (int row : sample_rows(out)) {
    for (int t : sample_tokens(tokens)) {
      const Dot ref = dot_ref(&x[static_cast<std::size_t>(t) * in], &w[static_cast<std::size_t>(row) * in], in);
      const double got = bf16_to_f32(y[static_cast<std::size_t>(t) * out + row]);
      if (!within_bound(got, ref, in, worst_ratio)) {
        return "token " + std::to_string(t) + " row " + std::to_string(row) + ": got " + std::to_string(got) +
               ", FP64 reference " + std::to_string(ref.value);
      }
    }
  }
  return {};
}

/// Runs call(0) once on a poisoned y and checks y against FP64 on sampled outputs
/// (throwing std::runtime_error that names the first bad one); then times `call`.
double checked_time_us(const Context& ctx, const std::function<void(int)>& call, DeviceBuffer<bf16>& y,
                       const std::vector<bf16>& x, const std::vector<bf16>& w, int tokens, const Shape& s,
                       double& worst_ratio) {
  y.poison();
  call(0);
  CUDA_CHECK(cudaDeviceSynchronize());
  const auto err = check_matmul(y.data(), x, w, tokens, s.in, s.out, worst_ratio);
  if (!err.empty()) throw std::runtime_error("check against FP64 failed: " + err);
  return median_us(call, ctx.reps);
}

/// Copies of one weight, bf16 (for cuBLAS) and 4-bit, to rotate over so that consecutive
/// calls never find the weight in the L2 cache (copy 0 of the bf16 one is the caller's).
class WeightCopies {
 public:
  WeightCopies(const Context& ctx, const DeviceQuant4& q, const DeviceBuffer<bf16>& w_dev)
      : first_(w_dev.data()),
        bf16_count_(rotation_copies(w_dev.bytes(), ctx.l2_bytes)),
        q4_count_(rotation_copies(static_cast<std::size_t>(q.storage_bytes()), ctx.l2_bytes)) {
    for (int c = 1; c < bf16_count_; ++c) {
      extra_.emplace_back(w_dev.size());
      CUDA_CHECK(cudaMemcpy(extra_.back().data(), w_dev.data(), w_dev.bytes(), cudaMemcpyDeviceToDevice));
    }
    for (int c = 0; c < q4_count_; ++c) q4_.push_back(q.clone());
  }
  /// The bf16 weight for call number i.
  const bf16* w(int i) const {
    const int c = i % bf16_count_;
    return c == 0 ? first_ : extra_[static_cast<std::size_t>(c - 1)].data();
  }
  /// The 4-bit weight for call number i.
  const DeviceQuant4& q(int i) const { return q4_[static_cast<std::size_t>(i % q4_count_)]; }
  int bf16_count() const { return bf16_count_; }
  int q4_count() const { return q4_count_; }

 private:
  const bf16* first_;
  int bf16_count_, q4_count_;
  std::vector<DeviceBuffer<bf16>> extra_;
  std::vector<DeviceQuant4> q4_;
};

json bench_gemv(Context& ctx, const WeightCopies& copies, const std::vector<bf16>& w_bf16,
                const std::vector<bf16>& w_deq, const Shape& s) {
  json rows = json::array();
  const std::size_t w_bytes = w_bf16.size() * sizeof(bf16);
  const DeviceQuant4& q = copies.q(0);
  for (int tokens : {1, 4, 8}) {
    json entry = {{"tokens", tokens}, {"rotation_copies_bf16", copies.bf16_count()},
                  {"rotation_copies_4bit", copies.q4_count()}};
    const auto x = to_bf16(normal_values(static_cast<std::size_t>(tokens) * s.in, 100 + tokens, 1.0f));
    const auto x_dev = to_device(std::span<const bf16>(x));
    DeviceBuffer<bf16> y(static_cast<std::size_t>(tokens) * s.out);
    double cublas_us = 0.0;
    std::printf("  gemv %d token(s): cuBLAS bf16\n", tokens);
    std::fflush(stdout);
    try {
      double worst = 0.0;
      cublas_us = checked_time_us(
          ctx,
          [&](int i) { gemm_bf16_xwt(ctx.cublas, x_dev.data(), copies.w(i), y.data(), OutType::bf16, tokens, s.in, s.out); },
          y, x, w_bf16, tokens, s, worst);
      entry["cublas_us"] = cublas_us;
      entry["cublas_gbs"] = static_cast<double>(w_bytes) / (cublas_us * 1e3);
    } catch (const std::exception& e) {
      entry["cublas"] = failed(std::string("cuBLAS reference: ") + e.what());
    }
    json variants = json::array();
    for (auto version : {GemvVersion::naive, GemvVersion::fused, GemvVersion::multirow, GemvVersion::prefetch}) {
      const int v = static_cast<int>(version);
      const char* names[] = {"automatic", "naive", "fused", "multirow", "prefetch"};
      const char* name = names[v];
      std::printf("  gemv %d token(s): v%d (%s)\n", tokens, v, name);
      std::fflush(stdout);
      json row = {{"version", v}, {"name", name}};
      try {
        double worst = 0.0;
        const double us = checked_time_us(
            ctx,
            [&](int i) { gemv4(copies.q(i), x_dev.data(), y.data(), tokens, version); },
            y, x, w_deq, tokens, s, worst);
        row.update({{"valid", true}, {"us", us}, {"worst_error_over_bound", worst},
                    {"gbs", static_cast<double>(q.storage_bytes()) / (us * 1e3)}});
        if (cublas_us > 0.0) row["speedup_vs_cublas"] = cublas_us / us;
      } catch (const std::exception& e) {
        row.update(failed(e.what()));
      }
      variants.push_back(row);
    }
    entry["variants"] = variants;
    rows.push_back(entry);
  }
  return rows;
}

json bench_linear(Context& ctx, const DeviceQuant4& q, const std::vector<bf16>& w_bf16, const std::vector<bf16>& w_deq,
                  const DeviceBuffer<bf16>& w_dev, const Shape& s, const std::vector<int>& token_counts) {
  json rows = json::array();
  DequantScratch scratch;
  for (int tokens : token_counts) {
    json entry = {{"tokens", tokens}};
    const auto x = to_bf16(normal_values(static_cast<std::size_t>(tokens) * s.in, 200 + tokens, 1.0f));
    const auto x_dev = to_device(std::span<const bf16>(x));
    DeviceBuffer<bf16> y(static_cast<std::size_t>(tokens) * s.out);
    const double flops = 2.0 * tokens * static_cast<double>(s.in) * s.out;
    double cublas_us = 0.0;
    std::printf("  linear %d tokens: cuBLAS bf16 GEMM, then dequantize + GEMM\n", tokens);
    std::fflush(stdout);
    try {
      double worst = 0.0;
      cublas_us = checked_time_us(
          ctx,
          [&](int) { gemm_bf16_xwt(ctx.cublas, x_dev.data(), w_dev.data(), y.data(), OutType::bf16, tokens, s.in, s.out); },
          y, x, w_bf16, tokens, s, worst);
      entry["cublas_us"] = cublas_us;
      entry["cublas_tflops"] = flops / (cublas_us * 1e6);
    } catch (const std::exception& e) {
      entry["cublas"] = failed(std::string("cuBLAS reference: ") + e.what());
    }
    try {
      double worst = 0.0;
      const double us = checked_time_us(
          ctx, [&](int) { linear4_forward(ctx.cublas, q, x_dev.data(), tokens, y.data(), OutType::bf16, scratch); },
          y, x, w_deq, tokens, s, worst);
      entry.update({{"valid", true}, {"linear4_us", us}, {"worst_error_over_bound", worst},
                    {"dequant_version", static_cast<int>(DequantVersion::coalesced)}});
      if (cublas_us > 0.0) entry["ratio_vs_cublas"] = us / cublas_us;
    } catch (const std::exception& e) {
      entry.update(failed(e.what()));
    }
    rows.push_back(entry);
  }
  return rows;
}

/// Bytes a matmul must move at least: its weight as the variant reads it, x and y in bf16.
double matmul_bytes(double weight_bytes, int tokens, const Shape& s) {
  return weight_bytes + 2.0 * tokens * (static_cast<double>(s.in) + s.out);
}

//! [bench-mma]
/// The tensor-core 4-bit matmul beside everything else that computes the same product, at each
/// token count, in one run: cuBLAS on the bf16 weight (the reference time), the matmul's
/// versions 1-3, GEMV version 4 (up to its token limit), dequantize + cuBLAS (linear4_forward).
/// Each is checked against FP64 first.
json bench_mma(Context& ctx, const WeightCopies& copies, const std::vector<bf16>& w_bf16,
               const std::vector<bf16>& w_deq, const Shape& s, const std::vector<int>& token_counts) {
  json rows = json::array();
  const DeviceQuant4& q = copies.q(0);
  const double w4_bytes = static_cast<double>(q.storage_bytes());
  const double w16_bytes = 2.0 * static_cast<double>(w_bf16.size());
  DequantScratch scratch;
  Mma3Workspace mma3_workspace;
  for (int tokens : token_counts) {
    json entry = {{"tokens", tokens}, {"rotation_copies_bf16", copies.bf16_count()},
                  {"rotation_copies_4bit", copies.q4_count()}};
    const auto x = to_bf16(normal_values(static_cast<std::size_t>(tokens) * s.in, 300 + tokens, 1.0f));
    const auto x_dev = to_device(std::span<const bf16>(x));
    DeviceBuffer<bf16> y(static_cast<std::size_t>(tokens) * s.out);
    const double flops = 2.0 * tokens * static_cast<double>(s.in) * s.out;
    double cublas_us = 0.0;
    // One row per variant: time, effective bandwidth over its own input bytes, TFLOP/s.
    auto measure = [&](const char* name, double weight_bytes, const std::vector<bf16>& w_ref,
                       const std::function<void(int)>& call) {
      std::printf("  matmul %d token(s): %s\n", tokens, name);
      std::fflush(stdout);
      json row = {{"name", name}};
      try {
        double worst = 0.0;
        const double us = checked_time_us(ctx, call, y, x, w_ref, tokens, s, worst);
        row.update({{"valid", true}, {"us", us}, {"worst_error_over_bound", worst},
                    {"gbs", matmul_bytes(weight_bytes, tokens, s) / (us * 1e3)}, {"tflops", flops / (us * 1e6)}});
        if (cublas_us > 0.0) row["time_vs_cublas"] = us / cublas_us;
        return row;
      } catch (const std::exception& e) {
        row.update(failed(e.what()));
        return row;
      }
    };
    json variants = json::array();
    variants.push_back(measure("cuBLAS bf16", w16_bytes, w_bf16, [&](int i) {
      gemm_bf16_xwt(ctx.cublas, x_dev.data(), copies.w(i), y.data(), OutType::bf16, tokens, s.in, s.out);
    }));
    if (variants.back()["valid"].get<bool>()) {
      cublas_us = variants.back()["us"].get<double>();
      variants.back()["time_vs_cublas"] = 1.0;
    }
    variants.push_back(measure("mma v1", w4_bytes, w_deq, [&](int i) {
      gemm4_mma(copies.q(i), x_dev.data(), y.data(), OutType::bf16, tokens, MmaVersion::exact);
    }));
    variants.push_back(measure("mma v2", w4_bytes, w_deq, [&](int i) {
      gemm4_mma(copies.q(i), x_dev.data(), y.data(), OutType::bf16, tokens, MmaVersion::register_table);
    }));
    variants.push_back(measure("mma v3", w4_bytes, w_deq, [&](int i) {
      gemm4_mma(copies.q(i), x_dev.data(), y.data(), OutType::bf16, tokens, MmaVersion::pair_table, nullptr,
                &mma3_workspace);
    }));
    if (tokens <= kMaxGemvTokens) {
      variants.push_back(measure("gemv v4", w4_bytes, w_deq, [&](int i) {
        gemv4(copies.q(i), x_dev.data(), y.data(), tokens, GemvVersion::prefetch);
      }));
    }
    variants.push_back(measure("dequant+cuBLAS", w4_bytes, w_deq, [&](int i) {
      linear4_forward(ctx.cublas, copies.q(i), x_dev.data(), tokens, y.data(), OutType::bf16, scratch);
    }));
    entry["variants"] = variants;
    rows.push_back(entry);
  }
  return rows;
}
//! [bench-mma]

json bench_shape(Context& ctx, const Shape& s, bool quick) {
  std::printf("\n== %d x %d (out x in), NF4, blocksize 64, double quantization ==\n", s.out, s.in);
  std::fflush(stdout);
  const std::size_t n = static_cast<std::size_t>(s.out) * s.in;
  json result = {{"out", s.out}, {"in", s.in}, {"quant_type", "nf4"}, {"blocksize", 64}, {"double_quant", true}};

  // The weight, as bf16 (what cuBLAS multiplies) and its CPU quantization (the reference).
  const auto w_bf16 = to_bf16(normal_values(n, static_cast<std::uint64_t>(s.out) * 131 + static_cast<std::uint64_t>(s.in), 0.02f));
  const auto w_dev = to_device(std::span<const bf16>(w_bf16));
  std::printf("  CPU reference quantize + dequantize (%zu values)\n", n);
  std::fflush(stdout);
  const auto q_cpu = quantize_4bit(from_bf16(w_bf16), {s.out, s.in}, QuantType::nf4, 64, true);
  const auto w_deq = dequantize_4bit_bf16(q_cpu);

  // GPU quantize: checked byte for byte; if it fails, the CPU tensor stands in so the
  // other kernels can still be measured.
  DeviceQuant4 q;
  try {
    q = quantize4(w_dev.data(), {s.out, s.in}, QuantType::nf4, 64, true);
    std::string where;
    const auto at = first_quant_difference(q_cpu, q.download(), where);
    result["quantize"] = at < 0 ? json{{"valid", true}}
                                : failed("GPU quantize differs from quantize_4bit in " + where + " at " + std::to_string(at));
  } catch (const std::exception& e) {
    result["quantize"] = failed(e.what());
  }
  if (!result["quantize"]["valid"].get<bool>()) q = DeviceQuant4::upload(q_cpu);
  result["storage_bytes"] = q.storage_bytes();
  result["bits_per_parameter"] = 8.0 * static_cast<double>(q.storage_bytes()) / static_cast<double>(n);

  result["dequant"] = bench_dequant(ctx, q, w_deq);
  const WeightCopies copies(ctx, q, w_dev);
  result["gemv"] = bench_gemv(ctx, copies, w_bf16, w_deq, s);
  result["linear"] = bench_linear(ctx, q, w_bf16, w_deq, w_dev, s, quick ? std::vector<int>{512} : std::vector<int>{512, 4096});
  result["mma"] = bench_mma(ctx, copies, w_bf16, w_deq, s,
                            quick ? std::vector<int>{1, 8, 32, 512}
                                  : std::vector<int>{1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 4096});
  return result;
}

// ---------------------------------------------------------------------------------------------
// Report.

std::string num(const json& row, const char* key, const char* fmt) {
  if (!row.contains(key)) return "failed";
  char buf[32];
  std::snprintf(buf, sizeof buf, fmt, row[key].get<double>());
  return buf;
}

void print_table(const json& doc) {
  std::printf("\nqlora bench kernels — %s, %s; copy bandwidth %.0f GB/s (read + write), write bandwidth %.0f GB/s\n",
              doc["device"].get<std::string>().c_str(), doc["date"].get<std::string>().c_str(),
              doc["copy_bandwidth_gbs"].get<double>(), doc["write_bandwidth_gbs"].get<double>());
  std::printf("\n%-12s %-10s %10s %10s %8s\n", "shape", "dequant", "µs", "GB/s", "% copy");
  for (const auto& s : doc["shapes"]) {
    const std::string shape = std::to_string(s["out"].get<int>()) + "x" + std::to_string(s["in"].get<int>());
    for (const auto& d : s["dequant"])
      std::printf("%-12s v%d %-7s %10s %10s %8s\n", shape.c_str(), d["version"].get<int>(),
                  d["name"].get<std::string>().c_str(), num(d, "us", "%.1f").c_str(), num(d, "gbs", "%.0f").c_str(),
                  num(d, "pct_copy", "%.1f").c_str());
  }
  std::printf("\n%-12s %6s %12s %-10s %10s %10s\n", "shape", "tokens", "cuBLAS µs", "gemv", "µs", "speedup");
  for (const auto& s : doc["shapes"]) {
    const std::string shape = std::to_string(s["out"].get<int>()) + "x" + std::to_string(s["in"].get<int>());
    for (const auto& g : s["gemv"])
      for (const auto& v : g["variants"])
        std::printf("%-12s %6d %12s v%d %-7s %10s %10s\n", shape.c_str(), g["tokens"].get<int>(),
                    num(g, "cublas_us", "%.1f").c_str(), v["version"].get<int>(), v["name"].get<std::string>().c_str(),
                    num(v, "us", "%.1f").c_str(), num(v, "speedup_vs_cublas", "%.2fx").c_str());
  }
  std::printf("\n%-12s %6s %12s %12s %10s %14s\n", "shape", "tokens", "cuBLAS µs", "linear4 µs", "ratio",
              "cuBLAS TFLOPS");
  for (const auto& s : doc["shapes"]) {
    const std::string shape = std::to_string(s["out"].get<int>()) + "x" + std::to_string(s["in"].get<int>());
    for (const auto& l : s["linear"])
      std::printf("%-12s %6d %12s %12s %10s %14s\n", shape.c_str(), l["tokens"].get<int>(),
                  num(l, "cublas_us", "%.1f").c_str(), num(l, "linear4_us", "%.1f").c_str(),
                  num(l, "ratio_vs_cublas", "%.2fx").c_str(), num(l, "cublas_tflops", "%.0f").c_str());
  }
  std::printf("\n%-12s %6s %-15s %10s %9s %9s %10s %10s\n", "shape", "tokens", "matmul", "µs", "GB/s", "TFLOP/s",
              "time/cuBLAS", "speedup");
  for (const auto& s : doc["shapes"]) {
    const std::string shape = std::to_string(s["out"].get<int>()) + "x" + std::to_string(s["in"].get<int>());
    for (const auto& m : s["mma"])
      for (const auto& v : m["variants"]) {
        char speedup[16] = "";
        if (v.contains("time_vs_cublas"))
          std::snprintf(speedup, sizeof speedup, "%.2fx", 1.0 / v["time_vs_cublas"].get<double>());
        std::printf("%-12s %6d %-15s %10s %9s %9s %10s %10s\n", shape.c_str(), m["tokens"].get<int>(),
                    v["name"].get<std::string>().c_str(), num(v, "us", "%.1f").c_str(), num(v, "gbs", "%.0f").c_str(),
                    num(v, "tflops", "%.1f").c_str(), num(v, "time_vs_cublas", "%.3f").c_str(), speedup);
      }
  }
  int failures = 0;
  for (const auto& s : doc["shapes"]) {
    failures += !s["quantize"]["valid"].get<bool>();
    for (const auto& d : s["dequant"]) failures += !d["valid"].get<bool>();
    for (const auto& g : s["gemv"])
      for (const auto& v : g["variants"]) failures += !v["valid"].get<bool>();
    for (const auto& l : s["linear"]) failures += !l["valid"].get<bool>();
    for (const auto& m : s["mma"])
      for (const auto& v : m["variants"]) failures += !v["valid"].get<bool>();
  }
  std::printf("\nvalidation: %s\n", failures == 0 ? "every variant matched its CPU reference"
                                                   : (std::to_string(failures) + " variant(s) FAILED, see above").c_str());
}

/// "OUTxIN" (e.g. 8192x8192) -> Shape.
Shape parse_shape(const std::string& text) {
  const auto x = text.find('x');
  std::size_t end_out = 0, end_in = 0;
  int out = 0, in = 0;
  try {
    if (x == std::string::npos) throw std::invalid_argument("no x");
    out = std::stoi(text.substr(0, x), &end_out);
    in = std::stoi(text.substr(x + 1), &end_in);
  } catch (const std::exception&) {
    end_out = 0;
  }
  if (end_out == 0 || end_out != x || end_in != text.size() - x - 1 || out <= 0 || in <= 0) {
    throw std::invalid_argument("--shape: expected OUTxIN with positive sizes, e.g. 8192x8192; got '" + text + "'");
  }
  return {out, in};
}

void run_bench_kernels(const BenchKernelsArgs& a) {
  std::vector<Shape> shapes = a.quick ? std::vector<Shape>{{4096, 4096}, {8192, 8192}}
                                      : std::vector<Shape>{{4096, 4096}, {11008, 4096}, {8192, 8192}, {28672, 8192}};
  if (!a.shapes.empty()) {  // checked before the device is touched: a typo fails at once
    shapes.clear();
    for (const auto& text : a.shapes) shapes.push_back(parse_shape(text));
  }
  int device = 0;
  CUDA_CHECK(cudaGetDevice(&device));
  cudaDeviceProp prop{};
  CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
  Context ctx;
  ctx.l2_bytes = static_cast<std::size_t>(prop.l2CacheSize);
  ctx.reps = a.profile ? 0 : a.quick ? 7 : 15;
  std::printf("qlora bench kernels on %s (%d SMs, L2 %zu MiB)%s%s\n", prop.name, prop.multiProcessorCount,
              ctx.l2_bytes >> 20, a.quick ? ", quick" : "", a.profile ? ", profile (no timing)" : "");
  ctx.copy_gbs = copy_bandwidth_gbs(std::size_t{1} << (a.quick ? 29 : 30), ctx.reps);
  std::printf("copy bandwidth (cudaMemcpy D2D, read + write): %.0f GB/s\n", ctx.copy_gbs);
  const double write_gbs = write_bandwidth_gbs(std::size_t{1} << (a.quick ? 29 : 30), ctx.reps);
  std::printf("write bandwidth (cudaMemset): %.0f GB/s\n", write_gbs);

  char date[32];
  const std::time_t now = std::time(nullptr);
  std::strftime(date, sizeof date, "%Y-%m-%d", std::gmtime(&now));
  json doc = {{"benchmark", "qlora bench kernels"},
              {"device", prop.name},
              {"sm_count", prop.multiProcessorCount},
              {"l2_bytes", ctx.l2_bytes},
              {"date", date},
              {"quick", a.quick},
              {"repetitions", ctx.reps},
              {"copy_bandwidth_gbs", ctx.copy_gbs},
              {"write_bandwidth_gbs", write_gbs},
              {"shapes", json::array()}};
  // The JSON is rewritten after every shape ("complete": false until the end), so a run
  // cut short by a time limit still leaves what it measured.
  doc["complete"] = false;
  for (const auto& s : shapes) {
    doc["shapes"].push_back(bench_shape(ctx, s, a.quick));
    if (!a.json.empty() && !a.profile) qlora::write_text_atomic(a.json, doc.dump(2) + "\n");
  }
  if (a.profile) {
    std::printf("\nprofile run: every variant ran once (its validation), nothing was timed, no JSON written\n");
    return;
  }
  doc["complete"] = true;
  print_table(doc);
  if (!a.json.empty()) {
    qlora::write_text_atomic(a.json, doc.dump(2) + "\n");
    std::printf("wrote %s\n", a.json.c_str());
  }
}

#else

void run_bench_kernels(const BenchKernelsArgs&) {
  throw std::runtime_error(
      "bench kernels needs a CUDA build of qlora (configure with -DQLORA_CUDA=ON on a machine with nvcc)");
}

#endif


}  // namespace

QLORA_COMMAND([](CLI::App& app) {
  auto a = std::make_shared<BenchKernelsArgs>();
  auto* cmd = qlora::cli::command_group(app, "bench", "Benchmarks (each chapter adds its own)")->add_subcommand(
      "kernels",
      "Chapter 5: copy bandwidth, cuBLAS bf16 GEMM/GEMV, and our NF4 quantize/dequantize, fused 4-bit GEMV,\n"
      "dequantize+GEMM linear and fused 4-bit matmul on tensor cores on LLaMA weight shapes, each validated\n"
      "before it is timed (needs a CUDA GPU)");
  cmd->add_option("--json", a->json, "also write the results as JSON to this file");
  cmd->add_flag("--quick", a->quick,
                "two shapes, fewer repetitions, linear at 512 tokens only, matmul at 1, 8, 32 and 512 tokens");
  cmd->add_option("--shape", a->shapes, "only these weight shapes, OUTxIN (repeatable), e.g. --shape 8192x8192");
  cmd->add_flag("--profile", a->profile,
                "for a profiler (ncu): run every variant once, for its validation, and time nothing");
  cmd->callback([a] { run_bench_kernels(*a); });
});
