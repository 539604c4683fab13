// `qlora bench optim` (chapter 6): what paging the optimizer states buys. A training-like
// loop whose activation memory spikes (short and long "sequences" alternate; each step
// cudaMallocs its activation buffer, writes it and frees it) runs with three optimizers
// over the same parameters: AdamW with states in cudaMalloc memory, paged AdamW 32-bit
// and paged AdamW 8-bit, the paged ones moving their states to host memory before each
// long step. Reported per optimizer, each iteration measured at its activation peak:
//  - "used": cudaMemGetInfo's total − free above the run's baseline. It counts every page
//    the driver holds, including the GPU pages nvidia-uvm keeps for managed memory that
//    page_out() moved to the host (they stay allocated, marked unused, and are evicted
//    first when cudaMalloc needs room; chapter 6), so it does NOT show what paging saves;
//  - "resident" (JSON key accounted_mib): what actually occupies the GPU: parameters,
//    gradients and activations (cudaMalloc) plus the states when the driver records their
//    last prefetch as the GPU (cudaMemRangeAttributeLastPrefetchLocationType, read after a
//    synchronize, so the prefetch has completed);
// and the time of the optimizer step and of the page-out. The numbers go to
// docs/benchmarks.md and the notebook notebooks/06-paged-optimizers.ipynb plots the JSON.
#include "command.hpp"

#include "atomic_file.hpp"

#include <nlohmann/json.hpp>

#include <cstdio>
#include <memory>
#include <stdexcept>
#include <string>

#ifdef QLORA_HAVE_CUDA
#include "adamw.cuh"
#include "paged.cuh"

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <ctime>
#include <vector>
#endif

