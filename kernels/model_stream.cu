// Streaming a model onto the GPU (chapter 7). See model_stream.cuh.
#include "model_stream.cuh"

#include "atomic_file.hpp"
#include "counter_hash.hpp"
#include "device_buffer.cuh"
#include "hf_llama.hpp"
#include "safetensors.hpp"

#include <cuda_bf16.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstdio>
#include <memory>
#include <vector>

namespace qlora::cuda {
namespace {

std::size_t numel(const TensorSpec& t) {
  std::size_t n = 1;
  for (auto d : t.shape) n *= static_cast<std::size_t>(d);
  return n;
}

//! [random-weights]
// z ~ N(0, 1) by Box-Muller from one 64-bit hash: two 24-bit uniforms in (0, 1).
__global__ void random_bf16_kernel(bf16* __restrict__ out, std::int64_t n, std::uint64_t seed, float mean, float std) {
  for (std::int64_t i = blockIdx.x * (std::int64_t)blockDim.x + threadIdx.x; i < n;
       i += (std::int64_t)gridDim.x * blockDim.x) {
    const std::uint64_t h = counter_hash(seed, static_cast<std::uint64_t>(i));
    const float u1 = (static_cast<float>(h >> 40) + 0.5f) * 0x1.0p-24f;
    const float u2 = (static_cast<float>((h >> 16) & 0xffffffu) + 0.5f) * 0x1.0p-24f;
    const float z = sqrtf(-2.0f * logf(u1)) * cospif(2.0f * u2);
    out[i] = __bfloat16_as_ushort(__float2bfloat16_rn(mean + std * z));
  }
}
//! [random-weights]

// The lowest index of a NaN or infinity (BF16: exponent bits all ones), or n if none.
__global__ void first_non_finite_kernel(const bf16* __restrict__ x, std::int64_t n,
                                        unsigned long long* __restrict__ first) {
  for (std::int64_t i = blockIdx.x * (std::int64_t)blockDim.x + threadIdx.x; i < n;
       i += (std::int64_t)gridDim.x * blockDim.x)
    if ((x[i] & 0x7f80u) == 0x7f80u) atomicMin(first, static_cast<unsigned long long>(i));
}

// FNV-1a of the tensor name: each tensor its own stream of the seed.
std::uint64_t name_hash(const std::string& s) {
  std::uint64_t h = 0xcbf29ce484222325ull;
  for (unsigned char c : s) h = (h ^ c) * 0x100000001b3ull;
  return h;
}

}  // namespace

void print_load_progress(const LoadProgress& p) {
  // Enough lines to watch a 13 GB load without flooding a log.
  const int step = std::max(1, p.tensors_total / 20);
  if (p.tensors_done % step != 0 && p.tensors_done != p.tensors_total) return;
  std::fprintf(stderr, "loading: %d/%d tensors, %.2f/%.2f GB, %.2f GB/s, %.1f s\n", p.tensors_done, p.tensors_total,
               static_cast<double>(p.bytes_done) / 1e9, static_cast<double>(p.bytes_total) / 1e9,
               static_cast<double>(p.bytes_done) / 1e9 / std::max(p.seconds, 1e-9), p.seconds);
}

//! [folder-fill]
TensorFill folder_fill(const HfLlamaFolder& folder) {
  auto host = std::make_shared<std::vector<bf16>>();  // F32/F16 sources only: one tensor
  auto found = std::make_shared<DeviceBuffer<unsigned long long>>(1);
  return [&folder, host, found](const TensorSpec& spec, bf16* out, cudaStream_t stream) {
    const std::span<const bf16> v = folder.bf16_values(spec.name, *host);
    CUDA_CHECK(cudaMemcpyAsync(out, v.data(), v.size_bytes(), cudaMemcpyHostToDevice, stream));
    // A NaN or infinity would quantize into garbage without a word: look for one on the
    // device, where the values already are, and name the file and the tensor.
    const auto n = static_cast<std::int64_t>(v.size());
    unsigned long long first = static_cast<unsigned long long>(n);
    CUDA_CHECK(cudaMemcpyAsync(found->data(), &first, sizeof first, cudaMemcpyHostToDevice, stream));
    const auto blocks = static_cast<unsigned>(std::clamp<std::int64_t>((n + 255) / 256, 1, 132 * 16));
    first_non_finite_kernel<<<blocks, 256, 0, stream>>>(out, n, found->data());
    CUDA_CHECK_LAUNCH();
    CUDA_CHECK(cudaMemcpyAsync(&first, found->data(), sizeof first, cudaMemcpyDeviceToHost, stream));
    // The copies must finish before the source pages are given back.
    CUDA_CHECK(cudaStreamSynchronize(stream));
    if (first < static_cast<unsigned long long>(n)) {
      const bf16 bits = v[first];
      throw std::runtime_error("tensor '" + spec.name + "' in '" + folder.file_of(spec.name).string() +
                               "': " + ((bits & 0x7fu) != 0 ? "NaN" : "an infinite value") + " at " +
                               tensor_position(spec.shape, first) +
                               "; the file is damaged or was saved from a diverged run");
    }
    folder.release(spec.name);
  };
}
//! [folder-fill]

TensorFill random_fill(std::uint64_t seed, float std) {
  return [seed, std](const TensorSpec& spec, bf16* out, cudaStream_t stream) {
    const bool norm = spec.name.ends_with("norm.weight");
    const auto n = static_cast<std::int64_t>(numel(spec));
    const int threads = 256;
    const int blocks = static_cast<int>(std::min<std::int64_t>((n + threads - 1) / threads, 132 * 16));
    random_bf16_kernel<<<blocks, threads, 0, stream>>>(out, n, seed ^ name_hash(spec.name), norm ? 1.0f : 0.0f, std);
    CUDA_CHECK_LAUNCH();
  };
}

void write_hf_folder(const LlamaConfig& config, const TensorFill& fill, const std::filesystem::path& dir,
                     std::int64_t shard_bytes, const std::function<void(const std::filesystem::path&)>& progress) {
  if (shard_bytes <= 0) throw std::invalid_argument("write_hf_folder: shard size must be positive");
  std::filesystem::create_directories(dir);
  const auto specs = llama_tensor_specs(config);
  // Tensors go to shards in order, a new shard when the next tensor would overflow this one.
  std::vector<std::vector<const TensorSpec*>> shards(1);
  std::int64_t in_shard = 0, total = 0;
  for (const TensorSpec& t : specs) {
    const auto bytes = static_cast<std::int64_t>(numel(t) * sizeof(bf16));
    if (in_shard > 0 && in_shard + bytes > shard_bytes) {
      shards.emplace_back();
      in_shard = 0;
    }
    shards.back().push_back(&t);
    in_shard += bytes;
    total += bytes;
  }
  cudaStream_t stream = nullptr;
  nlohmann::ordered_json index;
  index["metadata"] = {{"total_size", total}};
  index["weight_map"] = nlohmann::ordered_json::object();
  for (std::size_t s = 0; s < shards.size(); ++s) {
    char name[64];
    std::snprintf(name, sizeof name, "model-%05zu-of-%05zu.safetensors", s + 1, shards.size());
    SafeTensors st;
    st.metadata["format"] = "pt";
    for (const TensorSpec* t : shards[s]) {
      DeviceBuffer<bf16> d(numel(*t));
      fill(*t, d.data(), stream);
      std::vector<bf16> h(numel(*t));
      CUDA_CHECK(cudaMemcpyAsync(h.data(), d.data(), d.bytes(), cudaMemcpyDeviceToHost, stream));
      CUDA_CHECK(cudaStreamSynchronize(stream));
      st.tensors[t->name] = Tensor::from_bf16(h, t->shape);
      index["weight_map"][t->name] = name;
    }
    write_safetensors(dir / name, st);
    if (progress) progress(dir / name);
  }
  write_text_atomic(dir / "model.safetensors.index.json", index.dump(2) + "\n");
  write_hf_config(dir / "config.json", config);
}

}  // namespace qlora::cuda
