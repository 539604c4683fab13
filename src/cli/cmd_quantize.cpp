// `qlora quantize` and `qlora dequantize` (chapter 3): a checkpoint to the
// bitsandbytes / Hugging Face 4-bit file format and back. The work is in
// quantize_model.hpp; this file parses flags and prints.
#include "command.hpp"
#include "quant4.hpp"
#include "quant4_file.hpp"
#include "quantize_model.hpp"

#include "atomic_file.hpp"
#include "safetensors.hpp"

#include <cstdio>
#include <memory>
#include <stdexcept>

namespace {

struct QuantizeArgs {
  std::string type = "nf4";
  int blocksize = 64;
  bool double_quant = false;
  std::string input, output, json;
};

void run_quantize(const QuantizeArgs& a) {
  qlora::QuantizeOptions opt;
  try {
    opt.type = qlora::parse_quant_type(a.type);
  } catch (const std::invalid_argument& e) {
    throw std::invalid_argument(std::string("--type: ") + e.what());
  }
  try {
    qlora::check_blocksize(a.blocksize);
  } catch (const std::invalid_argument& e) {
    throw std::invalid_argument(std::string("--blocksize: ") + e.what());
  }
  opt.blocksize = a.blocksize;
  opt.double_quant = a.double_quant;
  auto r = qlora::quantize_checkpoint(a.input, opt);
  qlora::write_safetensors(a.output, r.file);
  const auto file_bytes = static_cast<std::int64_t>(std::filesystem::file_size(a.output));
  qlora::print_quantize_report(r);
  std::printf("wrote %s (%lld bytes)\n", a.output.c_str(), static_cast<long long>(file_bytes));
  if (!a.json.empty()) qlora::write_text_atomic(a.json, qlora::quantize_report_json(r, file_bytes));
}

}  // namespace

QLORA_COMMAND([](CLI::App& app) {
  auto a = std::make_shared<QuantizeArgs>();
  auto* cmd = app.add_subcommand(
      "quantize",
      "Chapter 3: quantize a .safetensors or llama2.c .bin checkpoint to 4 bits (NF4/FP4, optional double\n"
      "quantization) in the bitsandbytes / Hugging Face file format; prints per-tensor error and bits/parameter");
  cmd->add_option("--type", a->type, "4-bit data type: nf4 or fp4")->capture_default_str();
  cmd->add_option("--blocksize", a->blocksize, "values per absmax block: a power of two from 32 to 4096")
      ->capture_default_str();
  cmd->add_flag("--double-quant", a->double_quant, "also quantize the block scales (8-bit, blocks of 256)");
  cmd->add_option("--json", a->json, "also write the report as JSON to this file");
  cmd->add_option("input", a->input, "input checkpoint (.safetensors or llama2.c .bin)")->required();
  cmd->add_option("output", a->output, "output .safetensors file")->required();
  cmd->callback([a] { run_quantize(*a); });
});

QLORA_COMMAND([](CLI::App& app) {
  auto in = std::make_shared<std::string>();
  auto out = std::make_shared<std::string>();
  auto* cmd = app.add_subcommand("dequantize",
                                 "Chapter 3: turn every 4-bit tensor of a .safetensors file back into BF16 "
                                 "(other tensors are copied)");
  cmd->add_option("input", *in, "4-bit .safetensors file")->required();
  cmd->add_option("output", *out, "output .safetensors file")->required();
  cmd->callback([in, out] {
    auto st = qlora::read_safetensors(*in);
    const auto n = qlora::quant4_names(st).size();
    if (n == 0) throw std::runtime_error("'" + *in + "' holds no 4-bit tensors (no '*.quant_state.bitsandbytes__*' entries)");
    auto deq = qlora::dequantize_checkpoint(st, "'" + *in + "'");
    qlora::write_safetensors(*out, deq);
    std::printf("dequantized %zu 4-bit tensors to BF16, copied %zu others: wrote %s\n", n, deq.tensors.size() - n,
                out->c_str());
  });
});
