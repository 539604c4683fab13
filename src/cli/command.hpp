// The `qlora` tool is a set of subcommands, one file each in src/cli/. A file
// registers its subcommand with a static QLORA_COMMAND object, so adding a
// command never touches main.cpp. (The files are linked straight into the
// executable, not through a static library, so the registrations are kept.)
#pragma once

#include <CLI/CLI.hpp>

#include <functional>
#include <string>
#include <vector>

namespace qlora::cli {

/// Adds one subcommand (its options and its callback) to the application.
using CommandSetup = std::function<void(CLI::App&)>;

std::vector<CommandSetup>& command_registry();

/// A subcommand that groups others (e.g. `bench`): whichever file asks first creates it,
/// the rest add their own subcommands to the same group.
CLI::App* command_group(CLI::App& app, const std::string& name, const std::string& description);

/// Number checks with plain messages ("must be > 0, got -1"; the CLI11 2.1 checks print
/// a range up to DBL_MAX). The flag's name is put in front by CLI11.
inline CLI::Validator number_check(bool allow_zero) {
  return CLI::Validator(
      [allow_zero](std::string& text) -> std::string {
        double v = 0;
        if (!CLI::detail::lexical_cast(text, v)) return "not a number: '" + text + "'";
        if (v > 0 || (allow_zero && v == 0)) return {};
        return std::string(allow_zero ? "must be >= 0" : "must be > 0") + ", got " + text;
      },
      allow_zero ? "NONNEGATIVE" : "POSITIVE");
}
inline const CLI::Validator positive = number_check(false);
inline const CLI::Validator non_negative = number_check(true);

/// The command line as typed (main fills it before parsing), for messages that tell the
/// user what to run next.
std::vector<std::string>& command_line();

/// `word` as one word for a POSIX shell: unchanged when it is plain, else in single quotes.
std::string shell_quote(const std::string& word);

/// Thrown by a command that ends with a status of its own after printing why (an
/// interrupted `finetune`, say); main returns `status`.
struct ExitStatus {
  int status;
};

struct RegisterCommand {
  explicit RegisterCommand(CommandSetup setup) { command_registry().push_back(std::move(setup)); }
};

}  // namespace qlora::cli

#define QLORA_CONCAT_INNER(a, b) a##b
#define QLORA_CONCAT(a, b) QLORA_CONCAT_INNER(a, b)
/// Registers a subcommand: QLORA_COMMAND([](CLI::App& app) { auto* c = app.add_subcommand(...); ... });
#define QLORA_COMMAND(setup) \
  static const ::qlora::cli::RegisterCommand QLORA_CONCAT(qlora_command_, __LINE__){setup}
