// Safetensors files: the tensor container of the Hugging Face ecosystem (chapter 3).
// Layout: u64 little-endian header length N, N bytes of JSON header
// {"name": {"dtype": "BF16", "shape": [..], "data_offsets": [begin, end]}, "__metadata__": {..}},
// then the raw little-endian data; offsets are relative to the data section.
// The reader applies the reference implementation's rules (huggingface/safetensors,
// tensor.rs): the header fits in the file, is a JSON object, every entry has a known
// dtype, a shape and [begin, end] offsets with end - begin = numel × dtype size, and
// the entries tile the data section exactly: no gap, no overlap, nothing left over.
// Every violation throws std::runtime_error naming the file and the tensor.
// The writer lays the data out as the reference does (descending dtype alignment,
// then name) and pads the header with spaces to a multiple of 8 bytes.
#pragma once

#include "bf16.hpp"

#include <cstdint>
#include <filesystem>
#include <map>
#include <span>
#include <string>
#include <vector>

namespace qlora {

enum class DType { F32, F16, BF16, U8, I8, I32, I64, F64, BOOL };

std::string to_string(DType d);
DType parse_dtype(const std::string& s);  ///< throws on an unknown dtype string
std::size_t dtype_size(DType d);
bool is_floating(DType d);

/// IEEE binary16 -> float32, exact (normals, subnormals, ±0, ±Inf, NaN with its payload).
float f16_to_f32(std::uint16_t h);

/// One tensor: dtype, shape and its raw little-endian bytes.
struct Tensor {
  DType dtype = DType::F32;
  std::vector<std::int64_t> shape;
  std::vector<std::uint8_t> data;

  std::int64_t numel() const;
  /// Values as float32 (F32, F16, BF16, F64 only; throws otherwise).
  std::vector<float> to_f32() const;
  static Tensor from_f32(std::span<const float> v, std::vector<std::int64_t> shape);
  static Tensor from_bf16(std::span<const bf16> v, std::vector<std::int64_t> shape);
  static Tensor from_u8(std::span<const std::uint8_t> v, std::vector<std::int64_t> shape);
};

/// A whole file: tensors by name plus string metadata.
struct SafeTensors {
  std::map<std::string, Tensor> tensors;
  std::map<std::string, std::string> metadata;

  const Tensor& at(const std::string& name) const;  ///< throws naming the missing tensor
  bool contains(const std::string& name) const { return tensors.count(name) != 0; }
};

SafeTensors read_safetensors(const std::filesystem::path& path);

/// One tensor of a mapped file: dtype, shape and its bytes where they lie in the map.
struct TensorView {
  DType dtype = DType::F32;
  std::vector<std::int64_t> shape;
  std::span<const std::uint8_t> bytes;

  std::int64_t numel() const;
  /// Values as float32 (floating dtypes only; throws otherwise).
  std::vector<float> to_f32() const;
};

/// A floating tensor's values as float32 / BF16 into out (numel values). BF16 is copied as
/// it is, F32 and F16 are rounded to nearest even. Throws for other dtypes or a wrong size.
void convert_floats(const TensorView& t, std::span<float> out);
void convert_bf16(const TensorView& t, std::span<bf16> out);

/// A safetensors file mapped into memory (chapter 7, "Loading a big model"). The header is
/// read and checked by the same rules as read_safetensors; the data is not read at all until
/// a tensor's bytes are touched, when the kernel pages them in from its page cache, and
/// release() drops those pages from this process again. Streaming a model through it one
/// tensor at a time keeps host memory near one tensor, whatever the file's size.
class MappedSafetensors {
 public:
  /// Throws std::runtime_error naming the file when it cannot be mapped or breaks a rule.
  explicit MappedSafetensors(const std::filesystem::path& path);
  ~MappedSafetensors();
  MappedSafetensors(MappedSafetensors&& o) noexcept;
  MappedSafetensors(const MappedSafetensors&) = delete;
  MappedSafetensors& operator=(const MappedSafetensors&) = delete;
  MappedSafetensors& operator=(MappedSafetensors&&) = delete;

  const std::filesystem::path& path() const { return path_; }
  const std::map<std::string, TensorView>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  bool contains(const std::string& name) const { return tensors_.count(name) != 0; }
  const TensorView& at(const std::string& name) const;  ///< throws naming the file and tensor
  /// Gives the pages of t back (madvise MADV_DONTNEED): they leave this process's resident
  /// memory and stay in the kernel's page cache. t stays valid; touching it reads them again.
  void release(const TensorView& t) const;

 private:
  std::filesystem::path path_;
  const std::uint8_t* base_ = nullptr;
  std::size_t size_ = 0;
  std::map<std::string, TensorView> tensors_;
  std::map<std::string, std::string> metadata_;
  void unmap() noexcept;
};
/// Writes atomically: to path + ".tmp", then rename over path. Throws std::invalid_argument
/// naming the tensor whose byte size does not match dtype × shape.
void write_safetensors(const std::filesystem::path& path, const SafeTensors& st);

}  // namespace qlora
