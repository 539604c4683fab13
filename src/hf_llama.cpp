// Hugging Face LLaMA folders and the RoPE row permutation (chapter 7). See hf_llama.hpp.
#include "hf_llama.hpp"

#include "atomic_file.hpp"
#include "bf16.hpp"
#include "hf_folder.hpp"
#include "bnb_config.hpp"
#include "quant4_file.hpp"
#include "safetensors.hpp"

#include <nlohmann/json.hpp>

#include <charconv>
#include <cstdlib>
#include <fstream>
#include <limits>
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

// A field of a JSON object; `parent` names the object it sits in for messages
// ("rope_scaling.factor"), empty at the top level.
template <class T>
T get_field(const nlohmann::json& obj, const std::string& key, const std::string& where, const std::string& parent = "") {
  const std::string name = "\"" + (parent.empty() ? key : parent + "." + key) + "\"";
  if (!obj.contains(key)) throw std::runtime_error(where + ": missing " + name);
  const auto& v = obj[key];
  if constexpr (std::is_same_v<T, int>) {
    if (!v.is_number_integer() || v.get<std::int64_t>() <= 0 || v.get<std::int64_t>() > INT32_MAX)
      throw std::runtime_error(where + ": " + name + " must be a positive integer");
    return v.get<int>();
  } else if constexpr (std::is_same_v<T, float>) {
    if (!v.is_number() || !(v.get<double>() > 0.0))
      throw std::runtime_error(where + ": " + name + " must be a positive number");
    return v.get<float>();
  } else {
    if (!v.is_boolean()) throw std::runtime_error(where + ": " + name + " must be true or false");
    return v.get<bool>();
  }
}

bool present(const nlohmann::json& obj, const std::string& key) { return obj.contains(key) && !obj[key].is_null(); }

// RoPE in either spelling. transformers 4.x writes "rope_theta" at the top level and
// "rope_scaling" (null, or an object whose type key is "rope_type" or the older "type");
// 5.x writes one "rope_parameters" object holding rope_theta, rope_type and the scaling
// fields, and still reads the 4.x spelling. 4.x ignores "rope_parameters", so a value given
// in both places must agree, or the two versions would run different models.
void parse_rope(const nlohmann::json& cfg, LlamaConfig& c, const std::string& where) {
  if (present(cfg, "rope_scaling") && present(cfg, "rope_parameters") && cfg["rope_scaling"] != cfg["rope_parameters"])
    throw std::runtime_error(where + ": \"rope_scaling\" and \"rope_parameters\" differ; keep one");
  const std::string key = present(cfg, "rope_parameters") ? "rope_parameters" : "rope_scaling";
  const nlohmann::json rope = present(cfg, key) ? cfg[key] : nlohmann::json::object();
  if (!rope.is_object()) throw std::runtime_error(where + ": \"" + key + "\" must be an object or null");

  if (present(cfg, "rope_theta")) c.rope_theta = get_field<float>(cfg, "rope_theta", where);
  if (present(rope, "rope_theta")) {
    const float theta = get_field<float>(rope, "rope_theta", where, key);
    if (present(cfg, "rope_theta") && theta != c.rope_theta)
      throw std::runtime_error(where + ": \"rope_theta\" " + cfg["rope_theta"].dump() + " differs from \"" + key +
                               ".rope_theta\" " + rope["rope_theta"].dump());
    c.rope_theta = theta;
  }
  // Rotating only part of each head (Phi, GPT-NeoX style) is not implemented.
  for (const auto& [obj, name] : {std::pair{&cfg, std::string("partial_rotary_factor")},
                                  std::pair{&rope, key + ".partial_rotary_factor"}})
    if (present(*obj, "partial_rotary_factor") && (*obj)["partial_rotary_factor"] != 1.0)
      throw std::runtime_error(where + ": unsupported \"" + name + "\" " + (*obj)["partial_rotary_factor"].dump() +
                               " (RoPE on the whole head only)");

  const std::string type_key = rope.contains("rope_type") ? "rope_type" : "type";
  const std::string type_name = "\"" + key + "." + type_key + "\"";
  if (!present(rope, type_key) || rope[type_key] == "default") return;
  if (rope[type_key] != "llama3")
    throw std::runtime_error(where + ": unsupported " + type_name + " " + rope[type_key].dump() +
                             " (only \"default\" and \"llama3\")");
  RopeScaling& s = c.rope_scaling;
  s.type = RopeScaling::Type::llama3;
  s.factor = get_field<float>(rope, "factor", where, key);
  s.low_freq_factor = get_field<float>(rope, "low_freq_factor", where, key);
  s.high_freq_factor = get_field<float>(rope, "high_freq_factor", where, key);
  s.original_max_position_embeddings = get_field<int>(rope, "original_max_position_embeddings", where, key);
  if (s.high_freq_factor <= s.low_freq_factor)
    throw std::runtime_error(where + ": \"" + key + ".high_freq_factor\" must be greater than \"" + key +
                             ".low_freq_factor\"");
  // transformers 5 prefers a top-level original_max_position_embeddings (Phi-3 style), 4 reads the inner one.
  if (present(cfg, "original_max_position_embeddings") &&
      cfg["original_max_position_embeddings"] != s.original_max_position_embeddings)
    throw std::runtime_error(where + ": \"original_max_position_embeddings\" " +
                             cfg["original_max_position_embeddings"].dump() + " differs from \"" + key +
                             ".original_max_position_embeddings\" " + std::to_string(s.original_max_position_embeddings));
}

