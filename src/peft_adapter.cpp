// PEFT adapter folders: writing and validating reading (chapter 4). See peft_adapter.hpp.
#include "peft_adapter.hpp"

#include "atomic_file.hpp"
#include "safetensors.hpp"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <set>
#include <stdexcept>

namespace qlora {

namespace {

using json = nlohmann::json;

constexpr const char* kConfigFile = "adapter_config.json";
constexpr const char* kWeightsFile = "adapter_model.safetensors";
// PEFT wraps the model twice (PeftModel.base_model = LoraModel, LoraModel.model = the
// transformers model), so every saved key starts with this prefix.
constexpr const char* kKeyPrefix = "base_model.model.";

std::string short_name(const std::string& module) {
  const auto dot = module.rfind('.');
  return dot == std::string::npos ? module : module.substr(dot + 1);
}

bool targeted(const PeftAdapter& a, const std::string& module) {
  return std::find(a.target_modules.begin(), a.target_modules.end(), short_name(module)) != a.target_modules.end();
}

}  // namespace

const std::vector<std::string>& llama_linear_modules() {
  static const std::vector<std::string> names = {"q_proj",    "k_proj",  "v_proj",   "o_proj",
                                                 "gate_proj", "up_proj", "down_proj"};
  return names;
}

std::string peft_tensor_key(const std::string& module, char which) {
  if (which != 'A' && which != 'B') throw std::invalid_argument("peft_tensor_key: which must be 'A' or 'B'");
  return std::string(kKeyPrefix) + module + ".lora_" + which + ".weight";
}

//! [peft-config]
std::string peft_config_json(const PeftAdapter& a) {
  json j;
  // The fields PEFT's LoraConfig serialises (PEFT ≥ 0.9 reads all of them). Values we
  // do not use keep PEFT's defaults, so PEFT rebuilds exactly the layers we trained.
  j["alpha_pattern"] = json::object();
  j["auto_mapping"] = nullptr;
  j["base_model_name_or_path"] = a.base_model_name_or_path;
  j["bias"] = "none";              // no bias terms are trained
  j["fan_in_fan_out"] = false;     // weights are stored out×in, as nn.Linear does
  j["inference_mode"] = true;      // what save_pretrained records
  j["init_lora_weights"] = true;   // Kaiming-uniform A, zero B
  j["layers_pattern"] = nullptr;
  j["layers_to_transform"] = nullptr;
  j["loftq_config"] = json::object();
  if (a.config.alpha == std::floor(a.config.alpha))
    j["lora_alpha"] = static_cast<long long>(a.config.alpha);  // PEFT writes an int when it is one
  else
    j["lora_alpha"] = a.config.alpha;
  j["lora_dropout"] = a.config.dropout;
  j["modules_to_save"] = nullptr;
  j["peft_type"] = "LORA";
  j["r"] = a.config.r;
  j["rank_pattern"] = json::object();
  j["revision"] = nullptr;
  j["target_modules"] = a.target_modules;
  j["task_type"] = "CAUSAL_LM";
  j["use_dora"] = false;
  j["use_rslora"] = a.config.use_rslora;
  return j.dump(2) + "\n";
}
//! [peft-config]

void write_peft_adapter(const std::filesystem::path& dir, const PeftAdapter& a) {
  if (a.config.r <= 0) throw std::invalid_argument("PEFT adapter: r must be positive");
  if (a.target_modules.empty()) throw std::invalid_argument("PEFT adapter: target_modules is empty");
  SafeTensors st;
  st.metadata["format"] = "pt";  // what PEFT/transformers write; loaders check it
  for (const auto& [module, ad] : a.modules) {
    if (!targeted(a, module))
      throw std::invalid_argument("PEFT adapter: module '" + module + "' is not covered by target_modules");
    if (ad.r != a.config.r)
      throw std::invalid_argument("PEFT adapter: module '" + module + "' has rank " + std::to_string(ad.r) +
                                  " but r is " + std::to_string(a.config.r));
    if (ad.A.size() != static_cast<std::size_t>(ad.r) * ad.in || ad.B.size() != static_cast<std::size_t>(ad.out) * ad.r)
      throw std::invalid_argument("PEFT adapter: module '" + module + "' has A/B sizes that disagree with in, out, r");
    st.tensors[peft_tensor_key(module, 'A')] = Tensor::from_f32(ad.A, {ad.r, ad.in});
    st.tensors[peft_tensor_key(module, 'B')] = Tensor::from_f32(ad.B, {ad.out, ad.r});
  }
  std::filesystem::create_directories(dir);
  // Weights first, config last: a folder with a config always has its weights.
  write_safetensors(dir / kWeightsFile, st);
  write_text_atomic(dir / kConfigFile, peft_config_json(a));
}

namespace {

[[noreturn]] void config_error(const std::filesystem::path& file, const std::string& key, const std::string& what) {
  throw std::runtime_error(file.string() + ": key '" + key + "': " + what);
}

const json& require_key(const json& j, const std::filesystem::path& file, const std::string& key) {
  auto it = j.find(key);
  if (it == j.end()) config_error(file, key, "missing");
  return *it;
}

// Reads the config fields that decide what the adapter computes; rejects features
// this implementation does not have rather than silently ignoring them.
void read_config(const std::filesystem::path& file, PeftAdapter& a) {
  std::ifstream in(file);
  if (!in) throw std::runtime_error(file.string() + ": cannot open (missing adapter_config.json?)");
  json j;
  try {
    j = json::parse(in);
  } catch (const json::parse_error& e) {
    throw std::runtime_error(file.string() + ": not valid JSON: " + e.what());
  }
  if (!j.is_object()) throw std::runtime_error(file.string() + ": not a JSON object");

  const json& type = require_key(j, file, "peft_type");
  if (type != "LORA") config_error(file, "peft_type", "expected \"LORA\", got " + type.dump());
  const json& r = require_key(j, file, "r");
  if (!r.is_number_integer() || r.get<long long>() <= 0) config_error(file, "r", "must be a positive integer");
  a.config.r = r.get<int>();
  const json& alpha = require_key(j, file, "lora_alpha");
  if (!alpha.is_number()) config_error(file, "lora_alpha", "must be a number");
  a.config.alpha = alpha.get<float>();
  const json& dropout = require_key(j, file, "lora_dropout");
  if (!dropout.is_number() || dropout.get<double>() < 0.0 || dropout.get<double>() >= 1.0)
    config_error(file, "lora_dropout", "must be a number in [0, 1)");
  a.config.dropout = dropout.get<float>();
  a.config.use_rslora = false;
  if (auto it = j.find("use_rslora"); it != j.end() && !it->is_null()) {
    if (!it->is_boolean()) config_error(file, "use_rslora", "must be true or false");
    a.config.use_rslora = it->get<bool>();
  }

  const json& targets = require_key(j, file, "target_modules");
  if (!targets.is_array() || targets.empty())
    config_error(file, "target_modules", "must be a non-empty list of layer names (regex strings are not supported)");
  a.target_modules.clear();
  for (const json& t : targets) {
    if (!t.is_string()) config_error(file, "target_modules", "must hold strings");
    const std::string name = short_name(t.get<std::string>());
    const auto& known = llama_linear_modules();
    if (std::find(known.begin(), known.end(), name) == known.end())
      config_error(file, "target_modules", "unknown module '" + t.get<std::string>() + "' (LLaMA linear layers only)");
    a.target_modules.push_back(name);
  }

  if (auto it = j.find("bias"); it != j.end() && *it != "none") config_error(file, "bias", "only \"none\" is supported");
  if (auto it = j.find("fan_in_fan_out"); it != j.end() && *it == true)
    config_error(file, "fan_in_fan_out", "true is not supported (weights must be out×in)");
  if (auto it = j.find("use_dora"); it != j.end() && *it == true) config_error(file, "use_dora", "DoRA is not supported");
  for (const char* pattern : {"rank_pattern", "alpha_pattern"})
    if (auto it = j.find(pattern); it != j.end() && !it->is_null() && !it->empty())
      config_error(file, pattern, "per-layer ranks/alphas are not supported");
  if (auto it = j.find("modules_to_save"); it != j.end() && !it->is_null() && !it->empty())
    config_error(file, "modules_to_save", "fully trained extra modules are not supported");
  if (auto it = j.find("base_model_name_or_path"); it != j.end() && it->is_string())
    a.base_model_name_or_path = it->get<std::string>();
}

}  // namespace

PeftAdapter read_peft_adapter(const std::filesystem::path& dir) {
  if (!std::filesystem::is_directory(dir))
    throw std::runtime_error(dir.string() + ": not a directory (expected a PEFT adapter folder)");
  PeftAdapter a;
  read_config(dir / kConfigFile, a);

  const std::filesystem::path wfile = dir / kWeightsFile;
  if (!std::filesystem::exists(wfile))
    throw std::runtime_error(wfile.string() + ": missing (adapter_model.bin pickles are not read; save with safetensors)");
  const SafeTensors st = read_safetensors(wfile);
  auto fail = [&](const std::string& key, const std::string& what) -> void {
    throw std::runtime_error(wfile.string() + ": tensor '" + key + "': " + what);
  };

  // Every key must be base_model.model.<module>.lora_{A,B}.weight for a targeted module.
  std::set<std::string> names;
  const std::string prefix = kKeyPrefix;
  for (const auto& [key, tensor] : st.tensors) {
    const std::string suffix_a = ".lora_A.weight", suffix_b = ".lora_B.weight";
    const bool is_a = key.ends_with(suffix_a), is_b = key.ends_with(suffix_b);
    if (!key.starts_with(prefix) || !(is_a || is_b))
      fail(key, "not a LoRA weight (expected base_model.model.<module>.lora_A.weight or .lora_B.weight)");
    const std::string module = key.substr(prefix.size(), key.size() - prefix.size() - suffix_a.size());
    if (!targeted(a, module)) fail(key, "unknown module '" + module + "' (not in target_modules)");
    if (!is_floating(tensor.dtype) || tensor.dtype == DType::F64)
      fail(key, "dtype " + to_string(tensor.dtype) + " (expected F32, BF16 or F16)");
    names.insert(module);
  }

  const std::int64_t r = a.config.r;
  for (const std::string& module : names) {
    const std::string ka = peft_tensor_key(module, 'A'), kb = peft_tensor_key(module, 'B');
    if (!st.contains(ka)) fail(ka, "missing (its lora_B is present)");
    if (!st.contains(kb)) fail(kb, "missing (its lora_A is present)");
    const Tensor &ta = st.at(ka), &tb = st.at(kb);
    if (ta.shape.size() != 2 || ta.shape[0] != r || ta.shape[1] <= 0)
      fail(ka, "shape must be [r=" + std::to_string(r) + ", in]");
    if (tb.shape.size() != 2 || tb.shape[1] != r || tb.shape[0] <= 0)
      fail(kb, "shape must be [out, r=" + std::to_string(r) + "]");
    LoraAdapter ad(static_cast<int>(ta.shape[1]), static_cast<int>(tb.shape[0]), a.config.r);
    ad.A = ta.to_f32();
    ad.B = tb.to_f32();
    a.modules.emplace(module, std::move(ad));
  }
  if (a.modules.empty()) throw std::runtime_error(wfile.string() + ": holds no LoRA weights");
  return a;
}

}  // namespace qlora
