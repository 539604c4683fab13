// Atomic file writes (write then rename). See atomic_file.hpp.
#include "atomic_file.hpp"

#include <fstream>
#include <stdexcept>

namespace qlora {

void write_file_atomic(const std::filesystem::path& path, const std::function<void(std::ostream&)>& write) {
  std::filesystem::path tmp = path;
  tmp += ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) throw std::runtime_error("cannot open '" + tmp.string() + "' for writing");
    write(out);
    out.flush();
    if (!out) throw std::runtime_error("write to '" + tmp.string() + "' failed");
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) throw std::runtime_error("cannot rename '" + tmp.string() + "' to '" + path.string() + "': " + ec.message());
}

void write_file_atomic(const std::filesystem::path& path, std::span<const char> bytes) {
  write_file_atomic(path, [&](std::ostream& out) { out.write(bytes.data(), static_cast<std::streamsize>(bytes.size())); });
}

void write_text_atomic(const std::filesystem::path& path, std::string_view text) {
  write_file_atomic(path, std::span<const char>(text.data(), text.size()));
}

}  // namespace qlora
