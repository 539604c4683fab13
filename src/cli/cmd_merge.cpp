// `qlora merge` (chapter 7, "Merging and exporting"): base model + PEFT adapter →
// a Hugging Face LLaMA folder (BF16) with the adapter folded into the weights. The
// work is in model_merge.hpp; this file only parses flags and prints.
#include "command.hpp"
#include "model_merge.hpp"
#include "search_path.hpp"

#include <cstdio>
#include <memory>

QLORA_COMMAND([](CLI::App& app) {
  struct Options {
    std::string model = "kjv15M.bin";
    std::string adapter;
    std::string out;
  };
  auto o = std::make_shared<Options>();
  auto* cmd = app.add_subcommand(
      "merge",
      "Chapter 7: fold a PEFT adapter into its base, W' = W + s·B·A, and write a Hugging Face LLaMA folder "
      "(config.json + model.safetensors, BF16)");
  cmd->add_option("--model", o->model, "base: llama2.c .bin or Hugging Face folder (name searched in the model path)")
      ->capture_default_str();
  cmd->add_option("--adapter", o->adapter, "PEFT adapter folder (e.g. the adapter/ that qlora finetune writes)")
      ->required();
  cmd->add_option("--out", o->out, "output folder (created; its files are replaced atomically)")->required();
  cmd->callback([o] {
    const auto mp = qlora::require_model(o->model);
    const auto s = qlora::merge_model(mp, o->adapter, o->out);
    std::printf("merged %d adapted projections of %s into %s (BF16)%s\n", s.modules, mp.string().c_str(),
                o->out.c_str(), s.tokenizer_copied ? ", tokenizer copied" : "");
  });
});
