// `qlora demo` (chapter 3 for now): quantizes a real llama2.c checkpoint
// (stories260K.bin, found through the model search path) to NF4, NF4 with double
// quantization and FP4 at blocksize 64, and prints the per-tensor error and the
// bits/parameter table. The work is quantize_model.hpp's, as for `qlora quantize`.
#include "command.hpp"
#include "quantize_model.hpp"
#include "search_path.hpp"

#include <algorithm>
#include <cstdio>
#include <string>
#include <memory>

namespace {

void run_demo(const std::string& model) {
  const auto path = qlora::require_model(model);
  std::printf("qlora demo: 4-bit quantization of %s (blocksize 64)\n\n", path.string().c_str());
  const qlora::QuantizeOptions configs[] = {
      {qlora::QuantType::nf4, 64, false}, {qlora::QuantType::nf4, 64, true}, {qlora::QuantType::fp4, 64, false}};
  std::vector<qlora::QuantizeResult> results;
  for (const auto& c : configs) results.push_back(qlora::quantize_checkpoint(path, c));

  std::printf("relative Frobenius error ||W - deq(W)|| / ||W|| per tensor\n");
  std::printf("%-42s %-9s", "tensor", "shape");
  for (const auto& r : results) std::printf(" %9s", r.options.label().c_str());
  std::printf("\n");
  for (std::size_t i = 0; i < results[0].tensors.size(); ++i) {
    const auto& t = results[0].tensors[i];
    std::string shape;
    for (auto d : t.shape) {
      if (!shape.empty()) shape += 'x';
      shape += std::to_string(d);
    }
    std::printf("%-42s %-9s", t.name.c_str(), shape.c_str());
    for (const auto& r : results) std::printf(" %9.5f", r.tensors[i].error.rel_frobenius);
    std::printf("\n");
  }

  std::printf("\n%-8s %14s %12s %12s %14s %14s\n", "format", "parameters", "bytes", "bits/param", "mean rel Frob",
              "max |err|");
  for (const auto& r : results) {
    double sum = 0, worst = 0;
    for (const auto& t : r.tensors) sum += t.error.rel_frobenius, worst = std::max(worst, t.error.max_abs);
    std::printf("%-8s %14lld %12lld %12.4f %14.5f %14.3e\n", r.options.label().c_str(),
                static_cast<long long>(r.quantized_parameters()), static_cast<long long>(r.stored_bytes()),
                r.bits_per_parameter(), sum / static_cast<double>(r.tensors.size()), worst);
  }
  std::printf("\nbits/param = stored codes + scales (+ nested scales + offset) × 8 / parameters of the 2-D weights;\n"
              "norms stay BF16. `qlora quantize` writes these files; chapter 3 explains the numbers.\n");
}

}  // namespace

QLORA_COMMAND([](CLI::App& app) {
  auto model = std::make_shared<std::string>("stories260K.bin");
  auto* cmd = app.add_subcommand(
      "demo", "Quantize a real checkpoint (stories260K.bin) to NF4, NF4+DQ and FP4 and print the error and "
              "bits/parameter tables");
  cmd->add_option("--model", *model, "llama2.c .bin or .safetensors file, a path or a name in the model search path")
      ->capture_default_str();
  cmd->callback([model] { run_demo(*model); });
});
