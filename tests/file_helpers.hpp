// Helpers shared by the tests that write, corrupt and read files: a per-process
// temporary folder, whole-file byte I/O, finding a model or skipping with a warning,
// and running the qlora binary.
#pragma once

#include "search_path.hpp"

#include <catch2/catch.hpp>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <optional>
#include <string>
#include <unistd.h>
#include <vector>

#include <sys/wait.h>

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

/// The model's path, or nullopt after failing the test: a missing model is never a silent pass.
inline std::optional<std::filesystem::path> model_or_fail(const std::string& name) {
  auto p = find_model(name);
  if (!p) FAIL_CHECK("model '" << name << "' not found in the model search path (scripts/fetch_models.sh fetches it)");
  return p;
}

/// What running the qlora binary gave: its exit status and its stdout and stderr.
struct CliRun {
  int rc;
  std::string output;
};

/// Runs a shell command line, stderr folded into stdout.
inline CliRun run_shell(const std::string& command) {
  std::string cmd = command;
  cmd.append(" 2>&1");
  std::string out;
  FILE* pipe = popen(cmd.c_str(), "r");
  REQUIRE(pipe);
  char buf[4096];
  while (std::fgets(buf, sizeof buf, pipe)) out += buf;
  const int status = pclose(pipe);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, out};
}

/// The qlora binary (ctest sets QLORA_BIN).
inline std::string qlora_bin() {
  const char* bin = std::getenv("QLORA_BIN");
  INFO("QLORA_BIN is not set (ctest sets it to the qlora binary)");
  REQUIRE(bin != nullptr);
  return bin;
}

/// Runs `$QLORA_BIN args` through the shell, stderr folded into stdout.
inline CliRun run_qlora(const std::string& args) {
  std::string cmd = "'";
  cmd.append(qlora_bin()).append("' ").append(args);  // append: GCC 12 misfires -Wrestrict on operator+
  return run_shell(cmd);
}

}  // namespace qlora::test
