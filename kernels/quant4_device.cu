// A 4-bit tensor in device memory (chapter 5). See quant4_device.cuh.
#include "quant4_device.cuh"

#include "dynamic_map.hpp"
#include "fp4.hpp"
#include "nf4.hpp"

#include <bit>
#include <stdexcept>
#include <string>

namespace qlora::cuda {

DeviceQuant4 DeviceQuant4::allocate(QuantType type, int blocksize, std::vector<std::int64_t> shape,
                                    bool double_quant) {
  check_blocksize(blocksize);
  DeviceQuant4 d;
  d.type = type;
  d.blocksize = blocksize;
  d.numel = 1;
  for (auto dim : shape) {
    if (dim < 0) throw std::invalid_argument("DeviceQuant4: negative dimension in shape");
    d.numel *= dim;
  }
  d.shape = std::move(shape);
  d.double_quant = double_quant;
  const auto blocks = static_cast<std::size_t>(d.num_blocks());
  d.packed = DeviceBuffer<std::uint8_t>(static_cast<std::size_t>((d.numel + 1) / 2));
  if (double_quant) {
    d.absmax_code = DeviceBuffer<std::uint8_t>(blocks);
    d.nested_absmax = DeviceBuffer<float>((blocks + 255) / 256);
  } else {
    d.absmax = DeviceBuffer<float>(blocks);
  }
  const auto& values = type == QuantType::nf4 ? nf4_table : fp4_table;
  d.table = to_device(std::span<const float>(values));
  const auto map = dynamic_map(true);
  d.nested_map = to_device(std::span<const float>(map));
  return d;
}

DeviceQuant4 DeviceQuant4::upload(const Quant4Tensor& q) {
  DeviceQuant4 d = allocate(q.type, q.blocksize, q.shape, q.double_quant);
  if (d.numel != q.numel) {
    throw std::invalid_argument("DeviceQuant4::upload: shape has " + std::to_string(d.numel) + " elements but numel is " +
                                std::to_string(q.numel));
  }
  if (q.double_quant && q.nested.blocksize != 256) {
    throw std::invalid_argument("DeviceQuant4::upload: nested blocksize " + std::to_string(q.nested.blocksize) +
                                " (the GPU kernels support bitsandbytes' 256)");
  }
  d.packed.upload(q.packed);
  if (q.double_quant) {
    d.absmax_code.upload(q.nested.codes);
    d.nested_absmax.upload(q.nested.absmax);
    d.offset = q.nested.offset;
  } else {
    d.absmax.upload(q.absmax);
  }
  return d;
}

Quant4Tensor DeviceQuant4::download() const {
  Quant4Tensor q;
  q.type = type;
  q.blocksize = blocksize;
  q.shape = shape;
  q.numel = numel;
  q.packed = packed.download();
  q.double_quant = double_quant;
  if (double_quant) {
    q.nested.codes = absmax_code.download();
    q.nested.absmax = nested_absmax.download();
    q.nested.offset = offset;
    q.nested.blocksize = 256;
  } else {
    q.absmax = absmax.download();
  }
  return q;
}

template <class T>
static void copy_device(DeviceBuffer<T>& dst, const DeviceBuffer<T>& src) {
  if (!src.empty()) CUDA_CHECK(cudaMemcpy(dst.data(), src.data(), src.bytes(), cudaMemcpyDeviceToDevice));
}

DeviceQuant4 DeviceQuant4::clone() const {
  DeviceQuant4 d = allocate(type, blocksize, shape, double_quant);
  d.offset = offset;
  copy_device(d.packed, packed);
  copy_device(d.absmax, absmax);
  copy_device(d.absmax_code, absmax_code);
  copy_device(d.nested_absmax, nested_absmax);
  return d;
}

std::int64_t DeviceQuant4::storage_bytes() const {
  auto b = static_cast<std::int64_t>(packed.bytes() + absmax.bytes() + absmax_code.bytes() + nested_absmax.bytes());
  return double_quant ? b + 4 : b;  // + the float32 offset
}

std::int64_t DeviceQuant4::rows(const char* what) const {
  if (shape.size() != 2) {
    throw std::invalid_argument(std::string(what) + ": the 4-bit weight must be 2-D (out x in), got " +
                                std::to_string(shape.size()) + " dimensions");
  }
  return shape[0];
}

std::int64_t DeviceQuant4::cols(const char* what) const {
  rows(what);
  return shape[1];
}

Quant4View DeviceQuant4::view() const {
  Quant4View v;
  v.packed = packed.data();
  v.absmax = absmax.data();
  v.absmax_code = absmax_code.data();
  v.nested_absmax = nested_absmax.data();
  v.table = table.data();
  v.nested_map = nested_map.data();
  v.offset = offset;
  v.numel = numel;
  v.blocksize = blocksize;
  v.log2_blocksize = std::countr_zero(static_cast<unsigned>(blocksize));
  v.double_quant = double_quant;
  return v;
}

}  // namespace qlora::cuda
