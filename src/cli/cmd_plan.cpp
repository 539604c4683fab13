// `qlora plan`: parameter counts and the memory of full fine-tuning vs QLoRA for
// LLaMA shapes (chapter 4, "How small is LoRA?"), and with --batch the device memory
// of one training step of chapter 7's GPU model, buffer by buffer. The arithmetic and
// its conventions are in memory_plan.hpp; this file only prints them.
#include "command.hpp"
#include "memory_plan.hpp"
#include "model_shapes.hpp"

#include <nlohmann/json.hpp>

#include <cstdio>
#include <iostream>
#include <memory>

namespace {

struct PlanOptions {
  std::vector<std::string> models = {"7B", "13B", "33B", "65B"};
  std::vector<int> ranks = {8, 16, 64};
  bool json = false;
  // One training step (--batch > 0).
  int batch = 0, seq_len = 512;
  float dropout = 0.05f;
  std::string storage = "nf4-dq", optim = "paged_adamw_32bit";
  bool no_checkpointing = false, offload_checkpoints = false, states_on_host = false;
};

constexpr double kGiB = 1073741824.0;

void print_training(const PlanOptions& o) {
  qlora::TrainingSetup s;
  s.batch = o.batch;
  s.seq_len = o.seq_len;
  s.dropout = o.dropout;
  s.storage = qlora::parse_base_storage(o.storage);
  s.optim = qlora::parse_optim(o.optim);
  s.checkpointing = !o.no_checkpointing;
  s.offload_checkpoints = o.offload_checkpoints;
  s.states_on_device = !o.states_on_host;
  nlohmann::json rows = nlohmann::json::array();
  for (const auto& name : o.models)
    for (int r : o.ranks) {
      s.rank = r;
      const qlora::TrainingMemoryPlan p = qlora::plan_training_memory(qlora::model_shape(name), s);
      if (o.json) {
        nlohmann::json items = nlohmann::json::array();
        for (const auto& i : p.items) items.push_back({{"group", i.group}, {"name", i.name}, {"bytes", i.bytes}});
        rows.push_back({{"model", name}, {"r", r}, {"batch", s.batch}, {"seq_len", s.seq_len},
                        {"total_bytes", p.total()}, {"items", items}});
        continue;
      }
      std::printf("%s, r %d, batch %d × seq %d, %s, %s%s%s: %.2f GiB (%.2f GB) at the peak of a step\n", name.c_str(), r,
                  s.batch, s.seq_len, o.storage.c_str(), o.optim.c_str(),
                  s.checkpointing ? ", checkpointing" : "", s.offload_checkpoints ? ", inputs offloaded" : "",
                  p.total() / kGiB, p.total() / 1e9);
      std::string group;
      for (const auto& i : p.items) {
        if (i.group != group) std::printf("  %-18s %8.3f GiB\n", (group = i.group).c_str(), p.group(i.group) / kGiB);
        std::printf("    %-28s %8.3f GiB\n", i.name.c_str(), i.bytes / kGiB);
      }
    }
  if (o.json) std::cout << nlohmann::json{{"training_plans", rows}}.dump(2) << "\n";
}

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
  cmd->add_option("--batch", opt->batch,
                  "plan one training step of the GPU model at this batch size (chapter 7), instead of the table; "
                  "--model then also takes 70b, llama3-8b or a config.json")
      ->check(qlora::cli::positive);
  cmd->add_option("--seq-len", opt->seq_len, "with --batch: tokens per sequence")->capture_default_str()->check(qlora::cli::positive);
  cmd->add_option("--dropout", opt->dropout, "with --batch: LoRA dropout")->capture_default_str();
  cmd->add_option("--storage", opt->storage, "with --batch: base storage")->capture_default_str();
  cmd->add_option("--optim", opt->optim, "with --batch: optimizer")->capture_default_str();
  cmd->add_flag("--no-checkpointing", opt->no_checkpointing, "with --batch: keep every layer's activations");
  cmd->add_flag("--offload-checkpoints", opt->offload_checkpoints, "with --batch: checkpointed inputs in host memory");
  cmd->add_flag("--states-on-host", opt->states_on_host, "with --batch: optimizer states in host memory");
  cmd->callback([opt] {
    if (opt->batch > 0) return print_training(*opt);
    std::vector<qlora::MemoryPlan> plans;
    for (const auto& name : opt->models)
      for (int r : opt->ranks) plans.push_back(qlora::plan_memory(qlora::llama_shape(name), r));
    if (opt->json)
      print_json(plans);
    else
      print_table(plans);
  });
});