// config.json of a LLaMA-architecture model: model_type "llama", or "mistral" (LLaMA plus
// a sliding attention window). Missing fields take transformers' defaults. Fields that
// change the computation and are not implemented here are refused by name; the rest
// (architectures, dtype, token ids, initializer_range, use_cache, pretraining_tp, which
// only splits matmuls, quantization_config, read elsewhere) are ignored.
// bos_token_id or eos_token_id: an id, a list of ids, or null (none); absent: `fallback`.
std::vector<int> token_ids(const nlohmann::json& cfg, const char* key, int fallback, const std::string& where) {
  if (!cfg.contains(key)) return {fallback};
  const nlohmann::json& v = cfg[key];
  std::vector<int> ids;
  for (const auto& id : v.is_array() ? v : v.is_null() ? nlohmann::json::array() : nlohmann::json::array({v})) {
    if (!id.is_number_integer() || id.get<long long>() < 0 || id.get<long long>() > std::numeric_limits<int>::max())
      throw std::runtime_error(where + ": \"" + key + "\" " + v.dump() + " is not a token id or a list of them");
    ids.push_back(id.get<int>());
  }
  return ids;
}

LlamaConfig parse_config(const nlohmann::json& cfg, const std::string& where) {
  if (!cfg.is_object()) throw std::runtime_error(where + ": not a JSON object");
  if (!cfg.contains("model_type") || (cfg["model_type"] != "llama" && cfg["model_type"] != "mistral"))
    throw std::runtime_error(where + ": \"model_type\" must be \"llama\" or \"mistral\"");
  const bool mistral = cfg["model_type"] == "mistral";
  if (present(cfg, "hidden_act") && cfg["hidden_act"] != "silu")
    throw std::runtime_error(where + ": unsupported \"hidden_act\" " + cfg["hidden_act"].dump() + " (only silu)");
  for (const char* flag : {"attention_bias", "mlp_bias"})
    if (present(cfg, flag) && cfg[flag] != false)
      throw std::runtime_error(where + ": unsupported \"" + std::string(flag) + "\" (biases are not modelled)");
  // Dropout on the attention probabilities acts only in training; this model has none, so a
  // fine-tune would silently differ from the recipe the config describes.
  if (present(cfg, "attention_dropout") && cfg["attention_dropout"] != 0.0)
    throw std::runtime_error(where + ": unsupported \"attention_dropout\" " + cfg["attention_dropout"].dump() +
                             " (attention dropout is not implemented)");

  LlamaConfig c;
  c.dim = get_field<int>(cfg, "hidden_size", where);
  c.hidden_dim = get_field<int>(cfg, "intermediate_size", where);
  c.n_layers = get_field<int>(cfg, "num_hidden_layers", where);
  c.n_heads = get_field<int>(cfg, "num_attention_heads", where);
  // transformers' defaults: null means all heads; absent, all heads for LLaMA but 8 for Mistral.
  c.n_kv_heads = present(cfg, "num_key_value_heads")                 ? get_field<int>(cfg, "num_key_value_heads", where)
                 : mistral && !cfg.contains("num_key_value_heads") ? 8
                                                                     : c.n_heads;
  c.vocab_size = get_field<int>(cfg, "vocab_size", where);
  c.seq_len = get_field<int>(cfg, "max_position_embeddings", where);
  c.norm_eps = present(cfg, "rms_norm_eps") ? get_field<float>(cfg, "rms_norm_eps", where) : 1e-6f;
  c.shared_classifier = present(cfg, "tie_word_embeddings") && get_field<bool>(cfg, "tie_word_embeddings", where);
  c.bos_token_ids = token_ids(cfg, "bos_token_id", 1, where);
  c.eos_token_ids = token_ids(cfg, "eos_token_id", 2, where);
  parse_rope(cfg, c, where);
  // null means no window; MistralConfig's default is 4096. A window in a "llama" config is
  // honoured too: refusing the longer sequences is never wrong.
  if (present(cfg, "sliding_window"))
    c.sliding_window = get_field<int>(cfg, "sliding_window", where);
  else if (mistral && !cfg.contains("sliding_window"))
    c.sliding_window = 4096;
  validate_config(c, where);
  if (present(cfg, "head_dim") && cfg["head_dim"] != c.head_size())
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
  FolderTensors out;
  for (const auto& f : hf_weight_files(dir)) {
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

LlamaConfig read_hf_config(const std::filesystem::path& path) {
  const std::string where = "Hugging Face config '" + path.string() + "'";
  std::ifstream in(path);
  if (!in) throw std::runtime_error("cannot open " + where);
  try {
    return parse_config(nlohmann::json::parse(in), where);
  } catch (const nlohmann::json::parse_error& e) {
    throw std::runtime_error(where + ": not valid JSON: " + e.what());
  }
}

LlamaCheckpoint read_hf_llama(const std::filesystem::path& dir) {
  const std::string where = "Hugging Face checkpoint '" + dir.string() + "'";
  if (!std::filesystem::is_directory(dir)) throw std::runtime_error(where + ": not a directory");
  LlamaCheckpoint ck;
  ck.config = read_hf_config(dir / "config.json");
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
    check_float_tensor(spec, t.dtype, t.shape, tw);
    ck.tensors.push_back({spec.name, spec.shape, t.to_f32()});
    check_finite(ck.tensors.back(), tw);
    used.insert(spec.name);
  }
  for (const auto& [name, path] : file_of) {
    // A part of a 4-bit tensor X (X.absmax, X.quant_map, ...) goes where X goes.
    std::string tensor = name;
    if (is_quant4_part(weights, name))
      for (const auto& q : quantized)
        if (name.starts_with(q + ".")) tensor = q;
    if (used.count(tensor) || implied_by_config(tensor, ck.config)) continue;
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

  write_safetensors(dir / "model.safetensors", st);
  write_hf_config(dir / "config.json", c);
}

void write_hf_config(const std::filesystem::path& path, const LlamaConfig& c) {
  // A window makes it a Mistral model; without one Mistral is plain LLaMA.
  const bool mistral = c.sliding_window > 0;
  nlohmann::ordered_json cfg;
  cfg["architectures"] = {mistral ? "MistralForCausalLM" : "LlamaForCausalLM"};
  cfg["model_type"] = mistral ? "mistral" : "llama";
  cfg["vocab_size"] = c.vocab_size;
  cfg["hidden_size"] = c.dim;
  cfg["intermediate_size"] = c.hidden_dim;
  cfg["num_hidden_layers"] = c.n_layers;
  cfg["num_attention_heads"] = c.n_heads;
  cfg["num_key_value_heads"] = c.n_kv_heads;
  cfg["max_position_embeddings"] = c.seq_len;
  cfg["rms_norm_eps"] = decimal_double(c.norm_eps);
  // transformers 4.x's spelling, which 5.x still reads (4.x ignores 5.x's "rope_parameters").
  cfg["rope_theta"] = decimal_double(c.rope_theta);
  if (c.rope_scaling.type == RopeScaling::Type::llama3) {
    const RopeScaling& r = c.rope_scaling;
    cfg["rope_scaling"] = {{"rope_type", "llama3"},
                           {"factor", decimal_double(r.factor)},
                           {"low_freq_factor", decimal_double(r.low_freq_factor)},
                           {"high_freq_factor", decimal_double(r.high_freq_factor)},
                           {"original_max_position_embeddings", r.original_max_position_embeddings}};
  } else {
    cfg["rope_scaling"] = nullptr;
  }
  if (mistral) cfg["sliding_window"] = c.sliding_window;
  cfg["tie_word_embeddings"] = c.shared_classifier;
  // An id, a list of ids, or null, as transformers writes them.
  for (const auto& [key, ids] : {std::pair{"bos_token_id", &c.bos_token_ids}, std::pair{"eos_token_id", &c.eos_token_ids}})
    cfg[key] = ids->empty() ? nlohmann::ordered_json(nullptr) : ids->size() == 1 ? nlohmann::ordered_json(ids->front())
                                                                                 : nlohmann::ordered_json(*ids);
  cfg["hidden_act"] = "silu";
  cfg["torch_dtype"] = "bfloat16";
  cfg["attention_bias"] = false;
  cfg["mlp_bias"] = false;

  write_text_atomic(path, cfg.dump(2) + "\n");
}

}  // namespace qlora
