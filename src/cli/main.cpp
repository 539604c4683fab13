// Entry point of the `qlora` tool. Subcommands register themselves (command.hpp);
// errors from the library are std::exceptions whose message names the culprit
// (file, tensor or flag), printed here as one line with exit status 1. A command that
// has printed its own ending throws ExitStatus with the status to return.
#include "command.hpp"

#include <csignal>
#include <cstdio>
#include <exception>
#include <string_view>

namespace qlora::cli {
std::vector<CommandSetup>& command_registry() {
  static std::vector<CommandSetup> registry;
  return registry;
}

std::vector<std::string>& command_line() {
  static std::vector<std::string> words;
  return words;
}

std::string shell_quote(const std::string& word) {
  constexpr std::string_view plain = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-+=.,/:@%";
  if (!word.empty() && word.find_first_not_of(plain) == std::string::npos) return word;
  std::string q = "'";
  for (char c : word) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

CLI::App* command_group(CLI::App& app, const std::string& name, const std::string& description) {
  auto found = app.get_subcommands([&](CLI::App* s) { return s->get_name() == name; });
  if (!found.empty()) return found.front();
  auto* group = app.add_subcommand(name, description);
  group->require_subcommand(1);
  return group;
}
}  // namespace qlora::cli

int main(int argc, char** argv) {
  // A file-size limit (ulimit -f, some batch schedulers) would kill the process in the middle
  // of a checkpoint; ignored, the write fails with EFBIG and the error names the file.
  std::signal(SIGXFSZ, SIG_IGN);
  CLI::App app{
      "qlora: 4-bit QLoRA fine-tuning, readable from the ground up.\n"
      "Each subcommand belongs to a chapter of the book in chapters/; run `qlora <command> --help`."};
  app.require_subcommand(1);
  qlora::cli::command_line().assign(argv, argv + argc);
  for (auto& setup : qlora::cli::command_registry()) setup(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const qlora::cli::ExitStatus& e) {
    return e.status;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "qlora: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
