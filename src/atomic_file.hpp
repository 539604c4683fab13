// Atomic file writes: every checkpoint, adapter and quantized file is written to
// a temporary file in the same directory and renamed over the target, so a crash
// never leaves a half-written file under the real name.
#pragma once

#include <filesystem>
#include <functional>
#include <iosfwd>
#include <span>
#include <string_view>

namespace qlora {

/// Calls write(stream) on "<path>.tmp", flushes, closes and checks it, then renames it to
/// path. On any I/O failure (a full disk, a read-only folder, a size limit) it removes the
/// temporary file, leaves whatever was at path untouched, and throws std::runtime_error
/// naming the path and the operating system's error.
void write_file_atomic(const std::filesystem::path& path, const std::function<void(std::ostream&)>& write);

/// Convenience for whole-buffer writes.
void write_file_atomic(const std::filesystem::path& path, std::span<const char> bytes);
void write_text_atomic(const std::filesystem::path& path, std::string_view text);

}  // namespace qlora