namespace {

struct BenchOptimArgs {
  std::string json;
  int params_m = 128;    // millions of parameters (FP32), split into 8 tensors
  int short_mib = 256;   // activation buffer of a short step
  int long_mib = 2048;   // activation buffer of a long step
  int iters = 20;        // measured iterations, alternating short and long
};

#ifdef QLORA_HAVE_CUDA

using qlora::cuda::StatePlacement;

constexpr double kMiB = 1024.0 * 1024.0;

std::size_t used_bytes() {
  const auto m = qlora::cuda::device_memory();
  return m.total - m.free;
}

/// Deterministic values in [-scale/2, scale/2) without a slow host RNG (a multiplicative hash).
std::vector<float> hashed_values(std::size_t n, std::uint32_t seed, float scale) {
  std::vector<float> v(n);
  for (std::size_t i = 0; i < n; ++i) {
    const std::uint32_t h = (static_cast<std::uint32_t>(i) ^ seed) * 2654435761u;
    v[i] = scale * (static_cast<float>(h >> 8) / 16777216.0f - 0.5f);
  }
  return v;
}

/// Parameters and gradients of the run, in plain device memory.
struct Model {
  std::vector<float*> value, grad;
  std::size_t per_tensor = 0;
  Model(std::size_t n_tensors, std::size_t per) : per_tensor(per) {
    const auto p = hashed_values(per, 1, 0.1f), g = hashed_values(per, 2, 2e-3f);
    for (std::size_t t = 0; t < n_tensors; ++t) {
      value.push_back(nullptr);
      grad.push_back(nullptr);
      CUDA_CHECK(cudaMalloc(&value.back(), per * sizeof(float)));
      CUDA_CHECK(cudaMalloc(&grad.back(), per * sizeof(float)));
      CUDA_CHECK(cudaMemcpy(value.back(), p.data(), per * sizeof(float), cudaMemcpyHostToDevice));
      CUDA_CHECK(cudaMemcpy(grad.back(), g.data(), per * sizeof(float), cudaMemcpyHostToDevice));
    }
  }
  ~Model() {
    for (auto* p : value) cudaFree(p);
    for (auto* g : grad) cudaFree(g);
  }
  Model(const Model&) = delete;
  Model& operator=(const Model&) = delete;
  std::vector<qlora::cuda::DeviceParam> params() const {
    std::vector<qlora::cuda::DeviceParam> out;
    for (std::size_t t = 0; t < value.size(); ++t)
      out.push_back({"layer" + std::to_string(t), value[t], grad[t], per_tensor});
    return out;
  }
  std::size_t bytes() const { return 2 * value.size() * per_tensor * sizeof(float); }
};

/// The three optimizers behind one interface.
struct AnyOptimizer {
  std::unique_ptr<qlora::cuda::CudaAdamW> a32;
  std::unique_ptr<qlora::cuda::CudaAdamW8bit> a8;
  void step(float lr) { a32 ? a32->step(lr) : a8->step(lr); }
  void page_out() { a32 ? a32->page_out() : a8->page_out(); }
  std::size_t state_bytes() const { return a32 ? a32->state_bytes() : a8->state_bytes(); }
  qlora::cuda::PrefetchLocation state_location() const { return a32 ? a32->state_location() : a8->state_location(); }
};

struct Variant {
  const char* name;
  bool eight_bit;
  StatePlacement placement;
};

double elapsed_ms(cudaEvent_t a, cudaEvent_t b) {
  float ms = 0;
  CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
  return ms;
}

//! [bench_iteration]
nlohmann::json run_variant(const Variant& v, const BenchOptimArgs& a) {
  const std::size_t per = static_cast<std::size_t>(a.params_m) * 1'000'000 / 8;
  const std::size_t short_bytes = static_cast<std::size_t>(a.short_mib) << 20;
  const std::size_t long_bytes = static_cast<std::size_t>(a.long_mib) << 20;
  CUDA_CHECK(cudaDeviceSynchronize());
  const std::size_t baseline = used_bytes();

  Model model(8, per);
  AnyOptimizer opt;
  const qlora::AdamWConfig cfg{0.9f, 0.999f, 1e-8f, 0.0f};
  if (v.eight_bit)
    opt.a8 = std::make_unique<qlora::cuda::CudaAdamW8bit>(model.params(), cfg, v.placement);
  else
    opt.a32 = std::make_unique<qlora::cuda::CudaAdamW>(model.params(), cfg, v.placement);
  const bool paged = v.placement == StatePlacement::Paged;

  cudaEvent_t e0, e1;
  CUDA_CHECK(cudaEventCreate(&e0));
  CUDA_CHECK(cudaEventCreate(&e1));
  for (int w = 0; w < 2; ++w) opt.step(2e-4f);  // warm-up: first-touch and launch costs
  CUDA_CHECK(cudaDeviceSynchronize());

  nlohmann::json samples = nlohmann::json::array();
  std::size_t peak_used = 0, peak_accounted = 0;
  double step_ms_sum = 0, step_after_out_sum = 0, out_ms_sum = 0, iter_ms_sum = 0;
  int after_out = 0, outs = 0, location_surprises = 0;
  for (int it = 0; it < a.iters; ++it) {
    const bool is_long = it % 2 == 1;
    const auto t0 = std::chrono::steady_clock::now();
    bool states_out = false;
    if (paged && is_long) {  // make room: the states leave the GPU for the long step
      CUDA_CHECK(cudaEventRecord(e0));
      opt.page_out();
      CUDA_CHECK(cudaEventRecord(e1));
      CUDA_CHECK(cudaEventSynchronize(e1));
      out_ms_sum += elapsed_ms(e0, e1);
      ++outs;
      states_out = true;
    }
    // "Forward and backward": the activations of this step exist only inside it.
    const std::size_t act = is_long ? long_bytes : short_bytes;
    void* activations = nullptr;
    CUDA_CHECK(cudaMalloc(&activations, act));
    CUDA_CHECK(cudaMemset(activations, it & 0xff, act));
    CUDA_CHECK(cudaDeviceSynchronize());
    const std::size_t used = used_bytes() - baseline;  // the peak moment of the iteration
    const qlora::cuda::PrefetchLocation where = opt.state_location();  // the page-out has completed
    if (states_out == where.is_device()) ++location_surprises;  // reported, not hidden
    const std::size_t accounted = model.bytes() + (where.is_device() ? opt.state_bytes() : 0) + act;
    CUDA_CHECK(cudaFree(activations));
    // Optimizer step (a paged optimizer prefetches its states back first).
    CUDA_CHECK(cudaEventRecord(e0));
    opt.step(2e-4f);
    CUDA_CHECK(cudaEventRecord(e1));
    CUDA_CHECK(cudaEventSynchronize(e1));
    const double step_ms = elapsed_ms(e0, e1);
    const double iter_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    const std::size_t used_after = used_bytes() - baseline;
    peak_used = std::max({peak_used, used, used_after});
    peak_accounted = std::max({peak_accounted, accounted, model.bytes() + opt.state_bytes()});
    step_ms_sum += step_ms;
    if (states_out) step_after_out_sum += step_ms, ++after_out;
    iter_ms_sum += iter_ms;
    samples.push_back({{"iter", it},
                       {"long", is_long},
                       {"activation_mib", double(act) / kMiB},
                       {"used_mib", double(used) / kMiB},
                       {"accounted_mib", double(accounted) / kMiB},
                       {"states_last_prefetch", qlora::cuda::to_string(where.type)},
                       {"used_after_step_mib", double(used_after) / kMiB},
                       {"step_ms", step_ms},
                       {"iter_ms", iter_ms}});
  }
  CUDA_CHECK(cudaEventDestroy(e0));
  CUDA_CHECK(cudaEventDestroy(e1));
  return {{"name", v.name},
          {"eight_bit", v.eight_bit},
          {"placement", qlora::cuda::to_string(v.placement)},
          {"state_mib", double(opt.state_bytes()) / kMiB},
          {"params_grads_mib", double(model.bytes()) / kMiB},
          {"peak_used_mib", double(peak_used) / kMiB},
          {"peak_accounted_mib", double(peak_accounted) / kMiB},
          {"mean_step_ms", step_ms_sum / a.iters},
          {"mean_step_ms_after_page_out", after_out ? step_after_out_sum / after_out : 0.0},
          {"mean_page_out_ms", outs ? out_ms_sum / outs : 0.0},
          {"mean_iter_ms", iter_ms_sum / a.iters},
          {"location_surprises", location_surprises},  // iterations whose recorded location was not the requested one
          {"samples", samples}};
}
//! [bench_iteration]

void run_bench_optim(const BenchOptimArgs& a) {
  if (a.params_m < 1 || a.short_mib < 1 || a.long_mib < a.short_mib || a.iters < 2)
    throw std::invalid_argument(
        "bench optim: need --params-m >= 1, 1 <= --short-mib <= --long-mib and --iters >= 2");
  int device = 0;
  CUDA_CHECK(cudaGetDevice(&device));
  cudaDeviceProp prop{};
  CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
  // The plain optimizer's peak must fit with room to spare; refuse before allocating anything.
  const std::size_t n = static_cast<std::size_t>(a.params_m) * 1'000'000;
  const std::size_t need = 16 * n + (static_cast<std::size_t>(a.long_mib) << 20);
  qlora::cuda::check_managed_request(need, qlora::cuda::kManagedSafetyMargin, "bench optim workload");

  const Variant variants[] = {{"AdamW 32-bit (cudaMalloc states)", false, StatePlacement::Device},
                              {"paged AdamW 32-bit", false, StatePlacement::Paged},
                              {"paged AdamW 8-bit", true, StatePlacement::Paged}};
  nlohmann::json results = nlohmann::json::array();
  // 1 lets cudaMalloc evict managed pages (nvidia-uvm's PMA eviction): the condition for paging to help.
  const std::string oversub = qlora::cuda::uvm_module_parameter("uvm_global_oversubscription");
  std::printf("qlora bench optim on %s: %d M parameters (FP32, 8 tensors), activations %d MiB (short) / %d MiB "
              "(long), %d iterations\n",
              prop.name, a.params_m, a.short_mib, a.long_mib, a.iters);
  for (const auto& v : variants) {
    std::printf("  running %s ...\n", v.name);
    std::fflush(stdout);
    results.push_back(run_variant(v, a));
  }
  std::printf("\n%-34s %10s %14s %14s %12s %14s %12s\n", "optimizer", "state MiB", "peak used MiB",
              "resident MiB", "step ms", "page-out ms", "iter ms");
  for (const auto& r : results) {
    if (r["location_surprises"].get<int>() > 0)
      std::printf("WARNING: %s: %d iterations found the states' recorded prefetch location differing from the "
                  "one requested\n",
                  r["name"].get<std::string>().c_str(), r["location_surprises"].get<int>());
    std::printf("%-34s %10.0f %14.0f %14.0f %12.3f %14.3f %12.3f\n", r["name"].get<std::string>().c_str(),
                r["state_mib"].get<double>(), r["peak_used_mib"].get<double>(), r["peak_accounted_mib"].get<double>(),
                r["mean_step_ms"].get<double>(), r["mean_page_out_ms"].get<double>(), r["mean_iter_ms"].get<double>());
  }
  std::printf("(peak used: cudaMemGetInfo total - free above the baseline, which still counts the GPU pages the "
              "driver keeps\n for paged-out managed memory; resident: params + grads + activations (cudaMalloc) + "
              "states whose last\n prefetch went to the GPU, i.e. what occupies the GPU; nvidia_uvm "
              "uvm_global_oversubscription=%s)\n",
              oversub.empty() ? "unreadable" : oversub.c_str());

  if (!a.json.empty()) {
    char date[32];
    const std::time_t now = std::time(nullptr);
    std::strftime(date, sizeof date, "%Y-%m-%d", std::gmtime(&now));
    const nlohmann::json doc = {{"benchmark", "qlora bench optim"},
                                {"device", prop.name},
                                {"date", date},
                                {"params", n},
                                {"short_activation_mib", a.short_mib},
                                {"long_activation_mib", a.long_mib},
                                {"iters", a.iters},
                                {"uvm_global_oversubscription", oversub},
                                {"memory_measures",
                                 {{"used_mib", "cudaMemGetInfo total - free above the baseline before the run, at the "
                                               "activation peak; includes GPU pages nvidia-uvm keeps for paged-out "
                                               "managed memory"},
                                  {"accounted_mib", "resident: params + grads + activations (cudaMalloc) + optimizer "
                                                    "states whose last prefetch went to the GPU"}}},
                                {"variants", results}};
    qlora::write_text_atomic(a.json, doc.dump(2) + "\n");
    std::printf("wrote %s\n", a.json.c_str());
  }
}

#else

void run_bench_optim(const BenchOptimArgs&) {
  throw std::runtime_error(
      "bench optim needs a CUDA build of qlora (configure with -DQLORA_CUDA=ON on a machine with nvcc)");
}

#endif


}  // namespace

QLORA_COMMAND([](CLI::App& app) {
  auto a = std::make_shared<BenchOptimArgs>();
  auto* cmd = qlora::cli::command_group(app, "bench", "Benchmarks (each chapter adds its own)")->add_subcommand(
      "optim",
      "Chapter 6: peak GPU memory and step time of AdamW with device states, paged AdamW 32-bit and\n"
      "paged AdamW 8-bit under alternating short/long activation spikes (needs a CUDA GPU)");
  cmd->add_option("--json", a->json, "also write the results as JSON to this file");
  cmd->add_option("--params-m", a->params_m, "millions of FP32 parameters")->capture_default_str();
  cmd->add_option("--short-mib", a->short_mib, "activation MiB of a short step")->capture_default_str();
  cmd->add_option("--long-mib", a->long_mib, "activation MiB of a long step")->capture_default_str();
  cmd->add_option("--iters", a->iters, "measured iterations (short and long alternate)")->capture_default_str();
  cmd->callback([a] { run_bench_optim(*a); });
});
