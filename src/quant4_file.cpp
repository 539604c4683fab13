// The bitsandbytes / Hugging Face 4-bit serialization (chapter 3). See quant4_file.hpp.
// The key names and JSON fields follow bitsandbytes' QuantState.as_dict(packed=True)
// and QuantState.from_dict (bitsandbytes/functional.py, bitsandbytes/utils.py).
#include "quant4_file.hpp"

#include "dynamic_map.hpp"
#include "fp4.hpp"
#include "nf4.hpp"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <stdexcept>

namespace qlora {
namespace {

constexpr const char* kStatePrefix = ".quant_state.bitsandbytes__";

std::string state_key(const std::string& name, QuantType t) { return name + kStatePrefix + to_string(t); }

const std::array<float, 16>& table_of(QuantType t) { return t == QuantType::nf4 ? nf4_table : fp4_table; }

std::string shape_json(const std::vector<std::int64_t>& shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

template <class T>
std::vector<T> values_of(const Tensor& t) {
  std::vector<T> v(t.data.size() / sizeof(T));
  if (!v.empty()) std::memcpy(v.data(), t.data.data(), v.size() * sizeof(T));
  return v;
}

}  // namespace

std::string torch_dtype_name(DType d) {
  switch (d) {
    case DType::BF16:
      return "bfloat16";
    case DType::F16:
      return "float16";
    case DType::F32:
      return "float32";
    default:
      throw std::invalid_argument("4-bit tensors are quantized from BF16, F16 or F32, not " + to_string(d));
  }
}

//! [python-float-repr]
std::string python_float_repr(double v) {
  if (std::isnan(v)) return "NaN";  // json.dumps' spelling of the non-finite values
  if (std::isinf(v)) return v > 0 ? "Infinity" : "-Infinity";
  // Shortest round-trip digits in scientific form, e.g. "-1.2345e-02".
  char buf[64];
  auto res = std::to_chars(buf, buf + sizeof buf, v, std::chars_format::scientific);
  std::string s(buf, res.ptr);
  std::string sign;
  if (s[0] == '-') sign = "-", s.erase(0, 1);
  const auto e = s.find('e');
  std::string digits = s.substr(0, e);
  if (digits.size() > 1) digits.erase(1, 1);  // drop the '.'
  const int decpt = std::atoi(s.c_str() + e + 1) + 1;  // digits d1 d2 ... stand for 0.d1d2... × 10^decpt
  const int n = static_cast<int>(digits.size());
  // Python's repr switches to exponent notation outside 1e-4 <= |v| < 1e16.
  if (decpt <= -4 || decpt > 16) {
    std::string exp = std::to_string(std::abs(decpt - 1));
    if (exp.size() < 2) exp = "0" + exp;
    return sign + digits.substr(0, 1) + (n > 1 ? "." + digits.substr(1) : "") + "e" + (decpt - 1 < 0 ? "-" : "+") + exp;
  }
  if (decpt <= 0) return sign + "0." + std::string(static_cast<std::size_t>(-decpt), '0') + digits;
  if (decpt >= n) return sign + digits + std::string(static_cast<std::size_t>(decpt - n), '0') + ".0";
  return sign + digits.substr(0, static_cast<std::size_t>(decpt)) + "." + digits.substr(static_cast<std::size_t>(decpt));
}
//! [python-float-repr]

//! [quant-state-json]
// json.dumps(dict) with its default separators ", " and ": ", keys in as_dict's order.
std::string quant_state_json(const Quant4Tensor& q, DType original_dtype) {
  std::string s = "{\"quant_type\": \"" + to_string(q.type) + "\", \"blocksize\": " + std::to_string(q.blocksize) +
                  ", \"dtype\": \"" + torch_dtype_name(original_dtype) + "\", \"shape\": " + shape_json(q.shape);
  if (q.double_quant)
    s += ", \"nested_blocksize\": " + std::to_string(q.nested.blocksize) +
         ", \"nested_dtype\": \"float32\", \"nested_offset\": " + python_float_repr(q.nested.offset);
  return s + "}";
}
//! [quant-state-json]

void put_quant4(SafeTensors& st, const std::string& name, const Quant4Tensor& q, DType original_dtype) {
  //! [put-quant4]
  st.tensors[name] = Tensor::from_u8(q.packed, {static_cast<std::int64_t>(q.packed.size()), 1});
  const auto blocks = q.num_blocks();
  if (q.double_quant) {
    st.tensors[name + ".absmax"] = Tensor::from_u8(q.nested.codes, {blocks});
    st.tensors[name + ".nested_absmax"] =
        Tensor::from_f32(q.nested.absmax, {static_cast<std::int64_t>(q.nested.absmax.size())});
    const auto map = dynamic_map(true);
    st.tensors[name + ".nested_quant_map"] = Tensor::from_f32(map, {256});
  } else {
    st.tensors[name + ".absmax"] = Tensor::from_f32(q.absmax, {blocks});
  }
  st.tensors[name + ".quant_map"] = Tensor::from_f32(table_of(q.type), {16});
  const std::string json = quant_state_json(q, original_dtype);
  st.tensors[state_key(name, q.type)] =
      Tensor::from_u8(std::span(reinterpret_cast<const std::uint8_t*>(json.data()), json.size()),
                      {static_cast<std::int64_t>(json.size())});
  //! [put-quant4]
}

std::vector<std::string> quant4_names(const SafeTensors& st) {
  std::vector<std::string> names;
  for (const auto& [key, t] : st.tensors) {
    auto pos = key.rfind(kStatePrefix);
    if (pos != std::string::npos) names.push_back(key.substr(0, pos));
  }
  return names;  // std::map iteration order keeps them sorted by key; prefixes sort the same way
}

bool is_quant4_part(const SafeTensors& st, const std::string& tensor) {
  for (const auto& name : quant4_names(st)) {
    if (tensor == name) return true;
    if (tensor.size() > name.size() && tensor.compare(0, name.size() + 1, name + ".") == 0) {
      const std::string suffix = tensor.substr(name.size() + 1);
      if (suffix == "absmax" || suffix == "quant_map" || suffix == "nested_absmax" || suffix == "nested_quant_map" ||
          suffix.rfind("quant_state.bitsandbytes__", 0) == 0)
        return true;
    }
  }
  return false;
}

StoredQuant4 get_quant4(const SafeTensors& st, const std::string& name, const std::string& file) {
  const std::string where = file + ", 4-bit tensor '" + name + "'";
  auto fail = [&](const std::string& msg) -> std::runtime_error { return std::runtime_error(where + ": " + msg); };

  // The quant state: exactly one X.quant_state.bitsandbytes__{nf4,fp4}.
  std::string key;
  for (const char* t : {"nf4", "fp4"})
    if (st.contains(name + kStatePrefix + t)) {
      if (!key.empty()) throw fail("both nf4 and fp4 quant states are present");
      key = name + kStatePrefix + t;
    }
  if (key.empty()) throw fail("no '" + name + kStatePrefix + "nf4' or '...fp4' quant state");
  const Tensor& state_t = st.at(key);
  if (state_t.dtype != DType::U8) throw fail("'" + key + "' must be U8, is " + to_string(state_t.dtype));
  nlohmann::json js;
  try {
    js = nlohmann::json::parse(state_t.data.begin(), state_t.data.end());
  } catch (const nlohmann::json::parse_error& e) {
    throw fail("'" + key + "' is not valid UTF-8 JSON: " + e.what());
  }
  if (!js.is_object()) throw fail("'" + key + "' is not a JSON object");

  StoredQuant4 out;
  Quant4Tensor& q = out.q;
  static const char* known[] = {"quant_type", "blocksize", "dtype", "shape", "nested_blocksize", "nested_dtype", "nested_offset"};
  for (const auto& [k, v] : js.items())
    if (std::find(std::begin(known), std::end(known), k) == std::end(known)) throw fail("unknown quant state field \"" + k + "\"");
  for (const char* k : {"quant_type", "blocksize", "dtype", "shape"})
    if (!js.contains(k)) throw fail("quant state lacks \"" + std::string(k) + "\"");
  if (!js["quant_type"].is_string()) throw fail("\"quant_type\" is not a string");
  try {
    q.type = parse_quant_type(js["quant_type"].get<std::string>());
  } catch (const std::invalid_argument& e) {
    throw fail(e.what());
  }
  if (key != state_key(name, q.type)) throw fail("\"quant_type\" " + to_string(q.type) + " contradicts the key '" + key + "'");
  if (!js["blocksize"].is_number_integer() || js["blocksize"].get<std::int64_t>() > 1 << 20)
    throw fail("\"blocksize\" is not an integer");
  q.blocksize = js["blocksize"].get<int>();
  try {
    check_blocksize(q.blocksize);
  } catch (const std::invalid_argument& e) {
    throw fail(e.what());
  }
  if (!js["dtype"].is_string()) throw fail("\"dtype\" is not a string");
  const std::string dtype = js["dtype"].get<std::string>();
  if (dtype == "bfloat16") out.dtype = DType::BF16;
  else if (dtype == "float16") out.dtype = DType::F16;
  else if (dtype == "float32") out.dtype = DType::F32;
  else throw fail("unsupported \"dtype\" \"" + dtype + "\" (expected bfloat16, float16 or float32)");
  if (!js["shape"].is_array()) throw fail("\"shape\" is not an array");
  q.numel = 1;
  for (const auto& d : js["shape"]) {
    if (!d.is_number_unsigned() || d.get<std::uint64_t>() > (1ull << 40)) throw fail("\"shape\" holds a bad dimension");
    q.shape.push_back(d.get<std::int64_t>());
    q.numel *= q.shape.back();
    if (q.numel > (1ll << 40)) throw fail("\"shape\" is too large");
  }

  // The tensors, each checked against the state.
  auto part = [&](const std::string& suffix, DType dt, std::vector<std::int64_t> shape) -> const Tensor& {
    const std::string pname = suffix.empty() ? name : name + "." + suffix;
    if (!st.contains(pname)) throw fail("missing part '" + pname + "'");
    const Tensor& t = st.at(pname);
    if (t.dtype != dt) throw fail("'" + pname + "' has dtype " + to_string(t.dtype) + ", expected " + to_string(dt));
    if (t.shape != shape)
      throw fail("'" + pname + "' has shape " + shape_json(t.shape) + ", expected " + shape_json(shape));
    return t;
  };
  auto finite_nonneg = [&](const std::vector<float>& v, const std::string& pname) {
    for (std::size_t i = 0; i < v.size(); ++i)
      if (!std::isfinite(v[i]) || v[i] < 0) throw fail("'" + pname + "' holds " + std::to_string(v[i]) + " at index " + std::to_string(i));
  };
  q.packed = part("", DType::U8, {(q.numel + 1) / 2, 1}).data;
  const std::int64_t blocks = q.num_blocks();
  auto qmap = values_of<float>(part("quant_map", DType::F32, {16}));
  for (std::size_t i = 0; i < 16; ++i)
    if (qmap[i] != table_of(q.type)[i])
      throw fail("'" + name + ".quant_map' differs from bitsandbytes' " + to_string(q.type) + " table at code " + std::to_string(i));

  q.double_quant = js.contains("nested_offset") || js.contains("nested_blocksize") || js.contains("nested_dtype");
  if (!q.double_quant) {
    if (st.contains(name + ".nested_absmax") || st.contains(name + ".nested_quant_map"))
      throw fail("nested parts present but the quant state has no nested fields");
    q.absmax = values_of<float>(part("absmax", DType::F32, {blocks}));
    finite_nonneg(q.absmax, name + ".absmax");
    return out;
  }
  for (const char* k : {"nested_blocksize", "nested_dtype", "nested_offset"})
    if (!js.contains(k)) throw fail("quant state lacks \"" + std::string(k) + "\"");
  if (js["nested_dtype"] != "float32") throw fail("\"nested_dtype\" must be \"float32\"");
  if (!js["nested_blocksize"].is_number_integer() || js["nested_blocksize"].get<std::int64_t>() < 1 ||
      js["nested_blocksize"].get<std::int64_t>() > 4096)
    throw fail("\"nested_blocksize\" must be an integer in [1, 4096]");
  q.nested.blocksize = js["nested_blocksize"].get<int>();
  if (!js["nested_offset"].is_number() || !std::isfinite(js["nested_offset"].get<double>()))
    throw fail("\"nested_offset\" must be a finite number");
  q.nested.offset = static_cast<float>(js["nested_offset"].get<double>());
  q.nested.codes = part("absmax", DType::U8, {blocks}).data;
  const std::int64_t nested_blocks = (blocks + q.nested.blocksize - 1) / q.nested.blocksize;
  q.nested.absmax = values_of<float>(part("nested_absmax", DType::F32, {nested_blocks}));
  finite_nonneg(q.nested.absmax, name + ".nested_absmax");
  auto nmap = values_of<float>(part("nested_quant_map", DType::F32, {256}));
  const auto dyn = dynamic_map(true);
  for (std::size_t i = 0; i < 256; ++i)
    if (nmap[i] != dyn[i])
      throw fail("'" + name + ".nested_quant_map' differs from the signed dynamic map at code " + std::to_string(i));
  return out;
}

}  // namespace qlora
