// Quantizing a whole checkpoint file into the 4-bit file format and back (chapter 3;
// `qlora quantize`, `qlora dequantize` and `qlora demo` are thin wrappers around it).
//  - a .safetensors input: every BF16/F16/F32 tensor is quantized (non-empty ones);
//    other tensors are kept as they are;
//  - a llama2.c .bin input: q/k are first reordered to Hugging Face's RoPE layout so the
//    output is a proper HF state dict; the 2-D weight matrices are rounded to BF16 and
//    quantized (dtype "bfloat16", as when a BF16 model is loaded in 4 bits), the norms
//    are kept in BF16.
// Every quantized tensor gets its error (against the values the quantizer saw, i.e.
// after the BF16 rounding for .bin) and its bits/parameter measured from the bytes of
// its parts in the output: codes X, scales X.absmax, X.nested_absmax, plus the float32
// DQ offset (kept as text in the quant state). The per-tensor constants (quant maps,
// the JSON) are reported separately in the whole-file figure.
#pragma once

#include "quant4.hpp"
#include "quant_basics.hpp"
#include "safetensors.hpp"

#include <filesystem>
#include <string>
#include <vector>

namespace qlora {

struct QuantizeOptions {
  QuantType type = QuantType::nf4;
  int blocksize = 64;
  bool double_quant = false;
  std::string label() const;  ///< "nf4", "nf4+dq", ...
};

struct TensorQuantReport {
  std::string name;
  std::vector<std::int64_t> shape;
  DType dtype = DType::BF16;        ///< what was quantized
  ErrorStats error;                 ///< dequantized (float32) vs quantizer input
  std::int64_t stored_bytes = 0;    ///< codes + scales (+ nested scales + offset), from the output
  double bits_per_parameter() const;
  std::int64_t numel() const;
};

struct QuantizeResult {
  QuantizeOptions options;
  SafeTensors file;                        ///< what gets written
  std::vector<TensorQuantReport> tensors;  ///< one per quantized tensor, sorted by name
  std::vector<std::string> kept;           ///< tensors stored unquantized
  std::int64_t quantized_parameters() const;
  std::int64_t stored_bytes() const;       ///< sum over the quantized tensors
  double bits_per_parameter() const;       ///< stored_bytes * 8 / quantized_parameters
};

/// Quantizes a .safetensors or llama2.c .bin file. Throws std::runtime_error naming the file
/// or tensor on bad input (unknown extension, already 4-bit, NaN/Inf values).
QuantizeResult quantize_checkpoint(const std::filesystem::path& in, const QuantizeOptions& opt);

/// Replaces every 4-bit tensor of st by its BF16 dequantization (original shape); keeps the
/// other tensors and the metadata. `file` names the source in error messages.
SafeTensors dequantize_checkpoint(const SafeTensors& st, const std::string& file);

/// Prints the per-tensor error table and the bits/parameter summary to stdout.
void print_quantize_report(const QuantizeResult& r);

/// The same as JSON (for notebooks); file_bytes is the size of the written file (0 if unknown).
std::string quantize_report_json(const QuantizeResult& r, std::int64_t file_bytes);

}  // namespace qlora
