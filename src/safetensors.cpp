// Safetensors reader and writer (chapter 3). See safetensors.hpp for the rules.
#include "safetensors.hpp"

#include "atomic_file.hpp"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <fstream>
#include <limits>
#include <ostream>
#include <stdexcept>
#include <utility>

#include <cerrno>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

namespace qlora {

static_assert(std::endian::native == std::endian::little, "safetensors data is little-endian; so must the host be");

namespace {

// The reference implementation refuses headers above 100 MB; so do we.
constexpr std::uint64_t kMaxHeaderBytes = 100ull << 20;

struct DTypeInfo {
  DType dtype;
  const char* name;
  std::size_t size;
  // Position in the reference implementation's Dtype enum, which is declared in
  // increasing alignment order; the writer sorts by it (descending) so every tensor
  // starts aligned to its element size.
  int alignment_rank;
};

constexpr DTypeInfo kDTypes[] = {
    {DType::BOOL, "BOOL", 1, 0}, {DType::U8, "U8", 1, 1},     {DType::I8, "I8", 1, 2},
    {DType::F16, "F16", 2, 7},   {DType::BF16, "BF16", 2, 8}, {DType::I32, "I32", 4, 9},
    {DType::F32, "F32", 4, 11},  {DType::F64, "F64", 8, 12},  {DType::I64, "I64", 8, 13},
};

const DTypeInfo& info(DType d) {
  for (const auto& i : kDTypes)
    if (i.dtype == d) return i;
  throw std::logic_error("safetensors: DType without a table entry");
}

// numel × element size with overflow checks; shapes come from untrusted files.
std::uint64_t checked_byte_size(const std::vector<std::int64_t>& shape, std::size_t elem, const std::string& where) {
  std::uint64_t n = elem;
  for (auto d : shape) {
    if (d < 0) throw std::runtime_error(where + ": negative dimension in shape");
    if (d != 0 && n > std::numeric_limits<std::uint64_t>::max() / static_cast<std::uint64_t>(d))
      throw std::runtime_error(where + ": shape too large (byte size overflows)");
    n *= static_cast<std::uint64_t>(d);
  }
  return n;
}

std::string shape_string(const std::vector<std::int64_t>& shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

struct Entry {
  std::string name;
  DType dtype;
  std::vector<std::int64_t> shape;
  std::uint64_t begin, end;
};

//! [safetensors-entry]
// One header entry: {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}.
Entry parse_entry(const std::string& name, const nlohmann::json& j, std::uint64_t data_bytes, const std::string& where) {
  if (!j.is_object()) throw std::runtime_error(where + ": entry is not a JSON object");
  for (const char* key : {"dtype", "shape", "data_offsets"})
    if (!j.contains(key)) throw std::runtime_error(where + ": missing \"" + key + "\"");
  const auto& jd = j["dtype"];
  const auto& js = j["shape"];
  const auto& jo = j["data_offsets"];
  if (!jd.is_string()) throw std::runtime_error(where + ": \"dtype\" is not a string");
  Entry e{name, DType::F32, {}, 0, 0};
  try {
    e.dtype = parse_dtype(jd.get<std::string>());
  } catch (const std::invalid_argument& err) {
    throw std::runtime_error(where + ": " + err.what());
  }
  if (!js.is_array()) throw std::runtime_error(where + ": \"shape\" is not an array");
  for (const auto& d : js) {
    if (!d.is_number_unsigned()) throw std::runtime_error(where + ": \"shape\" holds a non-integer or negative value");
    auto v = d.get<std::uint64_t>();
    if (v > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()))
      throw std::runtime_error(where + ": dimension too large");
    e.shape.push_back(static_cast<std::int64_t>(v));
  }
  if (!jo.is_array() || jo.size() != 2 || !jo[0].is_number_unsigned() || !jo[1].is_number_unsigned())
    throw std::runtime_error(where + ": \"data_offsets\" must be two non-negative integers [begin, end]");
  e.begin = jo[0].get<std::uint64_t>();
  e.end = jo[1].get<std::uint64_t>();
  if (e.begin > e.end)
    throw std::runtime_error(where + ": data_offsets begin " + std::to_string(e.begin) + " > end " +
                             std::to_string(e.end));
  if (e.end > data_bytes)
    throw std::runtime_error(where + ": data_offsets [" + std::to_string(e.begin) + ", " + std::to_string(e.end) +
                             "] out of bounds of the " + std::to_string(data_bytes) + "-byte data section");
  std::uint64_t expect = checked_byte_size(e.shape, dtype_size(e.dtype), where);
  if (e.end - e.begin != expect)
    throw std::runtime_error(where + ": " + std::to_string(e.end - e.begin) + " bytes in data_offsets, but dtype " +
                             to_string(e.dtype) + " × shape " + shape_string(e.shape) + " needs " +
                             std::to_string(expect));
  return e;
}
//! [safetensors-entry]

}  // namespace

std::string to_string(DType d) { return info(d).name; }

DType parse_dtype(const std::string& s) {
  for (const auto& i : kDTypes)
    if (s == i.name) return i.dtype;
  throw std::invalid_argument("unknown or unsupported dtype '" + s + "'");
}

std::size_t dtype_size(DType d) { return info(d).size; }

bool is_floating(DType d) { return d == DType::F32 || d == DType::F16 || d == DType::BF16 || d == DType::F64; }

//! [f16-to-f32]
float f16_to_f32(std::uint16_t h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  const std::uint32_t exp = (h >> 10) & 0x1fu;
  const std::uint32_t mant = h & 0x3ffu;
  if (exp == 0) {
    // Zero or subnormal: mant × 2^-24, exactly representable in float32.
    float v = std::ldexp(static_cast<float>(mant), -24);
    return sign ? -v : v;
  }
  if (exp == 31)  // Inf (mant == 0) or NaN (payload kept in the top mantissa bits).
    return std::bit_cast<float>(sign | 0x7f800000u | (mant << 13));
  // Normal: rebias the exponent from 15 to 127, widen the mantissa from 10 to 23 bits.
  return std::bit_cast<float>(sign | ((exp + 127 - 15) << 23) | (mant << 13));
}
//! [f16-to-f32]

std::int64_t Tensor::numel() const {
  std::int64_t n = 1;
  for (auto d : shape) n *= d;
  return n;
}

std::vector<float> Tensor::to_f32() const {
  if (!is_floating(dtype)) throw std::runtime_error("to_f32: dtype " + to_string(dtype) + " is not a floating type");
  return TensorView{dtype, shape, data}.to_f32();
}

namespace {
template <class T>
Tensor make_tensor(DType dtype, std::span<const T> v, std::vector<std::int64_t> shape) {
  Tensor t;
  t.dtype = dtype;
  t.shape = std::move(shape);
  if (t.numel() != static_cast<std::int64_t>(v.size()))
    throw std::invalid_argument("tensor of shape " + shape_string(t.shape) + " given " + std::to_string(v.size()) +
                                " values");
  t.data.resize(v.size() * sizeof(T));
  if (!v.empty()) std::memcpy(t.data.data(), v.data(), t.data.size());
  return t;
}
}  // namespace

Tensor Tensor::from_f32(std::span<const float> v, std::vector<std::int64_t> shape) {
  return make_tensor(DType::F32, v, std::move(shape));
}
Tensor Tensor::from_bf16(std::span<const bf16> v, std::vector<std::int64_t> shape) {
  return make_tensor(DType::BF16, v, std::move(shape));
}
Tensor Tensor::from_u8(std::span<const std::uint8_t> v, std::vector<std::int64_t> shape) {
  return make_tensor(DType::U8, v, std::move(shape));
}

const Tensor& SafeTensors::at(const std::string& name) const {
  auto it = tensors.find(name);
  if (it == tensors.end()) throw std::runtime_error("tensor '" + name + "' not found");
  return it->second;
}

namespace {

// The checked header of a whole file's bytes: the entries (sorted by offset, tiling
// the data section), the metadata and where the data section starts.
struct Header {
  std::vector<Entry> entries;
  std::map<std::string, std::string> metadata;
  std::uint64_t data_start = 0;
};

Header parse_header(std::span<const std::uint8_t> bytes, const std::string& file) {
  //! [safetensors-read]
  if (bytes.size() < 8)
    throw std::runtime_error(file + ": " + std::to_string(bytes.size()) +
                             " bytes, too short for the 8-byte header length");
  std::uint64_t n = 0;
  std::memcpy(&n, bytes.data(), 8);
  if (n > kMaxHeaderBytes) throw std::runtime_error(file + ": header length " + std::to_string(n) + " exceeds 100 MB");
  if (n > bytes.size() - 8)
    throw std::runtime_error(file + ": header length " + std::to_string(n) + " runs past the end of the file (" +
                             std::to_string(bytes.size()) + " bytes); truncated?");
  const auto* hbegin = reinterpret_cast<const char*>(bytes.data() + 8);
  if (n == 0 || hbegin[0] != '{') throw std::runtime_error(file + ": header does not start with '{'");
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(hbegin, hbegin + n);
  } catch (const nlohmann::json::parse_error& e) {
    throw std::runtime_error(file + ": header is not valid JSON: " + e.what());
  }
  if (!header.is_object()) throw std::runtime_error(file + ": header is not a JSON object");
  Header h;
  h.data_start = 8 + n;
  const std::uint64_t data_bytes = bytes.size() - h.data_start;

