// The LLaMA model on the GPU (chapter 7, "The model on the GPU"): the same forward
// and LoRA-only backward as LlamaModel (src/llama_model.hpp, the CPU reference),
// built from chapter 5's dequantize + cuBLAS linear, chapter 4's CUDA LoRA and the
// building blocks of kernels/llama_ops.cuh.
//
// Precision, as QLoRA computes: the frozen projections stay in their stored form on
// the device (NF4/FP4 ± double quantization) and are dequantized to BF16 per matmul;
// the matmul inputs are rounded to BF16 and cuBLAS accumulates in float32. BF16
// storage multiplies its BF16 weights directly; F32 and Int4 storage (the exactness
// and baseline formats) are rounded to BF16 once at upload, so the GPU computes
// every base matmul in BF16; the embedding and the classifier are BF16 in every
// storage (with F32 storage the GPU rounds the embedding, the CPU does not). Everything else (residual stream, norms, attention,
// softmax, LoRA, gradients) is float32. Hence the tests' tolerance: a relative error
// of a few 1e-3 against the CPU's float32 model, not 1e-6.
#pragma once
#include "device_buffer.cuh"
#include "gemm4_mma.cuh"
#include "linear4.cuh"
#include "llama_model.hpp"
#include "lora.cuh"

#include <array>
#include <functional>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <vector>

namespace qlora::cuda {

/// One frozen projection on the device: its 4-bit form, or BF16 values.
struct DeviceFrozenLinear {
  int in = 0, out = 0;
  std::optional<DeviceQuant4> q4;  ///< nf4 / fp4 storage, ± double quantization
  DeviceBuffer<bf16> w;            ///< every other storage, rounded to BF16
  std::int64_t bytes() const;
};

/// Writes one frozen tensor, named and shaped as in a Hugging Face folder
/// (llama_tensor_specs), as BF16 into device memory on `stream`: how a streaming
/// loader (kernels/model_stream.cuh) hands the model its weights one at a time.
using TensorFill = std::function<void(const TensorSpec& spec, bf16* device_out, cudaStream_t stream)>;

/// A streaming load's progress, reported after each tensor.
struct LoadProgress {
  int tensors_done = 0, tensors_total = 0;
  std::int64_t bytes_done = 0, bytes_total = 0;  ///< BF16 bytes handed to the device
  double seconds = 0;
};

class LlamaModelGpu {
 public:
  /// Uploads the frozen weights of `host` in their stored form and its adapters (if any).
  explicit LlamaModelGpu(const LlamaModel& host);
  /// Builds the model directly in device memory, one tensor at a time (chapter 7,
  /// "Loading a big model"): `fill` writes each tensor as BF16 into one reused device
  /// buffer, the projections are quantized there into `storage` (nf4, nf4-dq, fp4, fp4-dq;
  /// bf16 keeps them as they are), and embeddings, norms and the classifier stay BF16.
  /// No float32 copy of the model exists anywhere. With `lora`, adapters are initialised
  /// as LlamaModel::add_lora does from `lora_rng` (same draws, same order).
  LlamaModelGpu(const LlamaConfig& config, BaseStorage storage, const TensorFill& fill,
                const std::optional<LoraSetup>& lora, std::mt19937_64& lora_rng,
                const std::function<void(const LoadProgress&)>& progress = {});
  ~LlamaModelGpu();
  LlamaModelGpu(const LlamaModelGpu&) = delete;
  LlamaModelGpu& operator=(const LlamaModelGpu&) = delete;

  const LlamaConfig& config() const { return cfg_; }
  /// Bytes of the frozen weights on the device (what QLoRA's 4-bit storage saves).
  std::int64_t frozen_bytes() const;

