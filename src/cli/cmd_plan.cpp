// `qlora plan`: parameter counts and the memory of full fine-tuning vs QLoRA for
// LLaMA shapes (chapter 4, "How small is LoRA?"). The arithmetic and its
// conventions are in memory_plan.hpp; this file only prints them.
#include "command.hpp"
#include "memory_plan.hpp"

#include <nlohmann/json.hpp>

#include <cstdio>
#include <iostream>
#include <memory>

namespace {

struct PlanOptions {
  std::vector<std::string> models = {"7B", "13B", "33B", "65B"};
  std::vector<int> ranks = {8, 16, 64};
  bool json = false;
};

double gb(double bytes) { return bytes / 1e9; }

void print_json(const std::vector<qlora::MemoryPlan>& plans) {
  nlohmann::json rows = nlohmann::json::array();
  for (const auto& m : plans)
    rows.push_back({{"model", m.shape.name},
                    {"dim", m.shape.dim},
                    {"hidden", m.shape.hidden},
                    {"layers", m.shape.layers},
                    {"heads", m.shape.heads},
                    {"vocab", m.shape.vocab},
                    {"r", m.r},
                    {"base_params", m.params.total()},
                    {"linear_params", m.params.linear},
                    {"lora_params", m.lora_params},
                    {"lora_percent", m.lora_percent},
                    {"base_bf16_bytes", m.base_bf16},
                    {"base_nf4_bytes", m.base_nf4},
                    {"base_nf4_dq_bytes", m.base_nf4_dq},
                    {"lora_training_bytes", m.lora_training},
                    {"full_finetune_bytes", m.full_finetune},
                    {"qlora_total_bytes", m.qlora_total}});
  nlohmann::json out = {
      {"conventions",
       {{"gb", "1e9 bytes"},
        {"nf4_bits_per_param", qlora::quant4_bits_per_param(false)},
        {"nf4_dq_bits_per_param", qlora::quant4_bits_per_param(true)},
        {"quantized", "the seven linear projections; embedding, output head and norms stay BF16"},
        {"full_finetune_bytes_per_param", 12},
        {"lora_training_bytes_per_param", 16},
        {"activations", "not included"}}},
      {"plans", rows}};
  std::cout << out.dump(2) << "\n";
}

void print_table(const std::vector<qlora::MemoryPlan>& plans) {
  std::printf("Parameters and memory of LLaMA fine-tuning (GB = 1e9 bytes; activations not included)\n");
  std::printf("  base NF4 = linear layers at %.3f bits/param, NF4+DQ = %.3f bits/param; embeddings, head, norms BF16\n",
              qlora::quant4_bits_per_param(false), qlora::quant4_bits_per_param(true));
  std::printf("  full FT = 12 B/param (BF16 weights + BF16 grads + FP32 Adam m, v)\n");
  std::printf("  LoRA train = 16 B/LoRA param (FP32 A, B + FP32 grads + FP32 AdamW m, v); QLoRA = NF4+DQ base + LoRA train\n\n");
  std::printf("%-5s %3s %15s %12s %7s %9s %8s %8s %8s %10s %9s\n", "model", "r", "base params", "LoRA params",
              "LoRA %", "BF16 GB", "NF4 GB", "DQ GB", "LoRA GB", "full FT GB", "QLoRA GB");
  for (const auto& m : plans)
    std::printf("%-5s %3d %15lld %12lld %7.3f %9.2f %8.2f %8.2f %8.2f %10.1f %9.2f\n", m.shape.name.c_str(), m.r,
                static_cast<long long>(m.params.total()), static_cast<long long>(m.lora_params), m.lora_percent,
                gb(m.base_bf16), gb(m.base_nf4), gb(m.base_nf4_dq), gb(m.lora_training), gb(m.full_finetune),
                gb(m.qlora_total));
}

}  // namespace

QLORA_COMMAND([](CLI::App& app) {
  auto opt = std::make_shared<PlanOptions>();
  auto* cmd = app.add_subcommand(
      "plan", "Chapter 4: parameter counts and memory (BF16 / NF4 / NF4+DQ base, LoRA, full FT vs QLoRA) for LLaMA");
  cmd->add_option("--model", opt->models, "model sizes: 7B 13B 33B 65B")->capture_default_str();
  cmd->add_option("--rank,-r", opt->ranks, "LoRA ranks")->capture_default_str()->check(qlora::cli::positive);
  cmd->add_flag("--json", opt->json, "print JSON instead of a table");
  cmd->callback([opt] {
    std::vector<qlora::MemoryPlan> plans;
    for (const auto& name : opt->models)
      for (int r : opt->ranks) plans.push_back(qlora::plan_memory(qlora::llama_shape(name), r));
    if (opt->json)
      print_json(plans);
    else
      print_table(plans);
  });
});
