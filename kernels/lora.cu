// LoRA forward/backward on cuBLAS (chapter 4). CPU reference: lora_forward_ref /
// lora_backward_ref (src/lora.cpp). See lora.cuh.
#include "lora.cuh"

#include "counter_hash.hpp"

#include <cstdio>
#include <stdexcept>
#include <string>
#include <vector>

namespace qlora::cuda {

DeviceFloats::~DeviceFloats() {
  // A destructor cannot throw; a failed free is reported, not ignored.
  if (p_ != nullptr) {
    const cudaError_t err = cudaFree(p_);
    if (err != cudaSuccess) std::fprintf(stderr, "qlora: cudaFree failed: %s\n", cudaGetErrorString(err));
  }
}

void DeviceFloats::resize(std::size_t n) {
  if (n > cap_ || p_ == nullptr) {
    DeviceFloats fresh;
    CUDA_MALLOC(&fresh.p_, (n > 0 ? n : 1) * sizeof(float));
    fresh.cap_ = n;
    *this = std::move(fresh);
  }
  n_ = n;
}

void DeviceFloats::upload(const float* host, std::size_t n) {
  resize(n);
  CUDA_CHECK(cudaMemcpy(p_, host, n * sizeof(float), cudaMemcpyHostToDevice));
}

void DeviceFloats::download(float* host, std::size_t n) const {
  if (n > n_) throw std::invalid_argument("DeviceFloats::download: asked for more values than the array holds");
  CUDA_CHECK(cudaMemcpy(host, p_, n * sizeof(float), cudaMemcpyDeviceToHost));
}

DeviceLoraAdapter::DeviceLoraAdapter(const LoraAdapter& host) { upload(host); }

void DeviceLoraAdapter::upload(const LoraAdapter& host) {
  if (host.dA.size() != host.A.size() || host.dB.size() != host.B.size())
    throw std::invalid_argument("DeviceLoraAdapter: host gradients not allocated");
  in = host.in;
  out = host.out;
  r = host.r;
  A.upload(host.A.data(), host.A.size());
  B.upload(host.B.data(), host.B.size());
  dA.upload(host.dA.data(), host.dA.size());
  dB.upload(host.dB.data(), host.dB.size());
}

void DeviceLoraAdapter::download(LoraAdapter& host) const {
  if (host.in != in || host.out != out || host.r != r)
    throw std::invalid_argument("DeviceLoraAdapter::download: host adapter has a different shape");
  A.download(host.A.data(), host.A.size());
  B.download(host.B.data(), host.B.size());
  dA.download(host.dA.data(), host.dA.size());
  dB.download(host.dB.data(), host.dB.size());
}

namespace {

//! [lora-gemm-rowmajor]
// cuBLAS is column-major; a row-major M×N matrix is its column-major transpose.
// So row-major C = op(A)·op(B) is column-major Cᵀ = op(B)ᵀ·op(A)ᵀ: swap the
// operands and the dimensions, keep the transposition flags. ld* = stored row length.
void gemm_rowmajor(cublasHandle_t h, FloatMath math, bool trans_a, bool trans_b, int M, int N, int K, float alpha,
                   const float* A, int lda, const float* B, int ldb, float beta, float* C, int ldc) {
  CUBLAS_CHECK(cublasGemmEx(h, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, N, M, K,
                            &alpha, B, CUDA_R_32F, ldb, A, CUDA_R_32F, lda, &beta, C, CUDA_R_32F, ldc,
                            compute_type(math), CUBLAS_GEMM_DEFAULT));
}
//! [lora-gemm-rowmajor]

constexpr int kThreads = 256;
unsigned blocks_for(long n) { return static_cast<unsigned>((n + kThreads - 1) / kThreads); }

//! [lora-dropout-cuda]
// The integer hash of lora_dropout_mask_hashed (src/lora.cpp): u = top 24 bits of
// splitmix64(seed + (i+1)·golden) · 2⁻²⁴, kept iff u >= p. Integer arithmetic and an
// exact float u: the GPU mask equals the CPU mask bit for bit.
__device__ float dropout_keep(long i, float p, float keep_scale, std::uint64_t seed) {
  const std::uint64_t z = counter_hash(seed, static_cast<std::uint64_t>(i));
  const float u = static_cast<float>(z >> 40) * 0x1.0p-24f;
  return u >= p ? keep_scale : 0.0f;
}

__global__ void dropout_mask_kernel(float* __restrict__ mask, long n, float p, float keep_scale, std::uint64_t seed) {
  const long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
  if (i < n) mask[i] = dropout_keep(i, p, keep_scale, seed);
}

// out[i] = x[i]·mask[i]: the dropped LoRA input, the mask hashed where it is used.
__global__ void dropout_mul_kernel(const float* __restrict__ x, float* __restrict__ out, long n, float p,
                                   float keep_scale, std::uint64_t seed) {
  const long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
  if (i < n) out[i] = x[i] * dropout_keep(i, p, keep_scale, seed);
}

// dx[i] += v[i]·mask[i]: dropout's backward is the same mask.
__global__ void dropout_add_kernel(const float* __restrict__ v, float* __restrict__ dx, long n, float p,
                                   float keep_scale, std::uint64_t seed) {
  const long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
  if (i < n) dx[i] += v[i] * dropout_keep(i, p, keep_scale, seed);
}
//! [lora-dropout-cuda]

void check_shapes(const DeviceLoraAdapter& ad, const LoraConfig& cfg, int T) {
  if (ad.r != cfg.r)
    throw std::invalid_argument("LoRA (CUDA): adapter rank " + std::to_string(ad.r) + " differs from config r " +
                                std::to_string(cfg.r));
  if (T <= 0) throw std::invalid_argument("LoRA (CUDA): T must be positive, got " + std::to_string(T));
}

void check_dropout(float p) {
  if (!(p >= 0.0f && p < 1.0f))
    throw std::invalid_argument("LoRA (CUDA) dropout must be in [0, 1), got " + std::to_string(p));
}

// xd = x⊙mask(seed) into the scratch: the input of the masked products.
const float* dropped(const float* x, long n, float p, std::uint64_t seed, DeviceLoraScratch& scratch,
                     cudaStream_t stream) {
  scratch.xd.resize(static_cast<std::size_t>(n));
  const float keep_scale = 1.0f / (1.0f - p);  // computed on the host exactly as the CPU path does
  dropout_mul_kernel<<<blocks_for(n), kThreads, 0, stream>>>(x, scratch.xd.data(), n, p, keep_scale, seed);
  CUDA_CHECK_LAUNCH();
  return scratch.xd.data();
}

}  // namespace

void lora_dropout_mask_cuda(float* mask, std::int64_t n, float p, std::uint64_t seed, cudaStream_t s) {
  check_dropout(p);
  if (n < 0) throw std::invalid_argument("LoRA (CUDA) dropout mask: negative size " + std::to_string(n));
  if (n == 0) return;
  const float keep_scale = 1.0f / (1.0f - p);
  dropout_mask_kernel<<<blocks_for(static_cast<long>(n)), kThreads, 0, s>>>(mask, static_cast<long>(n), p, keep_scale,
                                                                           seed);
  CUDA_CHECK_LAUNCH();
}

//! [lora-forward-cuda]
void lora_forward_cuda(cublasHandle_t handle, cudaStream_t stream, const DeviceLoraAdapter& ad, const LoraConfig& cfg,
                       const float* x, float* y, int T, bool training, std::mt19937_64& rng, DeviceLoraCache& cache,
                       DeviceLoraScratch& scratch, FloatMath math, std::int64_t first_row) {
  check_shapes(ad, cfg, T);
  CUBLAS_CHECK(cublasSetStream(handle, stream));
  const long n = static_cast<long>(T) * ad.in;
  cache.T = T;
  cache.masked = training && cfg.dropout > 0.0f;
  const float* xin = x;
  if (cache.masked) {
    // One draw from rng, as the CPU path makes: the seed of the hashed mask. Same seed,
    // same hash: the masks are identical, and nothing is drawn element by element on
    // the host, uploaded or kept.
    check_dropout(cfg.dropout);
    cache.seed = counter_skip(rng(), static_cast<std::uint64_t>(first_row * ad.in));
    xin = dropped(x, n, cfg.dropout, cache.seed, scratch, stream);
  }
  cache.xa.resize(static_cast<std::size_t>(T) * ad.r);
  // xa[T×r] = xin[T×in]·A[r×in]ᵀ, then y[T×out] += s·xa·B[out×r]ᵀ.
  gemm_rowmajor(handle, math, false, true, T, ad.r, ad.in, 1.0f, xin, ad.in, ad.A.data(), ad.in, 0.0f,
                cache.xa.data(), ad.r);
  gemm_rowmajor(handle, math, false, true, T, ad.out, ad.r, cfg.scale(), cache.xa.data(), ad.r, ad.B.data(), ad.r,
                1.0f, y, ad.out);
}
//! [lora-forward-cuda]

//! [lora-backward-cuda]
void lora_backward_cuda(cublasHandle_t handle, cudaStream_t stream, DeviceLoraAdapter& ad, const LoraConfig& cfg,
                        const float* x, const float* dy, float* dx, int T, const DeviceLoraCache& cache,
                        DeviceLoraScratch& scratch, FloatMath math) {
  check_shapes(ad, cfg, T);
  if (cache.T != T) throw std::invalid_argument("LoRA (CUDA) backward: cache is from a forward over another T");
  CUBLAS_CHECK(cublasSetStream(handle, stream));
  const float s = cfg.scale();
  const long n = static_cast<long>(T) * ad.in;
  scratch.dxa.resize(static_cast<std::size_t>(T) * ad.r);
  // dxa[T×r] = s·dy[T×out]·B[out×r]; dB[out×r] += s·dyᵀ·xa.
  gemm_rowmajor(handle, math, false, false, T, ad.r, ad.out, s, dy, ad.out, ad.B.data(), ad.r, 0.0f,
                scratch.dxa.data(), ad.r);
  gemm_rowmajor(handle, math, true, false, ad.out, ad.r, T, s, dy, ad.out, cache.xa.data(), ad.r, 1.0f, ad.dB.data(),
                ad.r);
  // dA[r×in] += dxaᵀ·xin, with xin hashed again from the forward's seed.
  const float* xin = cache.masked ? dropped(x, n, cfg.dropout, cache.seed, scratch, stream) : x;
  gemm_rowmajor(handle, math, true, false, ad.r, ad.in, T, 1.0f, scratch.dxa.data(), ad.r, xin, ad.in, 1.0f,
                ad.dA.data(), ad.in);
  // dx[T×in] += (dxa·A[r×in])⊙mask.
  if (!cache.masked) {
    gemm_rowmajor(handle, math, false, false, T, ad.in, ad.r, 1.0f, scratch.dxa.data(), ad.r, ad.A.data(), ad.in,
                  1.0f, dx, ad.in);
    return;
  }
  scratch.dxd.resize(static_cast<std::size_t>(n));
  gemm_rowmajor(handle, math, false, false, T, ad.in, ad.r, 1.0f, scratch.dxa.data(), ad.r, ad.A.data(), ad.in, 0.0f,
                scratch.dxd.data(), ad.in);
  const float keep_scale = 1.0f / (1.0f - cfg.dropout);
  dropout_add_kernel<<<blocks_for(n), kThreads, 0, stream>>>(scratch.dxd.data(), dx, n, cfg.dropout, keep_scale,
                                                             cache.seed);
  CUDA_CHECK_LAUNCH();
}
//! [lora-backward-cuda]

}  // namespace qlora::cuda