  /// As LlamaModel::forward: host token/target arrays (B×T), the mean cross-entropy
  /// over non-negative targets. Dropout masks come from `rng` in the CPU model's order
  /// (and with first_sequence, as the CPU model's, a data-parallel rank's share of them).
  float forward(const int* tokens, const int* targets, int B, int T, bool training, std::mt19937_64& rng,
                int first_sequence = 0);
  /// As LlamaModel::backward: accumulates dA, dB of every adapter.
  void backward();
  /// Logits of the last forward on the host, (B·T)×vocab (dLoss/dlogits after backward);
  /// only with head version 1 (throws std::logic_error otherwise).
  std::vector<float> logits() const;
  /// The classifier and the loss: 1, the whole batch's float32 logits at once, kept for
  /// logits() and differentiated in backward (the first version, the CPU model's order); or
  /// 2 (default), a chunk of rows at a time, the loss's gradient taken in forward
  /// (chunked_head), so no (B·T)×vocab float32 array exists. chunk_rows > 0 sets the rows
  /// per chunk (tests); 0 takes as many as 64 MiB of float32 logits hold.
  void set_head_version(int v, int chunk_rows = 0);
  /// Per-layer gradient checkpointing, as LlamaModel::set_checkpointing: forward keeps only
  /// each layer's input and the generator state its dropout masks start from; backward
  /// recomputes the layer into one reused set of buffers. (The constructor copies the
  /// host model's setting.)
  void set_checkpointing(bool on) { checkpointing_ = on; }
  /// With checkpointing, keep each layer's input in pinned host memory instead of device
  /// memory: copied out as the forward passes the layer, copied back before backward
  /// recomputes it. The copies are exact, so the gradients are those without offloading;
  /// they cost 2·layers·N·dim·4 bytes over the bus per step. For a model whose layer inputs
  /// do not fit beside its weights (65B in a 42 GiB card: 1.25 GiB of them at 512 tokens).
  void set_offload_checkpoints(bool on) { offload_ = on; }
  /// Which causal attention runs: 1, one warp per query row (kernels/llama_ops.cuh, the
  /// first and simplest GPU version), or 2 (default), the products through cuBLAS
  /// (kernels/attention_gemm.cuh). Both compute the CPU reference's function.
  void set_attention_version(int v);
  /// How the float32 products of the LoRA path and of attention run (float_math.cuh):
  /// tf32 (default), on the tensor cores; fp32, PEFT's arithmetic, the CPU reference's.
  /// The frozen projections are BF16 products either way.
  void set_float_math(FloatMath m) { float_math_ = m; }
  FloatMath float_math() const { return float_math_; }
  /// Bytes of device activations kept for backward at the peak of the last forward +
  /// backward (the recomputed layer included; logits excluded): what checkpointing saves.
  std::int64_t activation_bytes() const { return peak_act_bytes_; }
  /// The device buffers beyond weights and adapters, in bytes allocated, by what they hold:
  /// "layer inputs", "layer activations", "final norm" (the activations kept for backward),
  /// then "backward scratch", "LoRA scratch", "BF16 operands", "logits and loss",
  /// "dequantize scratch", "tokens". `qlora plan` predicts the same list
  /// (plan_training_memory, src/memory_plan.hpp), name for name.
  std::vector<std::pair<std::string, std::int64_t>> buffer_inventory() const;

  // --- the adapters ------------------------------------------------------------
  /// The device adapters in (layer, proj) order with their HF module names, as
  /// LlamaModel::named_adapters: the optimizer's tensors and the checkpoint order.
  std::vector<std::pair<std::string, DeviceLoraAdapter*>> named_adapters();
  /// The adapters' setup; throws std::logic_error when the model has none.
  const LoraSetup& lora_setup() const;
  void zero_grad();
  /// Multiplies every dA and dB by s (gradient accumulation's average).
  void scale_grads(float s);
  /// Copies A, B, dA, dB to the host model's adapters (same setup required).
  void download_adapters(LlamaModel& host) const;
  /// Copies A, B, dA, dB from the host model's adapters.
  void upload_adapters(const LlamaModel& host);

  cudaStream_t stream() const { return stream_; }

