// Atomic file writes (write then rename). See atomic_file.hpp.
#include "atomic_file.hpp"

#include <cerrno>
#include <cstring>
#include <fstream>
#include <stdexcept>
#include <string>

namespace qlora {

namespace {
// The failure as the OS reported it ("No space left on device"); streams keep errno.
std::string os_error() { return errno != 0 ? std::strerror(errno) : "unknown I/O error"; }
}  // namespace

void write_file_atomic(const std::filesystem::path& path, const std::function<void(std::ostream&)>& write) {
  std::filesystem::path tmp = path;
  tmp += ".tmp";
  auto fail = [&](const std::string& what) {
    const std::string why = os_error();
    std::error_code ignored;
    std::filesystem::remove(tmp, ignored);  // no half-written file left behind
    throw std::runtime_error(what + " '" + tmp.string() + "': " + why + " ('" + path.string() + "' is unchanged)");
  };
  {
    errno = 0;
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) fail("cannot open");
    write(out);
    out.flush();
    if (!out) fail("cannot write");
    out.close();  // a full disk may only say so when the last block is written
    if (!out) fail("cannot write");
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
