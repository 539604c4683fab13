// Model and data search path. See search_path.hpp.
#include "search_path.hpp"

#include <cstdlib>
#include <stdexcept>

namespace qlora {
namespace {

std::vector<std::filesystem::path> dirs_for(const char* env, const char* sub) {
  std::vector<std::filesystem::path> candidates;
  if (const char* e = std::getenv(env); e && *e) candidates.emplace_back(e);
  candidates.push_back(std::filesystem::path(QLORA_SOURCE_DIR) / ".." / "shared" / sub);
  candidates.push_back(std::filesystem::current_path() / ".." / "shared" / sub);
  candidates.push_back(std::filesystem::path(QLORA_SOURCE_DIR) / sub);
  candidates.push_back(std::filesystem::current_path() / sub);
  std::vector<std::filesystem::path> out;
  for (auto& c : candidates) {
    std::error_code ec;
    if (!std::filesystem::is_directory(c, ec)) continue;
    auto canon = std::filesystem::weakly_canonical(c, ec);
    bool seen = false;
    for (auto& o : out) seen = seen || o == canon;
    if (!seen) out.push_back(canon);
  }
  return out;
}

std::optional<std::filesystem::path> find_in(const std::vector<std::filesystem::path>& dirs, const std::string& name) {
  std::error_code ec;
  if (std::filesystem::exists(name, ec)) return std::filesystem::path(name);
  for (auto& d : dirs)
    if (std::filesystem::exists(d / name, ec)) return d / name;
  return std::nullopt;
}

std::filesystem::path require_in(const std::vector<std::filesystem::path>& dirs, const std::string& name,
                                  const char* what, const char* env) {
  if (auto p = find_in(dirs, name)) return *p;
  std::string msg = std::string(what) + " '" + name + "' not found; searched: ";
  for (auto& d : dirs) msg += d.string() + " ";
  msg += std::string("(set ") + env + " or run scripts/fetch_models.sh)";
  throw std::runtime_error(msg);
}

}  // namespace

std::vector<std::filesystem::path> model_dirs() { return dirs_for("QLORA_MODELS_DIR", "models"); }
std::vector<std::filesystem::path> data_dirs() { return dirs_for("QLORA_DATA_DIR", "data"); }
std::optional<std::filesystem::path> find_model(const std::string& name) { return find_in(model_dirs(), name); }
std::optional<std::filesystem::path> find_data(const std::string& name) { return find_in(data_dirs(), name); }
std::filesystem::path require_model(const std::string& name) {
  return require_in(model_dirs(), name, "model", "QLORA_MODELS_DIR");
}
std::filesystem::path require_data(const std::string& name) {
  return require_in(data_dirs(), name, "data file", "QLORA_DATA_DIR");
}

}  // namespace qlora
