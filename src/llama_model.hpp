// The LLaMA model on the CPU (chapter 7, "The model"): embedding, RMSNorm, RoPE,
// causal attention with grouped-query heads, SwiGLU MLP, final norm, classifier,
// cross-entropy loss; forward over a batch, backward for the LoRA parameters only,
// optional per-layer gradient checkpointing, and a KV-cache decoder for generation.
//
// Storage (QLoRA's recipe): the seven linear projections of every layer (q, k, v,
// o, gate, up, down) are frozen in one of the BaseStorage formats; embeddings,
// norms and the classifier are frozen in BF16 (F32 storage keeps everything in
// float32, for the exactness tests). CPU execution path: every frozen projection
// is dequantized ONCE at load into a float32 cache that OpenBLAS multiplies; the
// cached values are exactly the dequantized 4-bit values, so the results equal a
// dequantize-on-the-fly implementation (the GPU path dequantizes per matmul).
//
// RoPE convention: one attention code path, Hugging Face's — rotate the pairs
// (x[i], x[i + head_size/2]) of every head (transformers' rotate_half). Hugging Face
// folders and PEFT adapters use this order already, so their weights (4-bit ones too)
// and lora_B rows load as stored; a llama2.c checkpoint (interleaved pairs) has its
// q/k rows permuted to this layout once, when loaded.
#pragma once

#include "llama2c.hpp"
#include "lora.hpp"
#include "quant4.hpp"
#include "quant_basics.hpp"

#include <array>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <random>
#include <span>
#include <string>
#include <vector>

namespace qlora {

// ---------------------------------------------------------------------------
// Weights in float32 (the loaders' output, the model's input)

/// The seven linear projections of a layer, in PEFT's target_modules order.
enum class Proj { q, k, v, o, gate, up, down };
inline constexpr int kNumProj = 7;
inline constexpr std::array<Proj, kNumProj> kAllProj = {Proj::q,    Proj::k,  Proj::v,   Proj::o,
                                                       Proj::gate, Proj::up, Proj::down};
/// "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj".
const char* proj_name(Proj p);
/// Inverse of proj_name (also accepts "q", "gate", ...); throws std::invalid_argument naming the value.
Proj parse_proj(const std::string& s);
/// Hugging Face module path, e.g. "model.layers.3.self_attn.q_proj" or "model.layers.3.mlp.down_proj".
std::string hf_module_name(int layer, Proj p);

/// A whole LLaMA in float32, q/k rows in Hugging Face's rotate-half RoPE layout.
/// Linear weights are out×in row-major (W1 = gate, W3 = up, W2 = down).
struct LlamaWeights {
  LlamaConfig config;
  std::vector<float> tok_emb;  ///< vocab × dim
  struct Layer {
    std::vector<float> rms_att, rms_ffn;  ///< dim each
    std::array<std::vector<float>, kNumProj> w;  ///< indexed by Proj
    /// The stored 4-bit form of projections that a checkpoint saved in 4 bits (w holds
    /// their dequantized values); the model keeps it as it is, never quantizing again.
    std::array<std::optional<Quant4Tensor>, kNumProj> q4;
  };
  std::vector<Layer> layers;
  std::vector<float> rms_final;  ///< dim
  std::vector<float> wcls;       ///< vocab × dim; empty when shared with tok_emb

