// The LLaMA model on the GPU (chapter 7). See llama_model_gpu.cuh; the CPU
// reference is LlamaModel (src/llama_model.cpp), which this file follows step by
// step: same layout (N = B·T rows, row b·T + t), same order of operations, same
// order of dropout draws.
#include "llama_model_gpu.cuh"

#include "attention_gemm.cuh"

#include "bf16.hpp"
#include "gemm4_mma.cuh"
#include "gemv4.cuh"
#include "llama_ops.cuh"
#include "llama_ops.hpp"
#include "nvtx_range.cuh"
#include "quantize4.cuh"

#include <algorithm>
#include <chrono>
#include <map>
#include <numeric>
#include <stdexcept>

namespace qlora::cuda {

namespace {
std::size_t usz(std::int64_t a) { return static_cast<std::size_t>(a); }
int I(Proj p) { return static_cast<int>(p); }

DeviceBuffer<float> upload_f32(const std::vector<float>& v) { return to_device<float>(v); }
DeviceBuffer<bf16> upload_bf16(const std::vector<float>& v) {
  const std::vector<bf16> b = qlora::to_bf16(v);
  return to_device<bf16>(b);
}
}  // namespace

std::int64_t DeviceFrozenLinear::bytes() const {
  return q4 ? q4->storage_bytes() : static_cast<std::int64_t>(w.bytes());
}

/// Everything one layer's forward keeps for its backward, in device memory.
struct LlamaModelGpu::LayerActs {
  DeviceFloats x, inv1, xn1, q, k, v, att, o, x2, inv2, xn2, h1, h3, g;
  std::array<DeviceLoraCache, kNumProj> lc;
  std::int64_t bytes() const {
    std::size_t n = 0;
    for (const DeviceFloats* f : {&x, &inv1, &xn1, &q, &k, &v, &att, &o, &x2, &inv2, &xn2, &h1, &h3, &g}) n += f->size();
    std::int64_t lora = 0;
    for (const DeviceLoraCache& c : lc) lora += c.bytes();
    return static_cast<std::int64_t>(n * sizeof(float)) + lora;
  }
};

//! [gpu-model-upload]
LlamaModelGpu::LlamaModelGpu(const LlamaModel& host) : cfg_(host.config()), checkpointing_(host.checkpointing()) {
  CUDA_CHECK(cudaStreamCreate(&stream_));
  tok_emb_ = upload_bf16(host.tok_emb());  // BF16-rounded on the host already (F32 storage: rounded here)
  cls_ = upload_bf16(host.classifier());
  rms_final_ = upload_f32(host.rms_final());
  init_rope();
  layers_.resize(usz(cfg_.n_layers));
  for (int l = 0; l < cfg_.n_layers; ++l) {
    Layer& L = layers_[usz(l)];
    L.rms_att = upload_f32(host.rms_att(l));
    L.rms_ffn = upload_f32(host.rms_ffn(l));
    for (Proj p : kAllProj) {
      const FrozenLinear& f = host.frozen(l, p);
      DeviceFrozenLinear& d = L.w[usz(I(p))];
      d.in = f.in;
      d.out = f.out;
      // The 4-bit formats travel as stored (codes + scales) and are dequantized per
      // matmul; the others are BF16 on the device.
      if (f.q4)
        d.q4 = DeviceQuant4::upload(*f.q4);
      else
        d.w = upload_bf16(f.w);
    }
  }
  if (host.has_lora()) {
    lora_ = host.lora_setup();
    adapters_.resize(usz(cfg_.n_layers));
    for (int l = 0; l < cfg_.n_layers; ++l)
      for (Proj p : kAllProj)
        if (const LoraAdapter* a = host.adapter(l, p)) adapters_[usz(l)][usz(I(p))] = std::make_unique<DeviceLoraAdapter>(*a);
  }
}
//! [gpu-model-upload]

void LlamaModelGpu::init_rope() {
  std::vector<float> cos_t, sin_t;
  rope_tables(cfg_, cos_t, sin_t);
  rope_cos_ = upload_f32(cos_t);
  rope_sin_ = upload_f32(sin_t);
}

//! [gpu-model-stream]
LlamaModelGpu::LlamaModelGpu(const LlamaConfig& config, BaseStorage storage, const TensorFill& fill,
                             const std::optional<LoraSetup>& lora, std::mt19937_64& lora_rng,
                             const std::function<void(const LoadProgress&)>& progress)
    : cfg_(config) {
  validate_config(cfg_, "LlamaModelGpu");
  const bool bf16_base = storage == BaseStorage::bfloat16;
  const bool four_bit = storage == BaseStorage::nf4 || storage == BaseStorage::nf4_dq || storage == BaseStorage::fp4 ||
                        storage == BaseStorage::fp4_dq;
  if (!bf16_base && !four_bit)
    throw std::invalid_argument("loading onto the GPU: storage " + to_string(storage) +
                                " is a CPU reference format; use nf4, nf4-dq, fp4, fp4-dq or bf16");
  const QuantType qtype = storage == BaseStorage::fp4 || storage == BaseStorage::fp4_dq ? QuantType::fp4 : QuantType::nf4;
  const bool dq = storage == BaseStorage::nf4_dq || storage == BaseStorage::fp4_dq;
  CUDA_CHECK(cudaStreamCreate(&stream_));
  init_rope();

  std::map<std::string, TensorSpec> specs;
  LoadProgress prog;
  for (TensorSpec& t : llama_tensor_specs(cfg_)) {
    std::int64_t n = 1;
    for (auto d : t.shape) n *= d;
    prog.bytes_total += 2 * n;
    ++prog.tensors_total;
    specs.emplace(t.name, std::move(t));
  }
  const auto start = std::chrono::steady_clock::now();
  auto done = [&](const TensorSpec& t) {
    prog.bytes_done += 2 * static_cast<std::int64_t>(t.shape[0]) * (t.shape.size() > 1 ? t.shape[1] : 1);
    ++prog.tensors_done;
    prog.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (progress) progress(prog);
  };
  auto numel = [](const TensorSpec& t) { return usz(t.shape[0]) * usz(t.shape.size() > 1 ? t.shape[1] : 1); };
  // Embedding and classifier: BF16 on the device, filled in place.
  auto load_bf16 = [&](const std::string& name) {
    const TensorSpec& t = specs.at(name);
    DeviceBuffer<bf16> d(numel(t));
    fill(t, d.data(), stream_);
    done(t);
    return d;
  };
  // Projections and norms pass through one staging buffer, reused.
  DeviceBuffer<bf16> staging;
  auto stage = [&](const TensorSpec& t) {
    if (staging.size() < numel(t)) staging = DeviceBuffer<bf16>(numel(t));
    fill(t, staging.data(), stream_);
    return staging.data();
  };
  // Norm weights are tiny: widened to float32 on the host, as the CPU model keeps them.
  auto load_norm = [&](const std::string& name) {
    const TensorSpec& t = specs.at(name);
    std::vector<bf16> h(numel(t));
    const bf16* d = stage(t);
    CUDA_CHECK(cudaMemcpyAsync(h.data(), d, h.size() * sizeof(bf16), cudaMemcpyDeviceToHost, stream_));
    CUDA_CHECK(cudaStreamSynchronize(stream_));
    done(t);
    return upload_f32(qlora::from_bf16(h));
  };

  tok_emb_ = load_bf16("model.embed_tokens.weight");
  layers_.resize(usz(cfg_.n_layers));
  for (int l = 0; l < cfg_.n_layers; ++l) {
    Layer& L = layers_[usz(l)];
    const std::string pre = "model.layers." + std::to_string(l) + ".";
    L.rms_att = load_norm(pre + "input_layernorm.weight");
    for (Proj p : kAllProj) {
      const TensorSpec& t = specs.at(hf_module_name(l, p) + ".weight");
      DeviceFrozenLinear& d = L.w[usz(I(p))];
      d.out = static_cast<int>(t.shape[0]);
      d.in = static_cast<int>(t.shape[1]);
      if (bf16_base) {
        d.w = DeviceBuffer<bf16>(numel(t));
        fill(t, d.w.data(), stream_);
      } else {
        d.q4 = quantize4(stage(t), t.shape, qtype, 64, dq, stream_);  // synchronizes: staging is free again
      }
      done(t);
    }
    L.rms_ffn = load_norm(pre + "post_attention_layernorm.weight");
  }
  rms_final_ = load_norm("model.norm.weight");
  if (cfg_.shared_classifier) {
    cls_ = DeviceBuffer<bf16>(tok_emb_.size());
    CUDA_CHECK(cudaMemcpyAsync(cls_.data(), tok_emb_.data(), tok_emb_.bytes(), cudaMemcpyDeviceToDevice, stream_));
  } else {
    cls_ = load_bf16("lm_head.weight");
  }
  CUDA_CHECK(cudaStreamSynchronize(stream_));

  if (lora) {
    lora->config.scale();  // validates r
    lora_ = lora;
    adapters_.resize(usz(cfg_.n_layers));
    for (int l = 0; l < cfg_.n_layers; ++l)
      for (Proj p : kAllProj) {
        if (!lora->targets[usz(I(p))]) continue;
        const DeviceFrozenLinear& f = layers_[usz(l)].w[usz(I(p))];
        LoraAdapter host(f.in, f.out, lora->config.r);  // one adapter's worth of host memory at a time
        host.init_peft(lora_rng);
        adapters_[usz(l)][usz(I(p))] = std::make_unique<DeviceLoraAdapter>(host);
      }
  }
}
//! [gpu-model-stream]

void LlamaModelGpu::set_attention_version(int v) {
  if (v != 1 && v != 2) throw std::invalid_argument("attention version must be 1 or 2, got " + std::to_string(v));
  attention_version_ = v;
}

void LlamaModelGpu::set_head_version(int v, int chunk_rows) {
  if (v != 1 && v != 2) throw std::invalid_argument("head version must be 1 or 2, got " + std::to_string(v));
  if (chunk_rows < 0) throw std::invalid_argument("head chunk rows must be >= 0, got " + std::to_string(chunk_rows));
  head_version_ = v;
  head_chunk_rows_ = chunk_rows;
}

LlamaModelGpu::~LlamaModelGpu() {
  if (stream_) cudaStreamDestroy(stream_);  // destructors must not throw
}

std::int64_t LlamaModelGpu::frozen_bytes() const {
  std::int64_t n = static_cast<std::int64_t>(tok_emb_.size()) * 2 + static_cast<std::int64_t>(rms_final_.size()) * 2;
  if (!cfg_.shared_classifier) n += static_cast<std::int64_t>(cls_.bytes());
  for (const Layer& L : layers_) {
    n += static_cast<std::int64_t>(L.rms_att.size() + L.rms_ffn.size()) * 2;
    for (const auto& w : L.w) n += w.bytes();
  }
  return n;
}

DeviceLoraAdapter* LlamaModelGpu::adapter(int l, Proj p) const {
  if (!lora_) return nullptr;
  return adapters_[usz(l)][usz(I(p))].get();
}

std::vector<std::pair<std::string, DeviceLoraAdapter*>> LlamaModelGpu::named_adapters() {
  std::vector<std::pair<std::string, DeviceLoraAdapter*>> out;
  for (int l = 0; l < cfg_.n_layers; ++l)
    for (Proj p : kAllProj)
      if (DeviceLoraAdapter* a = adapter(l, p)) out.emplace_back(hf_module_name(l, p), a);
  return out;
}

const LoraSetup& LlamaModelGpu::lora_setup() const {
  if (!lora_) throw std::logic_error("LlamaModelGpu: the model has no LoRA adapters");
  return *lora_;
}

void LlamaModelGpu::zero_grad() {
  for (auto& [name, a] : named_adapters()) {
    CUDA_CHECK(cudaMemsetAsync(a->dA.data(), 0, a->dA.size() * sizeof(float), stream_));
    CUDA_CHECK(cudaMemsetAsync(a->dB.data(), 0, a->dB.size() * sizeof(float), stream_));
  }
}

void LlamaModelGpu::scale_grads(float s) {
  CUBLAS_CHECK(cublasSetStream(cublas_.get(), stream_));
  for (auto& [name, a] : named_adapters()) {
    CUBLAS_CHECK(cublasSscal(cublas_.get(), static_cast<int>(a->dA.size()), &s, a->dA.data(), 1));
    CUBLAS_CHECK(cublasSscal(cublas_.get(), static_cast<int>(a->dB.size()), &s, a->dB.data(), 1));
  }
}

void LlamaModelGpu::download_adapters(LlamaModel& host) const {
  CUDA_CHECK(cudaStreamSynchronize(stream_));
  for (int l = 0; l < cfg_.n_layers; ++l)
    for (Proj p : kAllProj) {
      const DeviceLoraAdapter* d = adapter(l, p);
      LoraAdapter* h = host.adapter(l, p);
      if (!d && !h) continue;
      if (!d || !h) throw std::invalid_argument("download_adapters: the host model's adapters differ from the GPU model's");
      d->download(*h);
    }
}

void LlamaModelGpu::upload_adapters(const LlamaModel& host) {
  CUDA_CHECK(cudaStreamSynchronize(stream_));
  for (int l = 0; l < cfg_.n_layers; ++l)
    for (Proj p : kAllProj) {
      DeviceLoraAdapter* d = adapter(l, p);
      const LoraAdapter* h = host.adapter(l, p);
      if (!d && !h) continue;
      if (!d || !h) throw std::invalid_argument("upload_adapters: the host model's adapters differ from the GPU model's");
      d->upload(*h);
    }
}

// --- one projection -----------------------------------------------------------------

//! [gpu-linear]
// y = x·deq(W)ᵀ (BF16 inputs, float32 accumulation and output) + the LoRA term (float32).
const bf16* LlamaModelGpu::rounded(DeviceBuffer<bf16>& buf, const float* x, std::int64_t n) {
  if (buf.size() < usz(n)) buf = DeviceBuffer<bf16>(usz(n));
  to_bf16(x, buf.data(), n, stream_);
  return buf.data();
}

void LlamaModelGpu::linear(int l, Proj p, const float* x, const bf16* xb, float* y, int N, bool training,
                           std::mt19937_64& rng, DeviceLoraCache& lc) {
  const DeviceFrozenLinear& f = layers_[usz(l)].w[usz(I(p))];
  {
    NvtxRange r("base");
    if (f.q4) {
      switch (linear4_path(*f.q4, N)) {
        case Linear4Path::gemv: gemv4(*f.q4, xb, y, N, GemvVersion::prefetch, stream_); break;
        case Linear4Path::mma_exact: gemm4_mma(*f.q4, xb, y, OutType::f32, N, MmaVersion::exact, stream_); break;
        case Linear4Path::mma_register_table:
          gemm4_mma(*f.q4, xb, y, OutType::f32, N, MmaVersion::register_table, stream_);
          break;
        case Linear4Path::mma_pair_table:
          gemm4_mma(*f.q4, xb, y, OutType::f32, N, MmaVersion::pair_table, stream_, &mma3_);
          break;
        case Linear4Path::dequant_cublas:
          linear4_forward(cublas_, *f.q4, xb, N, y, OutType::f32, scratch_, false, stream_);
          break;
      }
    } else
      gemm_bf16_xwt(cublas_, xb, f.w.data(), y, OutType::f32, N, f.in, f.out, false, stream_);
  }
  if (const DeviceLoraAdapter* a = adapter(l, p)) {
    NvtxRange r("lora");
    lora_forward_cuda(cublas_.get(), stream_, *a, lora_->config, x, y, N, training, rng, lc, lora_scratch_, float_math_,
                      first_position_);
  }
}

// dx (=|+=) dy·deq(W) + the LoRA path's dx; the adapter accumulates dA, dB.
void LlamaModelGpu::linear_backward(int l, Proj p, const float* x, const float* dy, float* dx, int N, bool accumulate,
                                    DeviceLoraCache& lc) {
  const DeviceFrozenLinear& f = layers_[usz(l)].w[usz(I(p))];
  {
    NvtxRange r("base");
    const bf16* dyb = rounded(yb_, dy, static_cast<std::int64_t>(N) * f.out);
    if (f.q4)
      linear4_backward_input(cublas_, *f.q4, dyb, N, dx, OutType::f32, scratch_, accumulate, stream_);
    else
      gemm_bf16_dyw(cublas_, dyb, f.w.data(), dx, OutType::f32, N, f.in, f.out, accumulate, stream_);
  }
  if (DeviceLoraAdapter* a = adapter(l, p)) {
    NvtxRange r("lora");
    lora_backward_cuda(cublas_.get(), stream_, *a, lora_->config, x, dy, dx, N, lc, lora_scratch_, float_math_);
  }
}
//! [gpu-linear]

// --- one transformer layer ------------------------------------------------------------

//! [gpu-layer-forward]
void LlamaModelGpu::layer_forward(int l, const float* x_in, float* x_out, bool training, std::mt19937_64& rng,
                                  LayerActs& a) {
  const int N = B_ * T_, D = cfg_.dim, KV = cfg_.kv_dim(), HD = cfg_.hidden_dim;
  const int H = cfg_.n_heads, KVH = cfg_.n_kv_heads, hs = cfg_.head_size();
  const Layer& L = layers_[usz(l)];
  const std::size_t nD = usz(N) * D, nKV = usz(N) * KV, nH = usz(N) * HD;
  a.x.resize(nD);
  CUDA_CHECK(cudaMemcpyAsync(a.x.data(), x_in, nD * sizeof(float), cudaMemcpyDeviceToDevice, stream_));
  a.inv1.resize(usz(N));
  a.xn1.resize(nD);
  rmsnorm_forward(a.x.data(), L.rms_att.data(), a.xn1.data(), a.inv1.data(), N, D, cfg_.norm_eps, stream_);

  a.q.resize(nD);
  a.k.resize(nKV);
  a.v.resize(nKV);
  const bf16* xn1b = rounded(xb_, a.xn1.data(), static_cast<std::int64_t>(nD));  // once for q, k and v
  linear(l, Proj::q, a.xn1.data(), xn1b, a.q.data(), N, training, rng, a.lc[usz(I(Proj::q))]);
  linear(l, Proj::k, a.xn1.data(), xn1b, a.k.data(), N, training, rng, a.lc[usz(I(Proj::k))]);
  linear(l, Proj::v, a.xn1.data(), xn1b, a.v.data(), N, training, rng, a.lc[usz(I(Proj::v))]);
  rope(a.q.data(), N, T_, H, hs, rope_cos_.data(), rope_sin_.data(), false, stream_);
  rope(a.k.data(), N, T_, KVH, hs, rope_cos_.data(), rope_sin_.data(), false, stream_);
  a.att.resize(usz(B_) * H * T_ * T_);
  a.o.resize(nD);
  {
    NvtxRange r("attention");
    if (attention_version_ == 1)
      attention_forward(a.q.data(), a.k.data(), a.v.data(), a.att.data(), a.o.data(), B_, T_, H, KVH, hs, stream_);
    else
      attention_forward_v2(cublas_.get(), a.q.data(), a.k.data(), a.v.data(), a.att.data(), a.o.data(), B_, T_, H,
                           KVH, hs, stream_, float_math_);
  }
  tmp_.resize(nD);
  linear(l, Proj::o, a.o.data(), rounded(xb_, a.o.data(), static_cast<std::int64_t>(nD)), tmp_.data(), N, training, rng, a.lc[usz(I(Proj::o))]);
  a.x2.resize(nD);
  CUDA_CHECK(cudaMemcpyAsync(a.x2.data(), a.x.data(), nD * sizeof(float), cudaMemcpyDeviceToDevice, stream_));
  add_inplace(a.x2.data(), tmp_.data(), static_cast<std::int64_t>(nD), stream_);

  a.inv2.resize(usz(N));
  a.xn2.resize(nD);
  rmsnorm_forward(a.x2.data(), L.rms_ffn.data(), a.xn2.data(), a.inv2.data(), N, D, cfg_.norm_eps, stream_);
  a.h1.resize(nH);
  a.h3.resize(nH);
  a.g.resize(nH);
  const bf16* xn2b = rounded(xb_, a.xn2.data(), static_cast<std::int64_t>(nD));  // once for gate and up
  linear(l, Proj::gate, a.xn2.data(), xn2b, a.h1.data(), N, training, rng, a.lc[usz(I(Proj::gate))]);
  linear(l, Proj::up, a.xn2.data(), xn2b, a.h3.data(), N, training, rng, a.lc[usz(I(Proj::up))]);
  swiglu_forward(a.h1.data(), a.h3.data(), a.g.data(), static_cast<std::int64_t>(nH), stream_);
  linear(l, Proj::down, a.g.data(), rounded(xb_, a.g.data(), static_cast<std::int64_t>(nH)), tmp_.data(), N, training, rng, a.lc[usz(I(Proj::down))]);
  CUDA_CHECK(cudaMemcpyAsync(x_out, a.x2.data(), nD * sizeof(float), cudaMemcpyDeviceToDevice, stream_));
  add_inplace(x_out, tmp_.data(), static_cast<std::int64_t>(nD), stream_);
}
//! [gpu-layer-forward]

//! [gpu-layer-backward]
void LlamaModelGpu::layer_backward(int l, LayerActs& a, float* dx) {
  const int N = B_ * T_, D = cfg_.dim, KV = cfg_.kv_dim(), HD = cfg_.hidden_dim;
  const int H = cfg_.n_heads, KVH = cfg_.n_kv_heads, hs = cfg_.head_size();
  const Layer& L = layers_[usz(l)];
  const std::size_t nD = usz(N) * D, nKV = usz(N) * KV, nH = usz(N) * HD;

  // MLP. dx is both d(x2) via the skip path and d(down output). h1 and h3 are not
  // needed after SwiGLU's backward: their gradients overwrite them.
  dg_.resize(nH);
  dxn_.resize(nD);
  linear_backward(l, Proj::down, a.g.data(), dx, dg_.data(), N, false, a.lc[usz(I(Proj::down))]);
  float* dh1 = a.h1.data();
  float* dh3 = a.h3.data();
  swiglu_backward(a.h1.data(), a.h3.data(), dg_.data(), dh1, dh3, static_cast<std::int64_t>(nH), stream_);
  linear_backward(l, Proj::gate, a.xn2.data(), dh1, dxn_.data(), N, false, a.lc[usz(I(Proj::gate))]);
  linear_backward(l, Proj::up, a.xn2.data(), dh3, dxn_.data(), N, true, a.lc[usz(I(Proj::up))]);
  rmsnorm_backward(a.x2.data(), L.rms_ffn.data(), a.inv2.data(), dxn_.data(), dx, N, D, stream_);

  // Attention. dx is now d(x2): the skip path and d(o_proj output).
  dout_.resize(nD);
  dq_.resize(nD);
  dk_.resize(nKV);
  dv_.resize(nKV);
  ds_.resize(a.att.size());
  linear_backward(l, Proj::o, a.o.data(), dx, dout_.data(), N, false, a.lc[usz(I(Proj::o))]);
  {
    NvtxRange r("attention");
    if (attention_version_ == 1)
      attention_backward(a.q.data(), a.k.data(), a.v.data(), a.att.data(), dout_.data(), ds_.data(), dq_.data(),
                         dk_.data(), dv_.data(), B_, T_, H, KVH, hs, stream_);
    else
      attention_backward_v2(cublas_.get(), a.q.data(), a.k.data(), a.v.data(), a.att.data(), dout_.data(),
                            ds_.data(), dq_.data(), dk_.data(), dv_.data(), B_, T_, H, KVH, hs, stream_,
                            float_math_);
  }
  rope(dq_.data(), N, T_, H, hs, rope_cos_.data(), rope_sin_.data(), true, stream_);
  rope(dk_.data(), N, T_, KVH, hs, rope_cos_.data(), rope_sin_.data(), true, stream_);
  linear_backward(l, Proj::q, a.xn1.data(), dq_.data(), dxn_.data(), N, false, a.lc[usz(I(Proj::q))]);
  linear_backward(l, Proj::k, a.xn1.data(), dk_.data(), dxn_.data(), N, true, a.lc[usz(I(Proj::k))]);
  linear_backward(l, Proj::v, a.xn1.data(), dv_.data(), dxn_.data(), N, true, a.lc[usz(I(Proj::v))]);
  rmsnorm_backward(a.x.data(), L.rms_att.data(), a.inv1.data(), dxn_.data(), dx, N, D, stream_);
}
//! [gpu-layer-backward]

// --- whole model ---------------------------------------------------------------------

float LlamaModelGpu::forward(const int* tokens, const int* targets, int B, int T, bool training, std::mt19937_64& rng,
                             int first_sequence) {
  if (B <= 0 || T <= 0)
    throw std::invalid_argument("LlamaModelGpu::forward: need B > 0 and T > 0 (got B=" + std::to_string(B) +
                                ", T=" + std::to_string(T) + ")");
  check_sequence_length(cfg_, T, "LlamaModelGpu::forward");
  const int N = B * T, D = cfg_.dim, V = cfg_.vocab_size;
  target_count_ = check_batch_ids(tokens, targets, N, V);
  B_ = B;
  T_ = T;
  first_position_ = std::int64_t{first_sequence} * T;
  backward_pending_ = targets != nullptr;
  if (tokens_.size() < usz(N)) tokens_ = DeviceBuffer<int>(usz(N));
  if (targets_.size() < usz(N)) targets_ = DeviceBuffer<int>(usz(N));
  CUDA_CHECK(cudaMemcpyAsync(tokens_.data(), tokens, usz(N) * sizeof(int), cudaMemcpyHostToDevice, stream_));
  if (targets)
    CUDA_CHECK(cudaMemcpyAsync(targets_.data(), targets, usz(N) * sizeof(int), cudaMemcpyHostToDevice, stream_));

  const std::size_t nD = usz(N) * D;
  x_final_.resize(nD);
  embedding_forward(tok_emb_.data(), tokens_.data(), x_final_.data(), N, D, stream_);
  // Without checkpointing every layer keeps its activations. With it, one set of
  // buffers serves every layer, and each layer keeps only its input and the rng state,
  // so that backward can recompute it with the same dropout masks.
  fwd_checkpointed_ = checkpointing_;
  training_ = training;
  fwd_offloaded_ = checkpointing_ && offload_;
  acts_.resize(checkpointing_ ? 1 : usz(cfg_.n_layers));
  layer_inputs_.resize(checkpointing_ && !offload_ ? usz(cfg_.n_layers) : 0);
  host_inputs_.resize(fwd_offloaded_ ? usz(cfg_.n_layers) : 0);
  layer_rng_.assign(checkpointing_ ? usz(cfg_.n_layers) : 0, rng);
  for (int l = 0; l < cfg_.n_layers; ++l) {
    auto& slot = acts_[checkpointing_ ? 0 : usz(l)];
    if (!slot) slot = std::make_unique<LayerActs>();
    if (checkpointing_) {
      layer_rng_[usz(l)] = rng;
      //! [gpu-offload]
      // The copy is queued before the layer overwrites x_final_ on the same stream.
      if (fwd_offloaded_) {
        if (host_inputs_[usz(l)].size() != nD) host_inputs_[usz(l)] = PinnedBuffer<float>(nD);
        CUDA_CHECK(cudaMemcpyAsync(host_inputs_[usz(l)].data(), x_final_.data(), nD * sizeof(float),
                                   cudaMemcpyDeviceToHost, stream_));
      } else {
        layer_inputs_[usz(l)].resize(nD);
        CUDA_CHECK(cudaMemcpyAsync(layer_inputs_[usz(l)].data(), x_final_.data(), nD * sizeof(float),
                                   cudaMemcpyDeviceToDevice, stream_));
      }
      //! [gpu-offload]
    }
    // The layer copies its input into its cache first, so input and output may alias.
    layer_forward(l, x_final_.data(), x_final_.data(), training, rng, *slot);
  }
  NvtxRange head("head");  // final norm, classifier and loss
  inv_final_.resize(usz(N));
  xn_final_.resize(nD);
  rmsnorm_forward(x_final_.data(), rms_final_.data(), xn_final_.data(), inv_final_.data(), N, D, cfg_.norm_eps, stream_);
  const bf16* xnb = rounded(xb_, xn_final_.data(), static_cast<std::int64_t>(nD));
  peak_act_bytes_ = cached_bytes();
  head_fused_ = head_version_ == 2;
  if (head_fused_) return chunked_head(xnb, targets != nullptr);
  logits_.resize(usz(N) * V);
  gemm_bf16_xwt(cublas_, xnb, cls_.data(), logits_.data(), OutType::f32, N, D, V, false, stream_);
  if (!targets || target_count_ == 0) {
    CUDA_CHECK(cudaStreamSynchronize(stream_));
    return 0.0f;
  }
  row_loss_.resize(usz(N));
  cross_entropy_loss(logits_.data(), targets_.data(), row_loss_.data(), N, V, stream_);
  return mean_loss();
}

//! [gpu-chunked-head]
// Head version 2: the classifier, the loss and (when a backward can follow) the loss's
// gradient with respect to the final norm's output, a chunk of rows at a time, so that
// float32 logits exist for one chunk only (64 MiB of them: 524 rows of LLaMA's 32000
// words, 130 of LLaMA-3's 128256). Each chunk's logits become their own gradient in place
// (softmax − one-hot, over the batch's target count) and go straight into dxn = dlogits·Wcls;
// backward then starts from dxn. Same kernels as version 1, row for row.
float LlamaModelGpu::chunked_head(const bf16* xnb, bool with_targets) {
  const int N = B_ * T_, D = cfg_.dim, V = cfg_.vocab_size;
  // An evaluation (training = false) skips the gradient's product; backward then refuses.
  const bool grad = with_targets && lora_.has_value() && training_;
  backward_pending_ = grad;
  const std::int64_t fit = head_chunk_rows_ > 0 ? head_chunk_rows_ : kHeadChunkBytes / (4 * static_cast<std::int64_t>(V));
  const int rows = static_cast<int>(std::clamp<std::int64_t>(fit, 1, N));
  logits_.resize(usz(rows) * V);
  row_loss_.resize(usz(N));
  if (grad) dxn_.resize(usz(N) * D);
  const float inv_count = target_count_ > 0 ? 1.0f / static_cast<float>(target_count_) : 0.0f;
  for (int r0 = 0; r0 < N && with_targets; r0 += rows) {
    const int n = std::min(rows, N - r0);
    gemm_bf16_xwt(cublas_, xnb + usz(r0) * D, cls_.data(), logits_.data(), OutType::f32, n, D, V, false, stream_);
    cross_entropy_loss(logits_.data(), targets_.data() + r0, row_loss_.data() + r0, n, V, stream_);
    if (!grad) continue;
    cross_entropy_backward(logits_.data(), targets_.data() + r0, n, V, inv_count, stream_);
    const bf16* dlogits_b = rounded(yb_, logits_.data(), static_cast<std::int64_t>(n) * V);
    gemm_bf16_dyw(cublas_, dlogits_b, cls_.data(), dxn_.data() + usz(r0) * D, OutType::f32, n, D, V, false, stream_);
  }
  if (!with_targets || target_count_ == 0) {
    CUDA_CHECK(cudaStreamSynchronize(stream_));
    return 0.0f;
  }
  return mean_loss();
}
//! [gpu-chunked-head]

float LlamaModelGpu::mean_loss() {
  const int N = B_ * T_;
  std::vector<float> losses(usz(N));
  CUDA_CHECK(cudaMemcpyAsync(losses.data(), row_loss_.data(), usz(N) * sizeof(float), cudaMemcpyDeviceToHost, stream_));
  CUDA_CHECK(cudaStreamSynchronize(stream_));
  double sum = 0.0;
  for (float v : losses) sum += v;
  return static_cast<float>(sum / target_count_);
}

//! [gpu-model-backward]
void LlamaModelGpu::backward() {
  if (acts_.empty() || T_ == 0) throw std::logic_error("LlamaModelGpu::backward: no forward pass to differentiate");
  if (!backward_pending_)
    throw std::logic_error("LlamaModelGpu::backward: no pending training forward with targets");
  backward_pending_ = false;
  if (!lora_) throw std::logic_error("LlamaModelGpu::backward: the model has no LoRA adapters");
  const int N = B_ * T_, D = cfg_.dim, V = cfg_.vocab_size;
  const std::size_t nD = usz(N) * D;
  std::optional<NvtxRange> head(std::in_place, "head");
  if (!head_fused_) {  // version 2's forward has left dxn already
    if (target_count_ > 0)
      cross_entropy_backward(logits_.data(), targets_.data(), N, V, 1.0f / static_cast<float>(target_count_), stream_);
    else
      CUDA_CHECK(cudaMemsetAsync(logits_.data(), 0, logits_.size() * sizeof(float), stream_));
    // dxn = dlogits·Wcls through a BF16 GEMM, like every frozen matrix.
    const bf16* dlogits_b = rounded(yb_, logits_.data(), static_cast<std::int64_t>(N) * V);
    dxn_.resize(nD);
    gemm_bf16_dyw(cublas_, dlogits_b, cls_.data(), dxn_.data(), OutType::f32, N, D, V, false, stream_);
  }
  dx_.resize(nD);
  CUDA_CHECK(cudaMemsetAsync(dx_.data(), 0, nD * sizeof(float), stream_));
  rmsnorm_backward(x_final_.data(), rms_final_.data(), inv_final_.data(), dxn_.data(), dx_.data(), N, D, stream_);
  head.reset();
  for (int l = cfg_.n_layers - 1; l >= 0; --l) {
    if (fwd_checkpointed_) {
      // Recompute this layer from its saved input and rng state, then differentiate it.
      LayerActs& a = *acts_[0];
      std::mt19937_64 rng = layer_rng_[usz(l)];
      recompute_out_.resize(nD);
      const float* in = nullptr;
      if (fwd_offloaded_) {
        recompute_in_.resize(nD);
        CUDA_CHECK(cudaMemcpyAsync(recompute_in_.data(), host_inputs_[usz(l)].data(), nD * sizeof(float),
                                   cudaMemcpyHostToDevice, stream_));
        in = recompute_in_.data();
      } else {
        in = layer_inputs_[usz(l)].data();
      }
      layer_forward(l, in, recompute_out_.data(), training_, rng, a);
      peak_act_bytes_ = std::max(peak_act_bytes_, cached_bytes());
      layer_backward(l, a, dx_.data());
    } else {
      layer_backward(l, *acts_[usz(l)], dx_.data());
    }
  }
  CUDA_CHECK(cudaStreamSynchronize(stream_));
}
//! [gpu-model-backward]

std::int64_t LlamaModelGpu::cached_bytes() const {
  std::int64_t n = 0;
  for (const auto& a : acts_)
    if (a) n += a->bytes();
  for (const DeviceFloats& x : layer_inputs_) n += static_cast<std::int64_t>(x.size() * sizeof(float));
  for (const DeviceFloats* f : {&x_final_, &inv_final_, &xn_final_, &recompute_in_}) n += static_cast<std::int64_t>(f->size() * sizeof(float));
  return n;
}

std::vector<std::pair<std::string, std::int64_t>> LlamaModelGpu::buffer_inventory() const {
  auto f32 = [](std::initializer_list<const DeviceFloats*> bufs) {
    std::int64_t n = 0;
    for (const DeviceFloats* b : bufs) n += static_cast<std::int64_t>(b->capacity() * sizeof(float));
    return n;
  };
  std::int64_t inputs = f32({&recompute_in_}), acts = 0;
  for (const DeviceFloats& x : layer_inputs_) inputs += f32({&x});
  for (const auto& a : acts_) {
    if (!a) continue;
    acts += f32({&a->x, &a->inv1, &a->xn1, &a->q, &a->k, &a->v, &a->att, &a->o, &a->x2, &a->inv2, &a->xn2, &a->h1,
                 &a->h3, &a->g});
    for (const DeviceLoraCache& c : a->lc) acts += f32({&c.xa});
  }
  const auto b16 = [](const DeviceBuffer<bf16>& b) { return static_cast<std::int64_t>(b.bytes()); };
  return {{"layer inputs", inputs},
          {"layer activations", acts},
          {"final norm", f32({&x_final_, &inv_final_, &xn_final_, &recompute_out_})},
          {"backward scratch", f32({&tmp_, &dx_, &dxn_, &dg_, &dout_, &dq_, &dk_, &dv_, &ds_})},
          {"LoRA scratch", f32({&lora_scratch_.xd, &lora_scratch_.dxa, &lora_scratch_.dxd})},
          {"BF16 operands", b16(xb_) + b16(yb_)},
          {"logits and loss", f32({&logits_, &row_loss_})},
          {"dequantize scratch", static_cast<std::int64_t>(scratch_.bytes())},
          {"tokens", static_cast<std::int64_t>(tokens_.bytes() + targets_.bytes())}};
}

std::vector<float> LlamaModelGpu::logits() const {
  if (head_fused_)
    throw std::logic_error("LlamaModelGpu::logits: head version 2 keeps no logits (set_head_version(1) keeps them)");
  std::vector<float> out(logits_.size());
  CUDA_CHECK(cudaStreamSynchronize(stream_));
  logits_.download(out.data(), out.size());
  return out;
}

}  // namespace qlora::cuda
