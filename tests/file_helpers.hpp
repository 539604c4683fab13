// Helpers shared by the tests that write, corrupt and read files: a per-process
// temporary folder, whole-file byte I/O, and finding a model or skipping with a warning.
#pragma once

#include "search_path.hpp"

#include <catch2/catch.hpp>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <optional>
#include <string>
#include <unistd.h>
#include <vector>

namespace qlora::test {

/// A file name in the per-process folder qlora_GROUP_PID of the system temp folder (created).
inline std::filesystem::path temp_path(const std::string& group, const std::string& name) {
  auto dir = std::filesystem::temp_directory_path() / ("qlora_" + group + "_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  return dir / name;
}

inline std::vector<std::uint8_t> read_bytes(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

inline void write_bytes(const std::filesystem::path& p, const std::vector<std::uint8_t>& b) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
}

/// The model's path, or nullopt after a Catch WARN saying the test is skipped.
inline std::optional<std::filesystem::path> model_or_warn(const std::string& name) {
  auto p = find_model(name);
  if (!p) WARN("skipped: model '" << name << "' not found in the model search path (see scripts/fetch_models.sh)");
  return p;
}

}  // namespace qlora::test
