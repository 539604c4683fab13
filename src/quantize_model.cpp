// Whole-checkpoint quantization and its report (chapter 3). See quantize_model.hpp.
#include "quantize_model.hpp"

#include "bf16.hpp"
#include "hf_llama.hpp"
#include "llama2c.hpp"
#include "quant4_file.hpp"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstdio>
#include <stdexcept>

namespace qlora {
namespace {

std::string shape_string(const std::vector<std::int64_t>& s) {
  std::string r;
  for (std::size_t i = 0; i < s.size(); ++i) {
    if (i) r += 'x';
    r += std::to_string(s[i]);
  }
  return r.empty() ? "scalar" : r;
}

// Quantizes one tensor into r.file under `name` and records its report.
void quantize_one(QuantizeResult& r, const std::string& name, std::span<const float> x,
                  const std::vector<std::int64_t>& shape, DType dtype) {
  const auto& o = r.options;
  Quant4Tensor q;
  try {
    q = quantize_4bit(x, shape, o.type, o.blocksize, o.double_quant);
  } catch (const std::invalid_argument& e) {
    throw std::runtime_error("tensor '" + name + "': " + e.what());
  }
  put_quant4(r.file, name, q, dtype);
  TensorQuantReport t;
  t.name = name;
  t.shape = shape;
  t.dtype = dtype;
  t.error = compare(x, dequantize_4bit_f32(q));
  //! [stored-bytes]
  // Measured from what was put in the file, not from a formula.
  t.stored_bytes = static_cast<std::int64_t>(r.file.at(name).data.size() + r.file.at(name + ".absmax").data.size());
  if (o.double_quant)
    t.stored_bytes += static_cast<std::int64_t>(r.file.at(name + ".nested_absmax").data.size()) + 4;  // + offset
  //! [stored-bytes]
  r.tensors.push_back(std::move(t));
}

}  // namespace

std::string QuantizeOptions::label() const { return to_string(type) + (double_quant ? "+dq" : ""); }

std::int64_t TensorQuantReport::numel() const {
  std::int64_t n = 1;
  for (auto d : shape) n *= d;
  return n;
}

double TensorQuantReport::bits_per_parameter() const {
  return 8.0 * static_cast<double>(stored_bytes) / static_cast<double>(numel());
}

std::int64_t QuantizeResult::quantized_parameters() const {
  std::int64_t n = 0;
  for (const auto& t : tensors) n += t.numel();
  return n;
}

std::int64_t QuantizeResult::stored_bytes() const {
  std::int64_t n = 0;
  for (const auto& t : tensors) n += t.stored_bytes;
  return n;
}

double QuantizeResult::bits_per_parameter() const {
  const auto n = quantized_parameters();
  return n == 0 ? 0.0 : 8.0 * static_cast<double>(stored_bytes()) / static_cast<double>(n);
}

QuantizeResult quantize_checkpoint(const std::filesystem::path& in, const QuantizeOptions& opt) {
  check_blocksize(opt.blocksize);
  QuantizeResult r;
  r.options = opt;
  const auto ext = in.extension().string();
  if (ext == ".bin") {
    auto ck = read_llama2c(in);
    convert_rope_layout(ck, RopeLayout::rotate_half);
    r.file.metadata["format"] = "pt";
    for (const auto& t : ck.tensors) {
      const auto b = to_bf16(t.data);
      if (t.shape.size() == 2) {
        quantize_one(r, t.name, from_bf16(b), t.shape, DType::BF16);
      } else {
        r.file.tensors[t.name] = Tensor::from_bf16(b, t.shape);
        r.kept.push_back(t.name);
      }
    }
  } else if (ext == ".safetensors") {
    auto st = read_safetensors(in);
    if (!quant4_names(st).empty())
      throw std::runtime_error("'" + in.string() + "' already holds 4-bit tensors (e.g. '" + quant4_names(st).front() +
                               "'); run `qlora dequantize` first");
    r.file.metadata = st.metadata;
    for (const auto& [name, t] : st.tensors) {
      const bool quantizable = t.dtype == DType::BF16 || t.dtype == DType::F16 || t.dtype == DType::F32;
      if (quantizable && t.numel() > 0) {
        quantize_one(r, name, t.to_f32(), t.shape, t.dtype);
      } else {
        r.file.tensors[name] = t;
        r.kept.push_back(name);
      }
    }
  } else {
    throw std::runtime_error("input '" + in.string() + "': unknown format (expected a .safetensors file or a llama2.c .bin)");
  }
  std::sort(r.tensors.begin(), r.tensors.end(), [](const auto& a, const auto& b) { return a.name < b.name; });
  std::sort(r.kept.begin(), r.kept.end());
  return r;
}

SafeTensors dequantize_checkpoint(const SafeTensors& st, const std::string& file) {
  SafeTensors out;
  out.metadata = st.metadata;
  for (const auto& name : quant4_names(st)) {
    auto stored = get_quant4(st, name, file);
    out.tensors[name] = Tensor::from_bf16(dequantize_4bit_bf16(stored.q), stored.q.shape);
  }
  for (const auto& [name, t] : st.tensors)
    if (!is_quant4_part(st, name)) out.tensors[name] = t;
  return out;
}

void print_quantize_report(const QuantizeResult& r) {
  std::printf("%s, blocksize %d: per-tensor error of the dequantized weights\n", r.options.label().c_str(),
              r.options.blocksize);
  std::printf("%-48s %-10s %-5s %11s %11s %9s %9s\n", "tensor", "shape", "dtype", "max |err|", "RMSE", "rel Frob",
              "bits/par");
  for (const auto& t : r.tensors)
    std::printf("%-48s %-10s %-5s %11.3e %11.3e %9.5f %9.4f\n", t.name.c_str(), shape_string(t.shape).c_str(),
                to_string(t.dtype).c_str(), t.error.max_abs, t.error.rmse, t.error.rel_frobenius,
                t.bits_per_parameter());
  std::printf("quantized %zu tensors, %lld parameters, %lld bytes of codes and scales: %.4f bits/parameter\n",
              r.tensors.size(), static_cast<long long>(r.quantized_parameters()),
              static_cast<long long>(r.stored_bytes()), r.bits_per_parameter());
  if (!r.kept.empty()) std::printf("kept unquantized: %zu tensors\n", r.kept.size());
}

std::string quantize_report_json(const QuantizeResult& r, std::int64_t file_bytes) {
  nlohmann::ordered_json j;
  j["type"] = to_string(r.options.type);
  j["blocksize"] = r.options.blocksize;
  j["double_quant"] = r.options.double_quant;
  auto& rows = j["tensors"] = nlohmann::ordered_json::array();
  for (const auto& t : r.tensors)
    rows.push_back({{"name", t.name},
                    {"shape", t.shape},
                    {"dtype", to_string(t.dtype)},
                    {"numel", t.numel()},
                    {"max_abs", t.error.max_abs},
                    {"rmse", t.error.rmse},
                    {"rel_frobenius", t.error.rel_frobenius},
                    {"stored_bytes", t.stored_bytes},
                    {"bits_per_parameter", t.bits_per_parameter()}});
  j["kept"] = r.kept;
  j["summary"] = {{"quantized_tensors", r.tensors.size()},
                  {"quantized_parameters", r.quantized_parameters()},
                  {"stored_bytes", r.stored_bytes()},
                  {"bits_per_parameter", r.bits_per_parameter()},
                  {"file_bytes", file_bytes}};
  return j.dump(2) + "\n";
}

}  // namespace qlora
