// Generation on the GPU (chapter 7, "Generation with a KV cache"): the decode loop of
// generate_text (src/generate.cpp, the CPU reference) with LlamaModelGpu's weights, a
// KV cache in device memory, sampling on the device, and several prompts decoded as one
// batch.
//
// The cache is float32, as the CPU model's: attention reads it in float32 on both sides,
// so the cache adds no rounding the CPU does not make, and it is small beside the weights
// (2·layers·max_seq·kv_dim·4 bytes per sequence: 3.4 MiB for kjv15M's 256 positions, 1 GiB
// for LLaMA-7B's 2048 beside its 3.5 GiB of 4-bit weights — BF16 would halve it at the cost
// of a rounding per value).
//
// Prompts of different lengths: each prompt is prefilled alone into its own cache slot
// (its tokens at positions 0..P−1, all at once), then every sequence advances one token
// per decode step with its own position. No padding and no masks: a sequence's rows are
// the ones it would have alone, and the only difference the batch makes is the number of
// rows cuBLAS multiplies at once.
#pragma once
#include "generate.hpp"
#include "llama_model_gpu.cuh"

#include <string>
#include <vector>

namespace qlora::cuda {

/// Most sequences one decode step runs; more prompts are generated in groups of this many.
inline constexpr int kMaxDecodeBatch = 32;

/// The device state of decoding: the KV cache of `slots` sequences of up to `max_seq`
/// positions, the activations of one step, the logits and the sampled ids of each slot.
class GpuDecoder {
 public:
  /// cuda_graphs: replay the decode step from a CUDA graph once it has run eagerly (step()).
  GpuDecoder(LlamaModelGpu& model, int slots, int max_seq, bool cuda_graphs = true);
  int slots() const { return slots_; }
  int max_seq() const { return max_seq_; }

  /// Runs a prompt's tokens (host ids) at positions 0..P−1 through the model into the cache
  /// of `slot`, all rows at once; the logits of its last token land in row `slot`.
  void prefill(int slot, const std::vector<int>& ids);
  /// One decode step for slots 0..n−1: slot b's token (ids(), on the device) at position
  /// pos[b] goes through every layer against its cache; logits rows 0..n−1. The first step of
  /// a row count runs eagerly (it sizes the buffers); with cuda_graphs the second is captured
  /// into a CUDA graph and every later one replays it, the positions uploaded before the launch.
  void step(const std::vector<int>& pos);
  /// Picks each of rows 0..n−1's next token on the device into ids(): greedy at
  /// temperature 0, else sample_token's top-p draw with u = draws()[draw] as its uniform.
  void sample(int n, float temperature, float top_p, int draw);
  /// Sets slots 0..ids.size()−1's next tokens from the host (tests feed both models the same ids).
  void set_ids(const std::vector<int>& ids);
  /// Uploads the uniforms sample() reads, draw n of the CPU's generator at index n.
  void set_draws(const std::vector<double>& u);
  /// Rows 0..n−1's next tokens and logits, copied to the host.
  std::vector<int> ids(int n) const;
  std::vector<float> logits(int n) const;
  /// Fills the cache, the logits and the activations with NaN (tests: an unwritten value shows).
  void poison();

 private:
  LlamaModelGpu& m_;
  int slots_, max_seq_;
  std::vector<DeviceFloats> kc_, vc_;  ///< per layer: slots × max_seq × kv_dim
  DeviceFloats x_, xn_, q_, k_, v_, o_, tmp_, h1_, h3_, g_, scores_, logits_;
  DeviceBuffer<bf16> xb_;  ///< the BF16 operand of the projections running now
  DeviceLoraCache lora_cache_;  ///< the adapters' forward cache, unused in eval but kept to stay allocated
  DeviceBuffer<int> tokens_, pos_, slot_, ids_;
  DeviceBuffer<float> max_logit_;
  DeviceBuffer<double> draws_, probs_, sorted_probs_;
  DeviceBuffer<int> order_, sorted_order_, offsets_;
  DeviceBuffer<unsigned char> sort_temp_;
  std::size_t sort_temp_bytes_ = 0;

  /// An instantiated graph of the decode step for graph_rows_ rows (RAII).
  struct StepGraph {
    cudaGraphExec_t exec = nullptr;
    StepGraph() = default;
    StepGraph(const StepGraph&) = delete;
    StepGraph& operator=(const StepGraph&) = delete;
    ~StepGraph();
  };
  bool cuda_graphs_;
  int eager_rows_ = 0;  ///< rows of the last eager step: the buffers are sized for them
  int graph_rows_ = 0;
  StepGraph graph_;

  /// What a decode step launches after the positions are on the device.
  void step_kernels(int n);
  /// Records step_kernels(n) into graph_ and launches it.
  void capture_step(int n);
  /// N rows (tokens_, pos_, slot_ on the device) through every layer: the output is x_ + tmp_
  /// (the last down projection is added by head()'s norm, in the same launch).
  void layers(int N);
  /// Final norm and classifier of n rows of x_ + tmp_ from `row`, into logits rows from `out_row`.
  void head(int row, int n, int out_row);
  void upload_rows(const std::vector<int>& pos, const std::vector<int>& slot);
};

/// Decoding's cost: prompt tokens prefilled, tokens generated, seconds from the first
/// prefill to the last token on the host, and of those the prefills' (cache allocation included).
struct GenerateStats {
  long long prompt_tokens = 0, generated_tokens = 0;
  double seconds = 0, prefill_seconds = 0;
  /// Generated tokens per second of decoding, prefill left out.
  double decode_tokens_per_s() const {
    return seconds > prefill_seconds ? static_cast<double>(generated_tokens) / (seconds - prefill_seconds) : 0.0;
  }
};

/// generate_text for each prompt, decoded kMaxDecodeBatch at a time on the GPU, in order.
/// Same stops as the CPU (EOS or BOS); refuses a prompt whose tokens plus max_tokens
/// exceed the model's context. Sequence b samples with its own generator seeded cfg.seed,
/// as generate_text would alone. One copy to the host per step: the sampled ids.
std::vector<std::string> generate_text_gpu(LlamaModelGpu& model, const Tokenizer& tok,
                                           const std::vector<std::string>& prompts, const SampleConfig& cfg,
                                           GenerateStats* stats = nullptr, bool cuda_graphs = true);

}  // namespace qlora::cuda
