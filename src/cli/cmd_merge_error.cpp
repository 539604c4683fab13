// `qlora merge-error`: what merging a LoRA adapter into a 4-bit base costs
// (chapter 4, "Merging into a 4-bit base"). Quantizes a weight matrix (random
// normal, or a real one from a safetensors checkpoint), builds adapters whose
// update s·B·A has a chosen size relative to the weights, and reports the error
// of merging into BF16 vs dequantize → merge → requantize. See lora_merge.hpp.
#include "command.hpp"
#include "lora_merge.hpp"
#include "safetensors.hpp"
#include "search_path.hpp"

#include <nlohmann/json.hpp>

#include <cstdio>
#include <filesystem>
#include <iostream>
#include <memory>
#include <stdexcept>

namespace {

struct MergeOptions {
  std::string model;  // empty: random weights
  std::string tensor = "model.layers.0.self_attn.q_proj.weight";
  int in = 4096, out = 4096;
  double weight_std = 0.02;
  int r = 16;
  float alpha = 16.0f;
  std::vector<double> ratios = {0.001, 0.01, 0.1};
  std::string quant = "nf4";
  int blocksize = 64;
  bool no_double_quant = false;
  std::uint64_t seed = 1234;
  bool json = false;
};

// The weight matrix to merge into: a tensor from a checkpoint, or random normal values.
std::vector<float> load_weights(MergeOptions& o, std::mt19937_64& rng, std::string& source) {
  if (o.model.empty()) {
    char buf[96];
    std::snprintf(buf, sizeof buf, "random normal(0, %g) %dx%d", o.weight_std, o.out, o.in);
    source = buf;
    return qlora::normal_weights(static_cast<std::size_t>(o.out) * o.in, o.weight_std, rng);
  }
  std::filesystem::path file = qlora::require_model(o.model);
  if (std::filesystem::is_directory(file)) file /= "model.safetensors";
  const qlora::SafeTensors st = qlora::read_safetensors(file);
  if (!st.contains(o.tensor))
    throw std::invalid_argument(file.string() + ": no tensor '" + o.tensor + "' (--tensor)");
  const qlora::Tensor& t = st.at(o.tensor);
  if (t.shape.size() != 2)
    throw std::invalid_argument(file.string() + ": tensor '" + o.tensor + "' is not a matrix (--tensor)");
  o.out = static_cast<int>(t.shape[0]);
  o.in = static_cast<int>(t.shape[1]);
  source = file.string() + " : " + o.tensor + " (" + std::to_string(o.out) + "x" + std::to_string(o.in) + ", " +
           qlora::to_string(t.dtype) + ")";
  return t.to_f32();
}

void run(MergeOptions& o) {
  std::mt19937_64 rng(o.seed);
  std::string source;
  const std::vector<float> W = load_weights(o, rng, source);
  qlora::LoraConfig cfg;
  cfg.r = o.r;
  cfg.alpha = o.alpha;
  const auto type = qlora::parse_quant_type(o.quant);
  nlohmann::json rows = nlohmann::json::array();
  double weight_rms = 0.0;
  for (float w : W) weight_rms += (double)w * w;
  weight_rms = std::sqrt(weight_rms / static_cast<double>(W.size()));
  if (!o.json) {
    std::printf("weights: %s, rms %.4g\n", source.c_str(), weight_rms);
    std::printf("base: %s blocksize %d%s; adapter r=%d alpha=%g (synthetic: PEFT-init A, normal B rescaled)\n",
                o.quant.c_str(), o.blocksize, o.no_double_quant ? "" : " + double quant", o.r, (double)o.alpha);
    std::printf("errors vs the exact merge deq(Wq) + s·B·A (rms over all weights)\n\n");
    std::printf("%10s %12s %12s %12s %12s %12s %12s\n", "delta/W", "delta rms", "base q err", "BF16 merge",
                "BF16/delta", "4-bit merge", "4-bit/delta");
  }
  for (double ratio : o.ratios) {
    const qlora::LoraAdapter ad = qlora::synthetic_adapter(o.in, o.out, cfg, ratio * weight_rms, rng);
    const qlora::MergeError m = qlora::measure_merge_error(W, ad, cfg, type, o.blocksize, !o.no_double_quant);
    if (o.json)
      rows.push_back({{"delta_ratio", ratio},
                      {"weight_rms", m.weight_rms},
                      {"base_quant_rms", m.base_quant_rms},
                      {"delta_rms", m.delta_rms},
                      {"bf16_rms", m.bf16_rms},
                      {"bf16_max", m.bf16_max},
                      {"bf16_delta_rel", m.bf16_delta_rel},
                      {"q4_rms", m.q4_rms},
                      {"q4_max", m.q4_max},
                      {"q4_delta_rel", m.q4_delta_rel}});
    else
      std::printf("%10g %12.4g %12.4g %12.4g %12.4g %12.4g %12.4g\n", ratio, m.delta_rms, m.base_quant_rms, m.bf16_rms,
                  m.bf16_delta_rel, m.q4_rms, m.q4_delta_rel);
  }
  if (o.json)
    std::cout << nlohmann::json{{"weights", source}, {"quant", o.quant}, {"blocksize", o.blocksize},
                                {"double_quant", !o.no_double_quant}, {"r", o.r}, {"alpha", o.alpha},
                                {"rows", rows}}
                     .dump(2)
              << "\n";
}

}  // namespace

QLORA_COMMAND([](CLI::App& app) {
  auto o = std::make_shared<MergeOptions>();
  auto* cmd = app.add_subcommand(
      "merge-error", "Chapter 4: error of merging LoRA into a 4-bit base (BF16 merge vs dequantize-merge-requantize)");
  cmd->add_option("--model", o->model, "checkpoint folder or .safetensors file (default: random weights)");
  cmd->add_option("--tensor", o->tensor, "weight matrix to use from --model")->capture_default_str();
  cmd->add_option("--in", o->in, "random weights: input features")->capture_default_str()->check(qlora::cli::positive);
  cmd->add_option("--out", o->out, "random weights: output features")->capture_default_str()->check(qlora::cli::positive);
  cmd->add_option("--weight-std", o->weight_std, "random weights: standard deviation")
      ->capture_default_str()
      ->check(qlora::cli::positive);
  cmd->add_option("--rank,-r", o->r, "LoRA rank")->capture_default_str()->check(qlora::cli::positive);
  cmd->add_option("--alpha", o->alpha, "LoRA alpha")->capture_default_str()->check(qlora::cli::positive);
  cmd->add_option("--ratio", o->ratios, "rms(s·B·A) / rms(W) of the synthetic adapters")
      ->capture_default_str()
      ->check(qlora::cli::positive);
  cmd->add_option("--quant", o->quant, "nf4 or fp4")->capture_default_str();
  cmd->add_option("--blocksize", o->blocksize, "4-bit block size")->capture_default_str();
  cmd->add_flag("--no-double-quant", o->no_double_quant, "store the block absmax in float32");
  cmd->add_option("--seed", o->seed, "random seed")->capture_default_str();
  cmd->add_flag("--json", o->json, "print JSON");
  cmd->callback([o] { run(*o); });
});