  std::vector<Entry>& entries = h.entries;
  for (const auto& [name, value] : header.items()) {
    if (name == "__metadata__") {
      if (!value.is_object()) throw std::runtime_error(file + ": __metadata__ is not a JSON object");
      for (const auto& [k, v] : value.items()) {
        if (!v.is_string()) throw std::runtime_error(file + ": __metadata__ value of '" + k + "' is not a string");
        h.metadata[k] = v.get<std::string>();
      }
      continue;
    }
    entries.push_back(parse_entry(name, value, data_bytes, file + ", tensor '" + name + "'"));
  }

  // The entries must tile the data section: sorted by offset, each begins where the
  // previous one ended, and the last ends at the end of the file.
  std::sort(entries.begin(), entries.end(),
            [](const Entry& a, const Entry& b) { return a.begin != b.begin ? a.begin < b.begin : a.end < b.end; });
  std::uint64_t pos = 0;
  const Entry* prev = nullptr;
  for (const auto& e : entries) {
    if (e.begin < pos)
      throw std::runtime_error(file + ": tensor '" + e.name + "' [" + std::to_string(e.begin) + ", " +
                               std::to_string(e.end) + "] overlaps tensor '" + prev->name + "'");
    if (e.begin > pos)
      throw std::runtime_error(file + ": gap of " + std::to_string(e.begin - pos) + " bytes before tensor '" +
                               e.name + "' (offsets must cover the data section without holes)");
    pos = e.end;
    prev = &e;
  }
  if (pos != data_bytes)
    throw std::runtime_error(file + ": tensors cover " + std::to_string(pos) + " bytes but the data section has " +
                             std::to_string(data_bytes) + " (trailing bytes)");
  //! [safetensors-read]
  return h;
}

std::string file_label(const std::filesystem::path& path) { return "safetensors file '" + path.string() + "'"; }

}  // namespace

