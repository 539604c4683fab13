// Generation on the GPU (chapter 7). See generate_gpu.cuh; the CPU references are
// LlamaModel::decode_step (src/llama_model.cpp) for one token through the model,
// sample_token and generate_text (src/generate.cpp) for the choice of the next token
// and the loop around it.
#include "generate_gpu.cuh"

#include "llama_ops.cuh"

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <cub/device/device_segmented_radix_sort.cuh>

#include <algorithm>
#include <chrono>
#include <climits>
#include <numeric>
#include <stdexcept>

namespace qlora::cuda {

namespace {

std::size_t usz(std::int64_t a) { return static_cast<std::size_t>(a); }

constexpr int kSampleThreads = 256;

// The largest logit and the first index holding it (std::max_element's choice).
struct Best {
  float v;
  int i;
};
struct Smaller {
  __device__ int operator()(int a, int b) const { return a < b ? a : b; }
};
struct BestOf {
  __device__ Best operator()(const Best& a, const Best& b) const {
    return b.v > a.v || (b.v == a.v && b.i < a.i) ? b : a;
  }
};

//! [argmax-cuda]
// One block per row: sample_token's argmax (greedy decoding), and the maximum that its
// softmax subtracts.
__global__ void argmax_kernel(const float* __restrict__ logits, int V, int* __restrict__ ids,
                              float* __restrict__ max_logit) {
  using Reduce = cub::BlockReduce<Best, kSampleThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  const float* l = logits + (std::int64_t)blockIdx.x * V;
  Best b{-INFINITY, INT_MAX};
  for (int i = threadIdx.x; i < V; i += blockDim.x) b = BestOf()(b, Best{l[i], i});
  b = Reduce(tmp).Reduce(b, BestOf());
  if (threadIdx.x == 0) {
    ids[blockIdx.x] = b.i;
    max_logit[blockIdx.x] = b.v;
  }
}
//! [argmax-cuda]

// prob = exp((logit − max) / temperature) in double, as sample_token computes it, with
// each token's id beside it for the sort.
__global__ void softmax_numerator_kernel(const float* __restrict__ logits, const float* __restrict__ max_logit,
                                         std::int64_t n, int V, float temperature, double* __restrict__ prob,
                                         int* __restrict__ order) {
  for (std::int64_t j = blockIdx.x * (std::int64_t)blockDim.x + threadIdx.x; j < n;
       j += (std::int64_t)gridDim.x * blockDim.x) {
    const double mx = max_logit[j / V];
    prob[j] = exp((static_cast<double>(logits[j]) - mx) / static_cast<double>(temperature));
    order[j] = static_cast<int>(j % V);
  }
}

//! [nucleus-cuda]
// One block per row, on the probabilities sorted in descending order: sample_token's
// nucleus (the first `keep` tokens, the fewest whose mass reaches top_p of the sum, at
// least one) and its draw (the first token where the running mass passes u·mass). The
// running sums are block-wide scans over chunks of the row, carried from chunk to chunk.
__global__ void nucleus_kernel(const double* __restrict__ sorted_prob, const int* __restrict__ sorted_order, int V,
                               float top_p, const double* __restrict__ draws, int draw, int* __restrict__ ids) {
  using Scan = cub::BlockScan<double, kSampleThreads>;
  using SumD = cub::BlockReduce<double, kSampleThreads>;
  using MinI = cub::BlockReduce<int, kSampleThreads>;
  __shared__ union {
    typename Scan::TempStorage scan;
    typename SumD::TempStorage sum;
    typename MinI::TempStorage min;
  } tmp;
  __shared__ double shared_d;
  __shared__ int shared_i;
  const double* p = sorted_prob + (std::int64_t)blockIdx.x * V;
  const int* order = sorted_order + (std::int64_t)blockIdx.x * V;

  double part = 0.0;
  for (int i = threadIdx.x; i < V; i += blockDim.x) part += p[i];
  part = SumD(tmp.sum).Sum(part);
  if (threadIdx.x == 0) shared_d = part;
  __syncthreads();
  const double total = shared_d;

  // First the nucleus' size (target: top_p of the sum), then the draw (target: u·mass).
  // first(target, strict): the smallest k ≥ 1 whose prefix mass of k tokens is ≥ target
  // (> target when strict), or `limit` when none is; its prefix mass in shared_d.
  auto first = [&](double target, bool strict, int limit) {
    double carry = 0.0;
    int found = INT_MAX;
    for (int c = 0; c < limit && found == INT_MAX; c += blockDim.x) {
      const int i = c + threadIdx.x;
      double incl = 0.0, chunk = 0.0;
      __syncthreads();  // tmp is reused
      Scan(tmp.scan).InclusiveSum(i < limit ? p[i] : 0.0, incl, chunk);
      const double mass = carry + incl;
      const bool hit = i < limit && (strict ? mass > target : mass >= target);
      __syncthreads();
      found = MinI(tmp.min).Reduce(hit ? i + 1 : INT_MAX, Smaller());
      if (threadIdx.x == 0) shared_i = found;
      __syncthreads();
      found = shared_i;
      if (found != INT_MAX && i + 1 == found) shared_d = mass;
      carry += chunk;
    }
    __syncthreads();
    if (found == INT_MAX) {
      found = limit;
      if (threadIdx.x == 0) shared_d = carry;
    }
    __syncthreads();
    return found;
  };
  const int keep = first(static_cast<double>(top_p) * total, false, V);
  const double mass = shared_d;
  __syncthreads();
  const int pick = first(draws[draw] * mass, true, keep);
  if (threadIdx.x == 0) ids[blockIdx.x] = order[pick - 1];
}
//! [nucleus-cuda]

}  // namespace

GpuDecoder::StepGraph::~StepGraph() {
  if (exec != nullptr) cudaGraphExecDestroy(exec);
}

GpuDecoder::GpuDecoder(LlamaModelGpu& model, int slots, int max_seq, bool cuda_graphs)
    : m_(model), slots_(slots), max_seq_(max_seq), cuda_graphs_(cuda_graphs) {
  const LlamaConfig& c = m_.cfg_;
  if (slots < 1 || slots > kMaxDecodeBatch)
    throw std::invalid_argument("GpuDecoder: " + std::to_string(slots) + " sequences; a decode step runs 1 to " +
                                std::to_string(kMaxDecodeBatch));
  if (max_seq < 1 || max_seq > context_limit(c))
    throw std::invalid_argument("GpuDecoder: a cache of " + std::to_string(max_seq) +
                                " positions; the model's context holds 1 to " + std::to_string(context_limit(c)));
  const std::size_t cache = usz(slots) * max_seq * c.kv_dim();
  kc_.resize(usz(c.n_layers));
  vc_.resize(usz(c.n_layers));
  for (int l = 0; l < c.n_layers; ++l) {
    kc_[usz(l)].resize(cache);
    vc_[usz(l)].resize(cache);
  }
  logits_.resize(usz(slots) * c.vocab_size);
  ids_ = DeviceBuffer<int>(usz(slots));
  max_logit_ = DeviceBuffer<float>(usz(slots));
  const std::size_t nv = usz(slots) * c.vocab_size;
  probs_ = DeviceBuffer<double>(nv);
  sorted_probs_ = DeviceBuffer<double>(nv);
  order_ = DeviceBuffer<int>(nv);
  sorted_order_ = DeviceBuffer<int>(nv);
  std::vector<int> offsets(usz(slots) + 1);
  for (int b = 0; b <= slots; ++b) offsets[usz(b)] = b * c.vocab_size;
  offsets_ = to_device<int>(offsets);
  CUDA_CHECK(cub::DeviceSegmentedRadixSort::SortPairsDescending(
      nullptr, sort_temp_bytes_, probs_.data(), sorted_probs_.data(), order_.data(), sorted_order_.data(),
      static_cast<int>(nv), slots, offsets_.data(), offsets_.data() + 1, 0, 64, m_.stream_));
  sort_temp_ = DeviceBuffer<unsigned char>(std::max<std::size_t>(sort_temp_bytes_, 1));
}

void GpuDecoder::poison() {
  CUDA_CHECK(cudaStreamSynchronize(m_.stream_));
  for (auto* set : {&kc_, &vc_})
    for (DeviceFloats& d : *set) CUDA_CHECK(cudaMemset(d.data(), 0xFF, d.size() * sizeof(float)));
  for (DeviceFloats* d : {&x_, &xn_, &q_, &k_, &v_, &o_, &tmp_, &h1_, &h3_, &g_, &scores_, &logits_})
    if (d->size() > 0) CUDA_CHECK(cudaMemset(d->data(), 0xFF, d->size() * sizeof(float)));
  xb_.poison();
}

void GpuDecoder::upload_rows(const std::vector<int>& pos, const std::vector<int>& slot) {
  const std::size_t N = pos.size();
  if (pos_.size() < N) {
    pos_ = DeviceBuffer<int>(N);
    slot_ = DeviceBuffer<int>(N);
  }
  for (std::size_t n = 0; n < N; ++n)
    if (pos[n] < 0 || pos[n] >= max_seq_)
      throw std::out_of_range("GpuDecoder: position " + std::to_string(pos[n]) + " outside the cache of " +
                              std::to_string(max_seq_));
  CUDA_CHECK(cudaMemcpyAsync(pos_.data(), pos.data(), N * sizeof(int), cudaMemcpyHostToDevice, m_.stream_));
  CUDA_CHECK(cudaMemcpyAsync(slot_.data(), slot.data(), N * sizeof(int), cudaMemcpyHostToDevice, m_.stream_));
}

//! [gpu-decode-layers]
// decode_step's layer loop over N rows at once, each row one token of one sequence at its
// own position: the projections through the model's linear() (the 4-bit base as stored,
// BF16 operands, plus the adapter), RoPE at each row's position, the new keys and values
// into the cache, attention against the cache.
//
// Between the projections each step is a single launch (llama_ops.cuh's decode kernels): the
// norms take in the residual add before them and write the BF16 operand beside their float
// output (the adapters read the float one), RoPE and both cache writes are one kernel,
// attention and SwiGLU write their BF16 copies. A layer is 12 launches where it was 21
// (rmsnorm, to_bf16, q, k, v, rope_at ×2, kv_cache_write ×2, attention, to_bf16, o, add,
// rmsnorm, to_bf16, gate, up, swiglu, to_bf16, down, add), counting one per projection as the
// 4-bit GEMV launches them without an adapter. The last layer's down projection stays in
// tmp_: head() adds it to x_ in its norm.
void GpuDecoder::layers(int N) {
  const LlamaConfig& c = m_.cfg_;
  const int D = c.dim, KV = c.kv_dim(), HD = c.hidden_dim, H = c.n_heads, KVH = c.n_kv_heads, hs = c.head_size();
  const cudaStream_t s = m_.stream_;
  std::mt19937_64 no_dropout;  // eval mode: never drawn from
  DeviceLoraCache& lc = lora_cache_;
  for (DeviceFloats* d : {&x_, &xn_, &q_, &o_, &tmp_}) d->resize(usz(N) * D);
  for (DeviceFloats* d : {&k_, &v_}) d->resize(usz(N) * KV);
  for (DeviceFloats* d : {&h1_, &h3_, &g_}) d->resize(usz(N) * HD);
  scores_.resize(usz(N) * H * max_seq_);
  // One BF16 operand buffer: each is read by its projections before the next kernel rewrites it.
  if (xb_.size() < usz(N) * std::max(D, HD)) xb_ = DeviceBuffer<bf16>(usz(N) * std::max(D, HD));
  bf16* xb = xb_.data();
  embedding_forward(m_.tok_emb_.data(), tokens_.data(), x_.data(), N, D, s);
  for (int l = 0; l < c.n_layers; ++l) {
    const auto& L = m_.layers_[usz(l)];
    if (l == 0)
      rmsnorm_rounded(x_.data(), L.rms_att.data(), xn_.data(), xb, N, D, c.norm_eps, s);
    else  // the previous layer's down projection joins the residual stream here
      add_rmsnorm_rounded(x_.data(), tmp_.data(), L.rms_att.data(), xn_.data(), xb, N, D, c.norm_eps, s);
    m_.linear(l, Proj::q, xn_.data(), xb, q_.data(), N, false, no_dropout, lc);
    m_.linear(l, Proj::k, xn_.data(), xb, k_.data(), N, false, no_dropout, lc);
    m_.linear(l, Proj::v, xn_.data(), xb, v_.data(), N, false, no_dropout, lc);
    rope_kv_cache_write(q_.data(), k_.data(), v_.data(), kc_[usz(l)].data(), vc_[usz(l)].data(), pos_.data(),
                        slot_.data(), N, H, KVH, hs, max_seq_, m_.rope_cos_.data(), m_.rope_sin_.data(), s);
    attention_cached_v2(q_.data(), kc_[usz(l)].data(), vc_[usz(l)].data(), scores_.data(), o_.data(), xb,
                        pos_.data(), slot_.data(), N, H, KVH, hs, max_seq_, s);
    m_.linear(l, Proj::o, o_.data(), xb, tmp_.data(), N, false, no_dropout, lc);
    add_rmsnorm_rounded(x_.data(), tmp_.data(), L.rms_ffn.data(), xn_.data(), xb, N, D, c.norm_eps, s);
    m_.linear(l, Proj::gate, xn_.data(), xb, h1_.data(), N, false, no_dropout, lc);
    m_.linear(l, Proj::up, xn_.data(), xb, h3_.data(), N, false, no_dropout, lc);
    swiglu_rounded(h1_.data(), h3_.data(), g_.data(), xb, static_cast<std::int64_t>(N) * HD, s);
    m_.linear(l, Proj::down, g_.data(), xb, tmp_.data(), N, false, no_dropout, lc);
  }
}
//! [gpu-decode-layers]

// Rows row..row+n−1 of the layers' output (x_ plus the last down projection, still in tmp_),
// through the final norm and the classifier into logits rows from out_row.
void GpuDecoder::head(int row, int n, int out_row) {
  const LlamaConfig& c = m_.cfg_;
  const int D = c.dim, V = c.vocab_size;
  add_rmsnorm_rounded(x_.data() + usz(row) * D, tmp_.data() + usz(row) * D, m_.rms_final_.data(), xn_.data(),
                      xb_.data(), n, D, c.norm_eps, m_.stream_);
  gemm_bf16_xwt(m_.cublas_, xb_.data(), m_.cls_.data(), logits_.data() + usz(out_row) * V, OutType::f32, n, D, V,
                false, m_.stream_);
}

void GpuDecoder::prefill(int slot, const std::vector<int>& ids) {
  const int P = static_cast<int>(ids.size());
  if (slot < 0 || slot >= slots_) throw std::out_of_range("GpuDecoder::prefill: slot " + std::to_string(slot));
  if (P < 1 || P > max_seq_)
    throw std::invalid_argument("GpuDecoder::prefill: " + std::to_string(P) + " tokens for a cache of " +
                                std::to_string(max_seq_));
  for (int id : ids)
    if (id < 0 || id >= m_.cfg_.vocab_size) throw std::out_of_range("GpuDecoder::prefill: token id " + std::to_string(id));
  // A prefill may grow the buffers a recorded step points into: the next step runs eagerly again.
  graph_rows_ = eager_rows_ = 0;
  if (tokens_.size() < usz(P)) tokens_ = DeviceBuffer<int>(usz(P));
  CUDA_CHECK(cudaMemcpyAsync(tokens_.data(), ids.data(), usz(P) * sizeof(int), cudaMemcpyHostToDevice, m_.stream_));
  std::vector<int> pos(usz(P));
  std::iota(pos.begin(), pos.end(), 0);
  upload_rows(pos, std::vector<int>(usz(P), slot));
  layers(P);
  head(P - 1, 1, slot);
}

void GpuDecoder::step(const std::vector<int>& pos) {
  const int n = static_cast<int>(pos.size());
  if (n < 1 || n > slots_)
    throw std::invalid_argument("GpuDecoder::step: " + std::to_string(n) + " rows for " + std::to_string(slots_) + " slots");
  if (tokens_.size() < usz(n)) tokens_ = DeviceBuffer<int>(usz(n));
  std::vector<int> slot(usz(n));
  std::iota(slot.begin(), slot.end(), 0);
  upload_rows(pos, slot);
  if (graph_rows_ == n) {
    CUDA_CHECK(cudaGraphLaunch(graph_.exec, m_.stream_));
    return;
  }
  if (!cuda_graphs_ || eager_rows_ != n) {  // the first step of n rows sizes every buffer
    step_kernels(n);
    eager_rows_ = n;
    return;
  }
  capture_step(n);
}

//! [decode-graph]
// A decode step of a 7B model is 390 kernels, most of them a few microseconds long at one
// token, and launching them one by one from the host adds 0.5 ms to a 3.3 ms step (an H200,
// docs/benchmarks.md). A CUDA graph records the step once (stream capture: the kernels are recorded, not run) and
// replays it with one launch. What changes from step to step is read from device memory —
// the positions (uploaded before the launch), the tokens (the sampled ids) — and the
// buffers are the ones the eager step sized, so the recorded pointers stay valid.
void GpuDecoder::capture_step(int n) {
  cudaGraph_t graph = nullptr;
  CUDA_CHECK(cudaStreamBeginCapture(m_.stream_, cudaStreamCaptureModeThreadLocal));
  try {
    step_kernels(n);
  } catch (...) {
    // End the capture, so the stream is usable again, and report the first error.
    if (cudaStreamEndCapture(m_.stream_, &graph) == cudaSuccess && graph != nullptr) cudaGraphDestroy(graph);
    cudaGetLastError();
    throw;
  }
  CUDA_CHECK(cudaStreamEndCapture(m_.stream_, &graph));
  cudaGraphExec_t exec = nullptr;
  const cudaError_t err = cudaGraphInstantiate(&exec, graph, 0);
  cudaGraphDestroy(graph);
  CUDA_CHECK(err);
  if (graph_.exec != nullptr) CUDA_CHECK(cudaGraphExecDestroy(graph_.exec));
  graph_.exec = exec;
  graph_rows_ = n;
  CUDA_CHECK(cudaGraphLaunch(graph_.exec, m_.stream_));
}
//! [decode-graph]

void GpuDecoder::step_kernels(int n) {
  // The sampled ids stay on the device: they are the next step's tokens.
  CUDA_CHECK(cudaMemcpyAsync(tokens_.data(), ids_.data(), usz(n) * sizeof(int), cudaMemcpyDeviceToDevice, m_.stream_));
  layers(n);
  head(0, n, 0);
}

void GpuDecoder::sample(int n, float temperature, float top_p, int draw) {
  const int V = m_.cfg_.vocab_size;
  if (n < 1 || n > slots_) throw std::invalid_argument("GpuDecoder::sample: " + std::to_string(n) + " rows");
  argmax_kernel<<<n, kSampleThreads, 0, m_.stream_>>>(logits_.data(), V, ids_.data(), max_logit_.data());
  CUDA_CHECK_LAUNCH();
  if (temperature <= 0.0f) return;
  if (draw < 0 || usz(draw) >= draws_.size())
    throw std::out_of_range("GpuDecoder::sample: draw " + std::to_string(draw) + " of " + std::to_string(draws_.size()));
  // The whole sort runs over the slots' rows, unused ones included: its temp storage is sized once.
  const std::int64_t nv = static_cast<std::int64_t>(slots_) * V;
  const auto blocks = static_cast<unsigned>(std::min<std::int64_t>((nv + 255) / 256, 1 << 20));
  softmax_numerator_kernel<<<blocks, 256, 0, m_.stream_>>>(logits_.data(), max_logit_.data(),
                                                           static_cast<std::int64_t>(n) * V, V, temperature,
                                                           probs_.data(), order_.data());
  CUDA_CHECK_LAUNCH();
  // Stable: equal probabilities keep increasing ids (std::sort on the CPU leaves their order unspecified).
  std::size_t temp_bytes = sort_temp_bytes_;
  CUDA_CHECK(cub::DeviceSegmentedRadixSort::SortPairsDescending(
      sort_temp_.data(), temp_bytes, probs_.data(), sorted_probs_.data(), order_.data(), sorted_order_.data(),
      n * V, n, offsets_.data(), offsets_.data() + 1, 0, 64, m_.stream_));
  nucleus_kernel<<<n, kSampleThreads, 0, m_.stream_>>>(sorted_probs_.data(), sorted_order_.data(), V, top_p,
                                                        draws_.data(), draw, ids_.data());
  CUDA_CHECK_LAUNCH();
}

void GpuDecoder::set_ids(const std::vector<int>& ids) {
  if (ids.empty() || ids.size() > usz(slots_)) throw std::invalid_argument("GpuDecoder::set_ids: bad count");
  CUDA_CHECK(cudaMemcpyAsync(ids_.data(), ids.data(), ids.size() * sizeof(int), cudaMemcpyHostToDevice, m_.stream_));
}

void GpuDecoder::set_draws(const std::vector<double>& u) {
  CUDA_CHECK(cudaStreamSynchronize(m_.stream_));
  draws_ = to_device<double>(u);
}

std::vector<int> GpuDecoder::ids(int n) const {
  std::vector<int> out(usz(n));
  CUDA_CHECK(cudaMemcpyAsync(out.data(), ids_.data(), usz(n) * sizeof(int), cudaMemcpyDeviceToHost, m_.stream_));
  CUDA_CHECK(cudaStreamSynchronize(m_.stream_));
  return out;
}

std::vector<float> GpuDecoder::logits(int n) const {
  std::vector<float> out(usz(n) * m_.cfg_.vocab_size);
  CUDA_CHECK(cudaStreamSynchronize(m_.stream_));
  logits_.download(out.data(), out.size());
  return out;
}

//! [generate-gpu]
std::vector<std::string> generate_text_gpu(LlamaModelGpu& model, const Tokenizer& tok,
                                           const std::vector<std::string>& prompts, const SampleConfig& cfg,
                                           GenerateStats* stats, bool cuda_graphs) {
  if (prompts.empty()) throw std::invalid_argument("generate on the GPU: no prompts");
  std::vector<std::vector<int>> ids;
  int longest = 0;
  for (const std::string& p : prompts) {
    ids.push_back(prompt_ids(tok, p));
    check_generation_fits(model.config(), static_cast<int>(ids.back().size()), cfg.max_tokens);
    longest = std::max(longest, static_cast<int>(ids.back().size()));
  }
  // Every sequence samples with its own generator seeded cfg.seed, as generate_text does
  // alone, so draw n is the same number for all of them: drawn once here, uploaded once.
  std::vector<double> u(usz(std::max(cfg.max_tokens, 1)));
  std::mt19937_64 rng(cfg.seed);
  for (double& x : u) x = uniform01(rng);
  GenerateStats st;
  using Clock = std::chrono::steady_clock;
  const auto seconds_since = [](Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); };
  const auto start = Clock::now();
  for (std::size_t first = 0; first < ids.size(); first += kMaxDecodeBatch) {
    const int n = static_cast<int>(std::min<std::size_t>(kMaxDecodeBatch, ids.size() - first));
    const auto prefill_start = Clock::now();
    // The last generated token is never fed back: the cache needs P + max_tokens − 1 positions.
    GpuDecoder dec(model, n, std::max(longest + cfg.max_tokens - 1, longest), cuda_graphs);
    dec.set_draws(u);
    for (int b = 0; b < n; ++b) {
      dec.prefill(b, ids[first + usz(b)]);
      st.prompt_tokens += static_cast<long long>(ids[first + usz(b)].size());
    }
    CUDA_CHECK(cudaStreamSynchronize(model.stream()));  // only to time the prefill apart
    st.prefill_seconds += seconds_since(prefill_start);
    std::vector<bool> done(usz(n), false);
    std::vector<int> pos(usz(n));
    for (int step = 0; step < cfg.max_tokens; ++step) {
      dec.sample(n, cfg.temperature, cfg.top_p, step);
      const std::vector<int> next = dec.ids(n);  // the step's one copy to the host
      bool any = false;
      for (int b = 0; b < n; ++b) {
        std::vector<int>& seq = ids[first + usz(b)];
        if (!done[usz(b)] && (next[usz(b)] == tok.eos_id() || next[usz(b)] == tok.bos_id())) done[usz(b)] = true;
        if (!done[usz(b)]) {
          seq.push_back(next[usz(b)]);
          ++st.generated_tokens;
          any = true;
        }
        // A finished sequence keeps stepping in lockstep at its last position, rewriting
        // a cache entry nobody reads again.
        pos[usz(b)] = static_cast<int>(seq.size()) - 1;
      }
      if (!any || step + 1 == cfg.max_tokens) break;
      dec.step(pos);
    }
  }
  CUDA_CHECK(cudaStreamSynchronize(model.stream()));
  st.seconds = seconds_since(start);
  if (stats) *stats = st;
  std::vector<std::string> out;
  for (const auto& seq : ids) out.push_back(tok.decode(seq));
  return out;
}
//! [generate-gpu]

}  // namespace qlora::cuda
