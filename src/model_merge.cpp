// Merging a PEFT adapter into the base and exporting the merged model (chapter 7). See model_merge.hpp.
#include "model_merge.hpp"

#include "atomic_file.hpp"
#include "hf_llama.hpp"
#include "tokenizer.hpp"

#include <fstream>
#include <iterator>
#include <set>
#include <stdexcept>

namespace qlora {

namespace fs = std::filesystem;

//! [merge-peft]
int merge_peft_adapter(LlamaWeights& weights, const PeftAdapter& adapter, const std::string& where) {
  const LlamaConfig& c = weights.config;
  std::set<std::string> merged;
  for (int l = 0; l < c.n_layers; ++l)
    for (Proj p : kAllProj) {
      const std::string name = hf_module_name(l, p);
      auto it = adapter.modules.find(name);
      if (it == adapter.modules.end()) continue;
      const LoraAdapter& a = it->second;
      const auto [out, in] = weights.proj_shape(p);
      if (a.in != in || a.out != out)
        throw std::runtime_error(where + ": module " + name + " adapts a " + std::to_string(a.out) + "×" +
                                 std::to_string(a.in) + " weight, but the model's is " + std::to_string(out) + "×" +
                                 std::to_string(in) + " (adapter trained on another model?)");
      auto& layer = weights.layers[static_cast<std::size_t>(l)];
      lora_merge(a, adapter.config, layer.w[static_cast<int>(p)].data());
      layer.q4[static_cast<int>(p)].reset();  // W + s·B·A is no longer the stored 4-bit weight
      merged.insert(name);
    }
  for (const auto& [name, a] : adapter.modules)
    if (!merged.count(name))
      throw std::runtime_error(where + ": module " + name + " is not a projection of this model (" +
                               std::to_string(c.n_layers) + " layers; adapter trained on another model?)");
  return static_cast<int>(merged.size());
}
//! [merge-peft]

namespace {

// The tokenizer next to the base, if its vocabulary is the model's (llama2.c folders hold
// models with different tokenizers side by side, e.g. stories260K's 512 tokens):
// tokenizer.model, else tokenizer.json with the tokenizer_config.json that names its BOS/EOS.
bool copy_tokenizer(const fs::path& model, int vocab_size, const fs::path& out_dir) {
  const auto dir = fs::is_directory(model) ? model : model.parent_path();
  const bool sentencepiece = fs::exists(dir / "tokenizer.model");
  const auto main = dir / (sentencepiece ? "tokenizer.model" : "tokenizer.json");
  if (!fs::exists(main) || load_tokenizer(main)->vocab_size() != vocab_size) return false;
  std::vector<fs::path> files{main};
  if (!sentencepiece && fs::exists(dir / "tokenizer_config.json")) files.push_back(dir / "tokenizer_config.json");
  for (const auto& src : files) {
    std::ifstream in(src, std::ios::binary);
    const std::string bytes{std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
    if (!in && !in.eof()) throw std::runtime_error("cannot read " + src.string());
    write_file_atomic(out_dir / src.filename(), std::span<const char>(bytes.data(), bytes.size()));
  }
  return true;
}

}  // namespace

MergeSummary merge_model(const fs::path& model, const fs::path& adapter_dir, const fs::path& out_dir) {
  if (fs::exists(out_dir) && fs::exists(model) && fs::equivalent(out_dir, model))
    throw std::invalid_argument("merge: --out " + out_dir.string() + " is the base model itself; choose a new folder");
  // A reader would prefer a stale shard index over the model.safetensors written here.
  if (fs::exists(out_dir / "model.safetensors.index.json"))
    throw std::invalid_argument("merge: --out " + out_dir.string() +
                                " holds a sharded checkpoint (model.safetensors.index.json); choose a new folder");
  LlamaWeights weights = load_llama_weights(model);
  MergeSummary s;
  s.modules = merge_peft_adapter(weights, read_peft_adapter(adapter_dir), "adapter " + adapter_dir.string());
  write_hf_llama(out_dir, checkpoint_from_weights(weights));
  s.tokenizer_copied = copy_tokenizer(model, weights.config.vocab_size, out_dir);
  return s;
}

}  // namespace qlora