  /// Shape (out, in) of projection p.
  std::pair<int, int> proj_shape(Proj p) const;
};

/// From a checkpoint in memory (tensors named as in Hugging Face); q/k rows of a
/// checkpoint in llama2.c's interleaved layout are permuted to the rotate-half one.
/// 4-bit projections keep their stored form (Layer::q4); every projection must then be
/// 4-bit in one format (prequantized_storage), else std::runtime_error names the tensor.
LlamaWeights weights_from_checkpoint(const LlamaCheckpoint& ck);
/// The inverse: a checkpoint in the rotate-half layout with Hugging Face names (for
/// write_hf_llama, e.g. to export a merged model).
LlamaCheckpoint checkpoint_from_weights(const LlamaWeights& w);
/// Loads a llama2.c .bin file (q/k permuted to the rotate-half layout) or a Hugging
/// Face LLaMA folder (config.json + model.safetensors, as stored). Throws
/// std::runtime_error naming the path on anything missing or malformed.
LlamaWeights load_llama_weights(const std::filesystem::path& path);
/// A random model for tests: N(0, 0.02²)-ish weights from a seeded generator,
/// norms near 1, separate classifier when !config.shared_classifier.
LlamaWeights random_llama_weights(const LlamaConfig& config, std::uint64_t seed);

// ---------------------------------------------------------------------------
// Frozen storage of the linear projections

enum class BaseStorage { float32, bfloat16, nf4, nf4_dq, fp4, fp4_dq, int4 };
/// "f32", "bf16", "nf4", "nf4-dq", "fp4", "fp4-dq", "int4".
std::string to_string(BaseStorage s);
/// Inverse of to_string (also "nf4+dq", "nf4_dq"); throws std::invalid_argument naming the value.
BaseStorage parse_base_storage(const std::string& s);
/// nf4, nf4-dq, fp4 or fp4-dq: the storage a 4-bit tensor is in.
BaseStorage storage_of(const Quant4Tensor& q);
/// The storage of a model whose projections were loaded in 4 bits (a bitsandbytes
/// folder, `qlora quantize` output), nullopt for one loaded in float. Throws
/// std::runtime_error naming the first projection that is not in the others' format.
std::optional<BaseStorage> prequantized_storage(const LlamaWeights& w);

/// Blockwise absmax int4 (blocksize 64), the naive 4-bit baseline of the comparison
/// table: each block is chapter 1's absmax quantization with 4 bits (codes −7..7,
/// value = code·absmax/7).
struct Int4Tensor {
  int blocksize = 64;
  std::int64_t numel = 0;
  std::vector<AbsmaxQuant> blocks;
  /// Two codes per byte plus one float32 absmax per block.
  std::int64_t storage_bytes() const;
};
Int4Tensor quantize_int4(std::span<const float> x, int blocksize = 64);
std::vector<float> dequantize_int4(const Int4Tensor& q);

/// One frozen projection W (out×in): its stored form and the float32 cache the CPU multiplies.
struct FrozenLinear {
  int in = 0, out = 0;
  BaseStorage storage = BaseStorage::float32;
  std::optional<Quant4Tensor> q4;  ///< nf4 / fp4 storage (with or without double quant)
  std::optional<Int4Tensor> i4;    ///< int4 storage
  std::vector<float> w;            ///< out×in float32: exactly the stored values, dequantized once
  /// Bytes of the stored form (f32: 4/param, bf16: 2/param, 4-bit: codes + scales).
  std::int64_t storage_bytes() const;
};
FrozenLinear make_frozen_linear(const std::vector<float>& w, int out, int in, BaseStorage storage);
/// A projection already stored in 4 bits (shape out×in), kept as it is: its storage is
/// storage_of(q), its float32 cache the dequantized values.
FrozenLinear make_frozen_linear(Quant4Tensor q);

/// Which projections get an adapter, and the adapter hyper-parameters.
struct LoraSetup {
  LoraConfig config;
  std::array<bool, kNumProj> targets = {true, true, true, true, true, true, true};
};

// ---------------------------------------------------------------------------
// The model

/// Checks a batch's ids (tokens in [0, vocab), targets < vocab; negative targets are
/// ignored positions) and returns the number of targets that count. Throws
/// std::out_of_range naming the first bad id and its index.
int check_batch_ids(const int* tokens, const int* targets, int N, int vocab);

class LlamaModel {
 public:
  /// Freezes `weights` into `storage` (linear projections) and BF16 (embeddings,
  /// norms, classifier; F32 storage keeps them float32). Weights loaded in 4 bits keep
  /// their stored form: `storage` must then be prequantized_storage(weights), else
  /// std::invalid_argument names both.
  LlamaModel(const LlamaWeights& weights, BaseStorage storage);

  const LlamaConfig& config() const { return cfg_; }
  BaseStorage storage() const { return storage_; }
  const FrozenLinear& frozen(int layer, Proj p) const;
  /// The float32 values the model computes with (BF16-rounded unless F32 storage).
  const std::vector<float>& tok_emb() const { return tok_emb_; }
  const std::vector<float>& classifier() const;  ///< tok_emb() when shared
  const std::vector<float>& rms_att(int layer) const;
  const std::vector<float>& rms_ffn(int layer) const;
  const std::vector<float>& rms_final() const { return rms_final_; }
  /// Bytes of all frozen parameters as stored (4-bit projections + bf16 rest).
  std::int64_t frozen_storage_bytes() const;

  // --- LoRA ---------------------------------------------------------------
  /// Adds adapters (PEFT init: A ~ U(±1/√in) from rng, B = 0) on the targeted projections
  /// of every layer; replaces existing adapters.
  void add_lora(const LoraSetup& setup, std::mt19937_64& rng);
  bool has_lora() const { return lora_.has_value(); }
  const LoraSetup& lora_setup() const;  ///< throws when no adapters
  /// The adapter of (layer, p), or nullptr when that projection is not targeted.
  LoraAdapter* adapter(int layer, Proj p);
  const LoraAdapter* adapter(int layer, Proj p) const;
  /// All adapters in (layer, proj) order, with their HF module names.
  std::vector<std::pair<std::string, LoraAdapter*>> named_adapters();
  std::int64_t lora_parameter_count() const;
  void zero_grad();

