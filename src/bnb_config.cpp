// bitsandbytes' quantization_config in config.json (chapter 7). See bnb_config.hpp.
// Field names and defaults follow transformers' BitsAndBytesConfig.to_dict().
#include "bnb_config.hpp"

#include <nlohmann/json.hpp>

#include <fstream>
#include <stdexcept>

namespace qlora {

std::string describe_4bit(QuantType type, bool double_quant) {
  return to_string(type) + (double_quant ? " with double quantization" : " without double quantization");
}

std::optional<Bnb4bitConfig> read_bnb_4bit_config(const std::filesystem::path& config_json) {
  const std::string where = "Hugging Face config '" + config_json.string() + "', \"quantization_config\"";
  std::ifstream in(config_json);
  if (!in) throw std::runtime_error("cannot open Hugging Face config '" + config_json.string() + "'");
  nlohmann::json cfg;
  try {
    cfg = nlohmann::json::parse(in);
  } catch (const nlohmann::json::parse_error& e) {
    throw std::runtime_error("Hugging Face config '" + config_json.string() + "': not valid JSON: " + e.what());
  }
  if (!cfg.is_object() || !cfg.contains("quantization_config") || cfg["quantization_config"].is_null())
    return std::nullopt;
  const auto& q = cfg["quantization_config"];
  if (!q.is_object()) throw std::runtime_error(where + " is not an object");
  // A flag is true only when it is the JSON value true; transformers also writes "_load_in_4bit".
  auto flag = [&](const char* key) { return q.contains(key) && q[key] == true; };
  auto text = [&](const char* key, const char* fallback) -> std::string {
    if (!q.contains(key) || q[key].is_null()) return fallback;
    if (!q[key].is_string()) throw std::runtime_error(where + ": \"" + key + "\" is not a string");
    return q[key].get<std::string>();
  };
  if (const auto method = text("quant_method", "bitsandbytes"); method != "bitsandbytes")
    throw std::runtime_error(where + ": quant_method \"" + method + "\" is not supported (only bitsandbytes 4-bit)");
  if (flag("load_in_8bit") || flag("_load_in_8bit"))
    throw std::runtime_error(where + ": load_in_8bit (LLM.int8) is not supported (only bitsandbytes 4-bit)");
  if (!flag("load_in_4bit") && !flag("_load_in_4bit"))
    throw std::runtime_error(where + ": load_in_4bit is not true (only bitsandbytes 4-bit folders are supported)");
  if (const auto storage = text("bnb_4bit_quant_storage", "uint8"); storage != "uint8")
    throw std::runtime_error(where + ": bnb_4bit_quant_storage \"" + storage +
                             "\" is not supported (the packed codes must be stored as uint8)");
  Bnb4bitConfig out;
  try {
    out.type = parse_quant_type(text("bnb_4bit_quant_type", "fp4"));
  } catch (const std::invalid_argument& e) {
    throw std::runtime_error(where + ": bnb_4bit_quant_type: " + e.what());
  }
  if (q.contains("bnb_4bit_use_double_quant") && !q["bnb_4bit_use_double_quant"].is_boolean())
    throw std::runtime_error(where + ": \"bnb_4bit_use_double_quant\" must be true or false");
  out.double_quant = flag("bnb_4bit_use_double_quant");
  return out;
}

void check_against_config(const Bnb4bitConfig& cfg, const Quant4Tensor& q, const std::string& where) {
  if (q.type != cfg.type || q.double_quant != cfg.double_quant)
    throw std::runtime_error(where + ": stored as " + describe_4bit(q.type, q.double_quant) +
                             ", but config.json's quantization_config declares " +
                             describe_4bit(cfg.type, cfg.double_quant));
}

}  // namespace qlora
