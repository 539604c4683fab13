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

struct RegisterCommand {
  explicit RegisterCommand(CommandSetup setup) { command_registry().push_back(std::move(setup)); }
};

}  // namespace qlora::cli

#define QLORA_CONCAT_INNER(a, b) a##b
#define QLORA_CONCAT(a, b) QLORA_CONCAT_INNER(a, b)
/// Registers a subcommand: QLORA_COMMAND([](CLI::App& app) { auto* c = app.add_subcommand(...); ... });
#define QLORA_COMMAND(setup) \
  static const ::qlora::cli::RegisterCommand QLORA_CONCAT(qlora_command_, __LINE__){setup}