SafeTensors read_safetensors(const std::filesystem::path& path) {
  const std::string file = file_label(path);
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + file);
  std::vector<std::uint8_t> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) throw std::runtime_error("read error on " + file);
  Header h = parse_header(bytes, file);
  SafeTensors st;
  st.metadata = std::move(h.metadata);
  for (auto& e : h.entries) {
    Tensor t;
    t.dtype = e.dtype;
    t.shape = std::move(e.shape);
    auto first = bytes.begin() + static_cast<std::ptrdiff_t>(h.data_start + e.begin);
    t.data.assign(first, first + static_cast<std::ptrdiff_t>(e.end - e.begin));
    st.tensors.emplace(e.name, std::move(t));
  }
  return st;
}

std::int64_t TensorView::numel() const {
  std::int64_t n = 1;
  for (auto d : shape) n *= d;
  return n;
}

std::vector<float> TensorView::to_f32() const {
  std::vector<float> out(static_cast<std::size_t>(numel()));
  convert_floats(*this, std::span<float>(out));
  return out;
}

//! [safetensors-map]
MappedSafetensors::MappedSafetensors(const std::filesystem::path& path) : path_(path) {
  const std::string file = file_label(path);
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw std::runtime_error("cannot open " + file + ": " + std::strerror(errno));
  struct stat sb {};
  if (::fstat(fd, &sb) != 0) {
    ::close(fd);
    throw std::runtime_error("cannot stat " + file);
  }
  size_ = static_cast<std::size_t>(sb.st_size);
  // A read-only shared map: the pages are the kernel's page cache, read from disk on
  // first touch, and dropped from this process again by release().
  void* m = size_ ? ::mmap(nullptr, size_, PROT_READ, MAP_SHARED, fd, 0) : nullptr;
  ::close(fd);  // the mapping keeps the file open
  if (m == MAP_FAILED) throw std::runtime_error("cannot map " + file + ": " + std::strerror(errno));
  base_ = static_cast<const std::uint8_t*>(m);
  try {
    Header h = parse_header(std::span<const std::uint8_t>(base_, size_), file);
    metadata_ = std::move(h.metadata);
    for (auto& e : h.entries)
      tensors_.emplace(e.name, TensorView{e.dtype, std::move(e.shape),
                                          std::span<const std::uint8_t>(base_ + h.data_start + e.begin, e.end - e.begin)});
  } catch (...) {
    unmap();
    throw;
  }
}
//! [safetensors-map]

void MappedSafetensors::unmap() noexcept {
  if (base_) ::munmap(const_cast<std::uint8_t*>(base_), size_);
  base_ = nullptr;
}

MappedSafetensors::~MappedSafetensors() { unmap(); }

MappedSafetensors::MappedSafetensors(MappedSafetensors&& o) noexcept
    : path_(std::move(o.path_)), base_(std::exchange(o.base_, nullptr)), size_(o.size_),
      tensors_(std::move(o.tensors_)), metadata_(std::move(o.metadata_)) {}