 private:
  friend class GpuDecoder;  // generation (kernels/generate_gpu.cuh) runs the same weights through linear()
  struct LayerActs;
  struct Layer {
    DeviceBuffer<float> rms_att, rms_ffn;
    std::array<DeviceFrozenLinear, kNumProj> w;
  };
  LlamaConfig cfg_;
  std::optional<LoraSetup> lora_;
  cudaStream_t stream_ = nullptr;
  CublasHandle cublas_;
  DequantScratch scratch_;
  Mma3Workspace mma3_;  ///< the tensor-core matmul version 3's partial sums (decoding)
  DeviceBuffer<float> rms_final_, rope_cos_, rope_sin_;
  DeviceBuffer<bf16> tok_emb_;  ///< the embedding, BF16
  DeviceBuffer<bf16> cls_;      ///< the classifier (a copy of the embedding when shared), BF16
  std::vector<Layer> layers_;
  std::vector<std::array<std::unique_ptr<DeviceLoraAdapter>, kNumProj>> adapters_;

  // Last forward's state.
  int B_ = 0, T_ = 0;
  bool backward_pending_ = false;
  bool checkpointing_ = false;
  int attention_version_ = 2;
  FloatMath float_math_ = FloatMath::tf32;
  int head_version_ = 2;
  int head_chunk_rows_ = 0;
  bool head_fused_ = false;  ///< the last forward ran head version 2
  static constexpr std::int64_t kHeadChunkBytes = std::int64_t{64} << 20;  ///< float32 logits per chunk
  bool offload_ = false;
  bool fwd_offloaded_ = false;  ///< offloading as it was during the last forward
  bool fwd_checkpointed_ = false;  ///< checkpointing as it was during the last forward
  bool training_ = false;
  std::int64_t first_position_ = 0;  ///< of the last forward in its global batch: the dropout masks' offset
  std::vector<DeviceFloats> layer_inputs_;   ///< with checkpointing: each layer's input
  std::vector<PinnedBuffer<float>> host_inputs_;  ///< the same in host memory, when offloaded
  DeviceFloats recompute_in_;                ///< an offloaded input, back on the device
  std::vector<std::mt19937_64> layer_rng_;   ///< with checkpointing: the rng at each layer's start
  DeviceFloats recompute_out_;               ///< the recomputed layer's (unused) output
  std::int64_t peak_act_bytes_ = 0;
  int target_count_ = 0;
  DeviceBuffer<int> tokens_, targets_;
  std::vector<std::unique_ptr<LayerActs>> acts_;
  DeviceFloats x_final_, inv_final_, xn_final_, logits_, row_loss_;
  DeviceBuffer<bf16> xb_, yb_;  ///< BF16 copies of matmul inputs (forward) and output gradients (backward)
  DeviceFloats tmp_, dx_, dxn_, dg_, dout_, dq_, dk_, dv_, ds_;
  DeviceLoraScratch lora_scratch_;  ///< one for every adapter

  /// x rounded to BF16 into `buf` (grown as needed): the operand of a frozen matmul.
  const bf16* rounded(DeviceBuffer<bf16>& buf, const float* x, std::int64_t n);
  /// y = x·deq(W)ᵀ + LoRA; xb is x rounded to BF16 (shared by the projections of one input).
  void linear(int l, Proj p, const float* x, const bf16* xb, float* y, int N, bool training, std::mt19937_64& rng,
              DeviceLoraCache& lc);
  void linear_backward(int l, Proj p, const float* x, const float* dy, float* dx, int N, bool accumulate,
                       DeviceLoraCache& lc);
  void layer_forward(int l, const float* x_in, float* x_out, bool training, std::mt19937_64& rng, LayerActs& a);
  void layer_backward(int l, LayerActs& a, float* dx);
  float chunked_head(const bf16* xnb, bool with_targets);
  float mean_loss();  ///< the mean of row_loss_ over the targets, on the host
  DeviceLoraAdapter* adapter(int l, Proj p) const;
  void init_rope();
  std::int64_t cached_bytes() const;
};

}  // namespace qlora::cuda