  // --- execution options --------------------------------------------------
  /// true: plain-loop matmuls (matmul_*_ref, lora_*_ref) — the reference the tests trust.
  /// false (default): BLAS, the CPU execution path. Everything else is the same code.
  void set_reference(bool on) { reference_ = on; }
  /// Per-layer gradient checkpointing: forward keeps only each layer's input, backward recomputes the layer.
  void set_checkpointing(bool on) { checkpointing_ = on; }
  /// Rounds both operands of every frozen matmul (activations or output gradients, and
  /// the weights) to BF16 before multiplying them in float32: what the GPU model computes
  /// (BF16 tensor cores, float32 accumulation), so its tests can compare like with like.
  void set_bf16_compute(bool on) { bf16_compute_ = on; }
  bool checkpointing() const { return checkpointing_; }

  // --- training -----------------------------------------------------------
  /// Forward over B sequences of T tokens (row-major B×T ids, T ≤ seq_len). `targets`
  /// (B×T, may be nullptr) gives the next token of every position; negative targets are
  /// ignored. Returns the mean cross-entropy over the non-ignored targets (0 when none or
  /// no targets). Keeps the activations backward needs; `training` turns LoRA dropout on
  /// (masks drawn from rng). A data-parallel rank passes the index of its first sequence
  /// in the step's global batch: its dropout masks are then the global batch's.
  float forward(const int* tokens, const int* targets, int B, int T, bool training, std::mt19937_64& rng,
                int first_sequence = 0);
  /// Logits of the last forward, (B·T) × vocab. backward() overwrites them with dLoss/dlogits.
  const std::vector<float>& logits() const { return logits_; }
  /// Accumulates dLoss/dA and dLoss/dB of every adapter for the last forward (with targets);
  /// once per forward (throws std::logic_error otherwise).
  void backward();
  /// Peak bytes of cached activations during the last forward + backward (float32
  /// buffers that exist only for backward; logits excluded) — what checkpointing saves.
  std::int64_t activation_bytes() const { return peak_act_bytes_; }

  // --- generation ---------------------------------------------------------
  /// Starts a new sequence for decode_step (clears the KV cache).
  void reset_kv();
  /// Feeds the token at position pos (0, 1, 2, ... in order, pos < seq_len) and returns
  /// the vocab logits of the next token. LoRA adapters are applied (no dropout).
  const std::vector<float>& decode_step(int token, int pos);

  ~LlamaModel();
  LlamaModel(LlamaModel&&) noexcept;
  LlamaModel& operator=(LlamaModel&&) noexcept;
  LlamaModel(const LlamaModel&) = delete;
  LlamaModel& operator=(const LlamaModel&) = delete;

 private:
  struct LayerCache;
  struct Layer {
    std::vector<float> rms_att, rms_ffn;
    std::array<FrozenLinear, kNumProj> w;
  };
  LlamaConfig cfg_;
  BaseStorage storage_;
  std::vector<float> tok_emb_, wcls_, rms_final_;
  std::vector<Layer> layers_;
  std::optional<LoraSetup> lora_;
  std::vector<std::array<std::unique_ptr<LoraAdapter>, kNumProj>> adapters_;
  bool reference_ = false;
  bool checkpointing_ = false;
  bool bf16_compute_ = false;

  std::vector<float> rope_cos_, rope_sin_;  ///< seq_len × head_size/2 angle tables

  // Last forward's state.
  int B_ = 0, T_ = 0;
  bool training_ = false;
  std::int64_t first_position_ = 0;  ///< of the last forward in its global batch: the dropout masks' offset
  bool fwd_checkpointed_ = false;  ///< checkpointing as it was during the last forward
  bool backward_pending_ = false;  ///< the last forward had targets and was not yet differentiated
  std::vector<int> targets_;
  std::vector<std::unique_ptr<LayerCache>> caches_;  ///< per layer (only the input when checkpointing)
  std::unique_ptr<LayerCache> scratch_;              ///< the recomputed layer when checkpointing
  std::vector<std::mt19937_64> layer_rng_;  ///< rng state at each layer's start (checkpoint recompute)
  std::vector<float> x_final_, inv_rms_final_, xn_final_, logits_;
  std::int64_t peak_act_bytes_ = 0;

  // Decoder state.
  std::vector<std::vector<float>> kcache_, vcache_;
  std::vector<float> dec_logits_;

  /// y (=|+=) x·Wᵀ and dx (=|+=) dy·W for a frozen W: the reference loops or BLAS, on
  /// BF16-rounded operands when bf16_compute_.
  void frozen_xwt(const float* x, const float* w, float* y, int N, int in, int out) const;
  void frozen_dyw(const float* dy, const float* w, float* dx, int N, int in, int out, bool accumulate) const;
  void linear(int layer, Proj p, const float* x, float* y, int N, bool training, std::mt19937_64& rng,
              LoraCache& lc) const;
  void linear_backward(int layer, Proj p, const float* x, const float* dy, float* dx, int N, bool accumulate,
                       const LoraCache& lc);
  void layer_forward(int l, float* x_out, bool training, std::mt19937_64& rng, LayerCache& c) const;
  void layer_backward(int l, const LayerCache& c, float* dx);
  LayerCache& scratch();
  std::int64_t cached_bytes() const;
};

}  // namespace qlora
