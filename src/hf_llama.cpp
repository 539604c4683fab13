// Hugging Face LLaMA folders and the RoPE row permutation (chapter 7). See hf_llama.hpp.
#include "hf_llama.hpp"

#include "atomic_file.hpp"
#include "bf16.hpp"
#include "bnb_config.hpp"
#include "quant4_file.hpp"
#include "safetensors.hpp"

#include <nlohmann/json.hpp>

#include <charconv>
#include <cstdlib>
#include <fstream>
#include <map>
#include <set>
#include <stdexcept>

namespace qlora {
namespace {

void check_rope_shape(std::size_t size, int n_heads, int cols, std::size_t& rows, std::size_t& half) {
  if (n_heads <= 0 || cols <= 0 || size % static_cast<std::size_t>(cols) != 0)
    throw std::invalid_argument("RoPE permutation: " + std::to_string(size) + " values are not rows of " +
                                std::to_string(cols) + " columns");
  rows = size / static_cast<std::size_t>(cols);
  const std::size_t heads = static_cast<std::size_t>(n_heads);
  if (rows % heads != 0 || (rows / heads) % 2 != 0)
    throw std::invalid_argument("RoPE permutation: " + std::to_string(rows) + " rows do not split into " +
                                std::to_string(n_heads) + " heads of even size");
  half = rows / heads / 2;
}

// Moves row src(h, i, t) = h·hs + 2i + t to dst(h, t, i) = h·hs + t·hs/2 + i, or back.
std::vector<float> permute_rows(std::span<const float> w, int n_heads, int cols, bool to_half) {
  std::size_t rows = 0, half = 0;
  check_rope_shape(w.size(), n_heads, cols, rows, half);
  const std::size_t c = static_cast<std::size_t>(cols), hs = 2 * half;
  std::vector<float> out(w.size());
  //! [rope-permute]
  for (std::size_t h = 0; h < static_cast<std::size_t>(n_heads); ++h)
    for (std::size_t i = 0; i < half; ++i)
      for (std::size_t t = 0; t < 2; ++t) {
        const std::size_t interleaved = h * hs + 2 * i + t;  // llama2.c: pair i is (2i, 2i+1)
        const std::size_t rotate_half = h * hs + t * half + i;  // HF: pair i is (i, i + hs/2)
        const std::size_t from = to_half ? interleaved : rotate_half;
        const std::size_t to = to_half ? rotate_half : interleaved;
        std::copy_n(w.begin() + static_cast<std::ptrdiff_t>(from * c), c, out.begin() + static_cast<std::ptrdiff_t>(to * c));
      }
  //! [rope-permute]
  return out;
}

template <class T>
T get_field(const nlohmann::json& cfg, const char* key, const std::string& where) {
  if (!cfg.contains(key)) throw std::runtime_error(where + ": missing \"" + key + "\"");
  const auto& v = cfg[key];
  if constexpr (std::is_same_v<T, int>) {
    if (!v.is_number_integer() || v.get<std::int64_t>() <= 0 || v.get<std::int64_t>() > INT32_MAX)
      throw std::runtime_error(where + ": \"" + key + "\" must be a positive integer");
    return v.get<int>();
  } else if constexpr (std::is_same_v<T, float>) {
    if (!v.is_number()) throw std::runtime_error(where + ": \"" + key + "\" must be a number");
    return v.get<float>();
  } else {
    if (!v.is_boolean()) throw std::runtime_error(where + ": \"" + key + "\" must be true or false");
    return v.get<bool>();
  }
}

LlamaConfig parse_config(const std::filesystem::path& path) {
  const std::string where = "Hugging Face config '" + path.string() + "'";
  std::ifstream in(path);
  if (!in) throw std::runtime_error("cannot open " + where);
  nlohmann::json cfg;
  try {
    cfg = nlohmann::json::parse(in);
  } catch (const nlohmann::json::parse_error& e) {
    throw std::runtime_error(where + ": not valid JSON: " + e.what());
  }
  if (!cfg.is_object()) throw std::runtime_error(where + ": not a JSON object");
  if (!cfg.contains("model_type") || cfg["model_type"] != "llama")
    throw std::runtime_error(where + ": \"model_type\" must be \"llama\"");
  // Features of the LLaMA family this implementation does not model: refuse rather than run wrong.
  if (cfg.contains("hidden_act") && cfg["hidden_act"] != "silu")
    throw std::runtime_error(where + ": unsupported \"hidden_act\" " + cfg["hidden_act"].dump() + " (only silu)");
  for (const char* flag : {"attention_bias", "mlp_bias"})
    if (cfg.contains(flag) && cfg[flag] != false)
      throw std::runtime_error(where + ": unsupported \"" + flag + "\" (biases are not modelled)");
  if (cfg.contains("rope_scaling") && !cfg["rope_scaling"].is_null())
    throw std::runtime_error(where + ": unsupported \"rope_scaling\"");

  LlamaConfig c;
  c.dim = get_field<int>(cfg, "hidden_size", where);
  c.hidden_dim = get_field<int>(cfg, "intermediate_size", where);
  c.n_layers = get_field<int>(cfg, "num_hidden_layers", where);
  c.n_heads = get_field<int>(cfg, "num_attention_heads", where);
  c.n_kv_heads = cfg.contains("num_key_value_heads") ? get_field<int>(cfg, "num_key_value_heads", where) : c.n_heads;
  c.vocab_size = get_field<int>(cfg, "vocab_size", where);
  c.seq_len = get_field<int>(cfg, "max_position_embeddings", where);
  if (cfg.contains("rms_norm_eps")) c.norm_eps = get_field<float>(cfg, "rms_norm_eps", where);
  if (cfg.contains("rope_theta")) c.rope_theta = get_field<float>(cfg, "rope_theta", where);
  // transformers' LlamaConfig defaults tie_word_embeddings to false.
  c.shared_classifier = cfg.contains("tie_word_embeddings") && get_field<bool>(cfg, "tie_word_embeddings", where);
  validate_config(c, where);
  if (cfg.contains("head_dim") && !cfg["head_dim"].is_null() && cfg["head_dim"] != c.head_size())
    throw std::runtime_error(where + ": \"head_dim\" " + cfg["head_dim"].dump() + " differs from hidden_size / " +
                             "num_attention_heads = " + std::to_string(c.head_size()));
  return c;
}

// All tensors of the folder, and the file each came from (for error messages).
struct FolderTensors {
  SafeTensors all;
  std::map<std::string, std::filesystem::path> file;
};

FolderTensors read_weights(const std::filesystem::path& dir) {
  std::vector<std::filesystem::path> files;
  const auto index = dir / "model.safetensors.index.json";
  if (std::filesystem::exists(index)) {
    std::ifstream in(index);
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(in);
    } catch (const nlohmann::json::parse_error& e) {
      throw std::runtime_error("shard index '" + index.string() + "': not valid JSON: " + e.what());
    }
    if (!j.is_object() || !j.contains("weight_map") || !j["weight_map"].is_object())
      throw std::runtime_error("shard index '" + index.string() + "': no \"weight_map\" object");
    std::set<std::string> shards;
    for (const auto& [name, file] : j["weight_map"].items()) {
      if (!file.is_string()) throw std::runtime_error("shard index '" + index.string() + "': bad entry for " + name);
      shards.insert(file.get<std::string>());
    }
    for (const auto& s : shards) files.push_back(dir / s);
  } else {
    files.push_back(dir / "model.safetensors");
  }
  FolderTensors out;
  for (const auto& f : files) {
    auto st = read_safetensors(f);
    for (auto& [name, t] : st.tensors) {
      if (out.all.contains(name)) throw std::runtime_error("tensor '" + name + "' appears in more than one shard of " + dir.string());
      out.all.tensors.emplace(name, std::move(t));
      out.file.emplace(name, f);
    }
  }
  return out;
}

// The double whose shortest decimal is the float's shortest decimal: 1e-5f is written
// as 1e-05, not as 9.99999974737875e-06.
double decimal_double(float f) {
  char buf[32];
  auto r = std::to_chars(buf, buf + sizeof buf, f);
  return std::strtod(std::string(buf, r.ptr).c_str(), nullptr);
}

std::string shape_str(const std::vector<std::int64_t>& s) {
  std::string r = "[";
  for (std::size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

}  // namespace

std::vector<float> rope_interleaved_to_half(std::span<const float> w, int n_heads, int cols) {
  return permute_rows(w, n_heads, cols, true);
}

std::vector<float> rope_half_to_interleaved(std::span<const float> w, int n_heads, int cols) {
  return permute_rows(w, n_heads, cols, false);
}

void convert_rope_layout(LlamaCheckpoint& ck, RopeLayout target) {
  if (ck.rope_layout == target) return;
  const bool to_half = target == RopeLayout::rotate_half;
  for (int l = 0; l < ck.config.n_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".self_attn.";
    for (auto [name, heads] : {std::pair{"q_proj.weight", ck.config.n_heads}, std::pair{"k_proj.weight", ck.config.n_kv_heads}}) {
      auto& t = ck.at(p + name);
      if (t.q4)
        throw std::invalid_argument("convert_rope_layout: '" + t.name +
                                    "' is stored in 4 bits; its rows cannot be reordered without quantizing again");
      t.data = permute_rows(t.data, heads, ck.config.dim, to_half);
    }
  }
  ck.rope_layout = target;
}

LlamaCheckpoint read_hf_llama(const std::filesystem::path& dir) {
  const std::string where = "Hugging Face checkpoint '" + dir.string() + "'";
  if (!std::filesystem::is_directory(dir)) throw std::runtime_error(where + ": not a directory");
  LlamaCheckpoint ck;
  ck.config = parse_config(dir / "config.json");
  ck.rope_layout = RopeLayout::rotate_half;
  const auto bnb = read_bnb_4bit_config(dir / "config.json");
  const FolderTensors folder = read_weights(dir);
  const SafeTensors& weights = folder.all;
  const auto& file_of = folder.file;
  const auto names = quant4_names(weights);
  const std::set<std::string> quantized(names.begin(), names.end());

  std::set<std::string> used;
  for (const auto& spec : llama_tensor_specs(ck.config)) {
    const auto file = file_of.find(spec.name);
    const std::string file_name = (file == file_of.end() ? dir : file->second).string();
    const std::string tw = "tensor '" + spec.name + "' in '" + file_name + "'";
    //! [read-4bit]
    // A 4-bit tensor (chapter 3's format, which is bitsandbytes') is kept as stored;
    // its float32 values are its dequantization, computed once here.
    if (quantized.count(spec.name)) {
      StoredQuant4 stored = get_quant4(weights, spec.name, file_name);
      if (stored.q.shape != spec.shape)
        throw std::runtime_error(tw + ": quant state shape " + shape_str(stored.q.shape) + ", but config.json implies " +
                                 shape_str(spec.shape));
      if (bnb) check_against_config(*bnb, stored.q, tw);
      ck.tensors.push_back({spec.name, spec.shape, dequantize_4bit_f32(stored.q), std::move(stored.q)});
      used.insert(spec.name);
      continue;
    }
    // transformers quantizes every linear projection and nothing else (embedding, norms
    // and lm_head stay in the model's float dtype), so a declared 4-bit folder whose
    // projection is not 4-bit was saved with llm_int8_skip_modules, which we refuse.
    if (bnb && spec.name.ends_with("_proj.weight"))
      throw std::runtime_error(tw + ": not stored in 4 bits, but config.json's quantization_config declares " +
                               describe_4bit(bnb->type, bnb->double_quant) + " for every projection");
    //! [read-4bit]
    if (file == file_of.end()) throw std::runtime_error(where + ": missing tensor '" + spec.name + "'");
    const Tensor& t = weights.at(spec.name);
    if (!is_floating(t.dtype) || t.dtype == DType::F64)
      throw std::runtime_error(tw + ": dtype " + to_string(t.dtype) + " (expected BF16, F16 or F32)");
    if (t.shape != spec.shape)
      throw std::runtime_error(tw + ": shape " + shape_str(t.shape) + ", but config.json implies " + shape_str(spec.shape));
    ck.tensors.push_back({spec.name, spec.shape, t.to_f32()});
    used.insert(spec.name);
  }
  for (const auto& [name, path] : file_of) {
    // A part of a 4-bit tensor X (X.absmax, X.quant_map, ...) goes where X goes.
    std::string tensor = name;
    if (is_quant4_part(weights, name))
      for (const auto& q : quantized)
        if (name.starts_with(q + ".")) tensor = q;
    if (used.count(tensor)) continue;
    // Older exports carry the RoPE frequencies as buffers, and tied models may still
    // store lm_head.weight; both are implied by the config.
    if (tensor.ends_with(".self_attn.rotary_emb.inv_freq")) continue;
    if (tensor == "lm_head.weight" && ck.config.shared_classifier) continue;
    throw std::runtime_error(where + ": unexpected tensor '" + name + "' in '" + path.string() +
                             "' (not part of a LLaMA model with this config)");
  }
  return ck;
}

void write_hf_llama(const std::filesystem::path& dir, const LlamaCheckpoint& ck) {
  const LlamaConfig& c = ck.config;
  validate_config(c, "write_hf_llama");
  std::filesystem::create_directories(dir);

  LlamaCheckpoint hf = ck;
  convert_rope_layout(hf, RopeLayout::rotate_half);
  SafeTensors st;
  st.metadata["format"] = "pt";
  for (const auto& spec : llama_tensor_specs(c)) {
    const auto& t = hf.at(spec.name);
    if (t.shape != spec.shape)
      throw std::invalid_argument("write_hf_llama: tensor '" + spec.name + "' has shape " + shape_str(t.shape) +
                                  ", config implies " + shape_str(spec.shape));
    st.tensors[spec.name] = Tensor::from_bf16(to_bf16(t.data), spec.shape);
  }

  nlohmann::ordered_json cfg;
  cfg["architectures"] = {"LlamaForCausalLM"};
  cfg["model_type"] = "llama";
  cfg["vocab_size"] = c.vocab_size;
  cfg["hidden_size"] = c.dim;
  cfg["intermediate_size"] = c.hidden_dim;
  cfg["num_hidden_layers"] = c.n_layers;
  cfg["num_attention_heads"] = c.n_heads;
  cfg["num_key_value_heads"] = c.n_kv_heads;
  cfg["max_position_embeddings"] = c.seq_len;
  cfg["rms_norm_eps"] = decimal_double(c.norm_eps);
  cfg["rope_theta"] = decimal_double(c.rope_theta);
  cfg["tie_word_embeddings"] = c.shared_classifier;
  cfg["bos_token_id"] = 1;
  cfg["eos_token_id"] = 2;
  cfg["hidden_act"] = "silu";
  cfg["torch_dtype"] = "bfloat16";
  cfg["attention_bias"] = false;
  cfg["mlp_bias"] = false;

  write_safetensors(dir / "model.safetensors", st);
  write_text_atomic(dir / "config.json", cfg.dump(2) + "\n");
}

}  // namespace qlora