const TensorView& MappedSafetensors::at(const std::string& name) const {
  auto it = tensors_.find(name);
  if (it == tensors_.end()) throw std::runtime_error(file_label(path_) + ": no tensor '" + name + "'");
  return it->second;
}

void MappedSafetensors::release(const TensorView& t) const {
  // Whole pages inside the tensor only: a page shared with a neighbour may still be needed.
  const std::uintptr_t page = static_cast<std::uintptr_t>(::sysconf(_SC_PAGESIZE));
  const auto begin = reinterpret_cast<std::uintptr_t>(t.bytes.data());
  const std::uintptr_t first = (begin + page - 1) / page * page;
  const std::uintptr_t last = (begin + t.bytes.size()) / page * page;
  if (last > first) ::madvise(reinterpret_cast<void*>(first), last - first, MADV_DONTNEED);
}

namespace {
// Element i of a floating tensor's raw bytes as float32 (exact for F32, BF16 and F16).
float element_f32(const TensorView& t, std::size_t i) {
  const std::uint8_t* p = t.bytes.data();
  switch (t.dtype) {
    case DType::F32: { float f; std::memcpy(&f, p + 4 * i, 4); return f; }
    case DType::BF16: { bf16 b; std::memcpy(&b, p + 2 * i, 2); return bf16_to_f32(b); }
    case DType::F16: { std::uint16_t h; std::memcpy(&h, p + 2 * i, 2); return f16_to_f32(h); }
    case DType::F64: { double d; std::memcpy(&d, p + 8 * i, 8); return static_cast<float>(d); }
    default: throw std::runtime_error("dtype " + to_string(t.dtype) + " is not a floating type");
  }
}

void check_count(const TensorView& t, std::size_t n, const char* what) {
  if (!is_floating(t.dtype)) throw std::runtime_error(std::string(what) + ": dtype " + to_string(t.dtype) + " is not a floating type");
  if (n != static_cast<std::size_t>(t.numel()))
    throw std::invalid_argument(std::string(what) + ": " + std::to_string(n) + " outputs for " +
                                std::to_string(t.numel()) + " values");
}
}  // namespace

void convert_floats(const TensorView& t, std::span<float> out) {
  check_count(t, out.size(), "convert_floats");
  for (std::size_t i = 0; i < out.size(); ++i) out[i] = element_f32(t, i);
}

//! [convert-bf16]
void convert_bf16(const TensorView& t, std::span<bf16> out) {
  check_count(t, out.size(), "convert_bf16");
  // BF16 travels as it is; F32 and F16 round to nearest even, as torch's .to(bfloat16) does.
  if (t.dtype == DType::BF16) {
    std::memcpy(out.data(), t.bytes.data(), t.bytes.size());
    return;
  }
  for (std::size_t i = 0; i < out.size(); ++i) out[i] = f32_to_bf16(element_f32(t, i));
}
//! [convert-bf16]

void write_safetensors(const std::filesystem::path& path, const SafeTensors& st) {
  std::vector<const std::pair<const std::string, Tensor>*> order;
  for (const auto& kv : st.tensors) {
    if (kv.first == "__metadata__") throw std::invalid_argument("'__metadata__' cannot name a tensor");
    const auto& t = kv.second;
    auto expect = checked_byte_size(t.shape, dtype_size(t.dtype), "tensor '" + kv.first + "'");
    if (expect != t.data.size())
      throw std::invalid_argument("tensor '" + kv.first + "': " + std::to_string(t.data.size()) + " bytes, but " +
                                  to_string(t.dtype) + " × shape " + shape_string(t.shape) + " needs " +
                                  std::to_string(expect));
    order.push_back(&kv);
  }
  //! [safetensors-write]
  // Data order as in the reference writer: descending dtype alignment, then name.
  std::stable_sort(order.begin(), order.end(), [](auto* a, auto* b) {
    return info(a->second.dtype).alignment_rank > info(b->second.dtype).alignment_rank;
  });
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!st.metadata.empty()) header["__metadata__"] = st.metadata;
  std::uint64_t offset = 0;
  for (auto* kv : order) {
    const auto& t = kv->second;
    header[kv->first] = {{"dtype", to_string(t.dtype)},
                         {"shape", t.shape},
                         {"data_offsets", {offset, offset + t.data.size()}}};
    offset += t.data.size();
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // pad so the data starts 8-byte aligned
  //! [safetensors-write]
  const std::uint64_t n = text.size();
  write_file_atomic(path, [&](std::ostream& out) {
    out.write(reinterpret_cast<const char*>(&n), 8);
    out.write(text.data(), static_cast<std::streamsize>(text.size()));
    for (auto* kv : order)
      out.write(reinterpret_cast<const char*>(kv->second.data.data()),
                static_cast<std::streamsize>(kv->second.data.size()));
  });
}

}  // namespace qlora
