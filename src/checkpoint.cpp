// Training checkpoints: write, read, find the newest, prune. See checkpoint.hpp.
#include "checkpoint.hpp"

#include "atomic_file.hpp"
#include "peft_adapter.hpp"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <charconv>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace qlora {

namespace fs = std::filesystem;

namespace {

constexpr const char* kStateFile = "trainer_state.json";
constexpr const char* kOptimizerFile = "optimizer.safetensors";
constexpr const char* kPrefix = "checkpoint-";

std::string rng_text(const std::mt19937_64& rng) {
  std::ostringstream s;
  s << rng;
  return s.str();
}

void rng_from_text(std::mt19937_64& rng, const std::string& text, const fs::path& file) {
  std::istringstream s(text);
  s >> rng;
  if (!s) throw std::runtime_error("corrupt generator state in " + file.string());
}

// N of a folder named checkpoint-N, or -1 for any other name.
int checkpoint_step(const fs::path& dir) {
  const std::string name = dir.filename().string();
  const std::string prefix = kPrefix;
  if (name.size() <= prefix.size() || name.compare(0, prefix.size(), prefix) != 0) return -1;
  int step = -1;
  const char* first = name.data() + prefix.size();
  const char* last = name.data() + name.size();
  const auto [end, err] = std::from_chars(first, last, step);
  return err == std::errc() && end == last && step >= 0 ? step : -1;
}

}  // namespace

fs::path checkpoint_dir(const fs::path& out, int step) { return out / (kPrefix + std::to_string(step)); }

bool checkpoint_complete(const fs::path& dir) {
  for (const char* f : {"adapter_config.json", "adapter_model.safetensors", kOptimizerFile, kStateFile})
    if (!fs::is_regular_file(dir / f)) return false;
  return true;
}

std::vector<fs::path> complete_checkpoints(const fs::path& out) {
  std::vector<std::pair<int, fs::path>> found;
  if (!fs::is_directory(out)) return {};
  for (const auto& e : fs::directory_iterator(out)) {
    const int step = checkpoint_step(e.path());
    if (step >= 0 && e.is_directory() && checkpoint_complete(e.path())) found.emplace_back(step, e.path());
  }
  std::sort(found.begin(), found.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
  std::vector<fs::path> dirs;
  for (auto& [step, dir] : found) dirs.push_back(std::move(dir));
  return dirs;
}

fs::path resolve_resume(const fs::path& dir) {
  if (fs::exists(dir / kStateFile)) return dir;
  if (!fs::is_directory(dir)) throw std::runtime_error("--resume " + dir.string() + ": no such folder");
  const auto found = complete_checkpoints(dir);
  if (found.empty())
    throw std::runtime_error("--resume " + dir.string() + ": neither a checkpoint (no " + kStateFile +
                             ") nor an output folder with a complete checkpoint-N");
  return found.front();
}

// The adapter and the optimizer state first, trainer_state.json last: see the header.
void save_checkpoint(const fs::path& dir, Trainer& tr, const TrainerState& st) {
  write_peft_adapter(dir, tr.adapter());
  tr.save_optimizer(dir / kOptimizerFile);
  const nlohmann::json j = {{"step", st.step},
                            {"skipped_steps", st.skipped_steps},
                            {"data_rng", rng_text(st.data_rng)},
                            {"dropout_rng", rng_text(st.dropout_rng)}};
  write_text_atomic(dir / kStateFile, j.dump(2) + "\n");
}

TrainerState load_checkpoint(const fs::path& dir, Trainer& tr) {
  const auto state_file = dir / kStateFile;
  std::ifstream in(state_file);
  if (!in) throw std::runtime_error("cannot read checkpoint state " + state_file.string());
  TrainerState st;
  try {
    nlohmann::json j;
    in >> j;
    rng_from_text(st.data_rng, j.at("data_rng").get<std::string>(), state_file);
    rng_from_text(st.dropout_rng, j.at("dropout_rng").get<std::string>(), state_file);
    st.step = j.value("step", -1);
    st.skipped_steps = j.value("skipped_steps", 0);  // absent in checkpoints from before skipping existed
  } catch (const nlohmann::json::exception& e) {
    throw std::runtime_error("corrupt checkpoint state " + state_file.string() + ": " + e.what());
  }
  tr.load_adapter(read_peft_adapter(dir), "checkpoint " + dir.string());
  tr.load_optimizer(dir / kOptimizerFile);
  // A skipped step never reached the optimizer, so its count is the loop's minus those.
  if (st.step - st.skipped_steps != tr.optimizer_steps())
    throw std::runtime_error("checkpoint " + dir.string() + ": trainer step " + std::to_string(st.step) + " with " +
                             std::to_string(st.skipped_steps) + " skipped differs from the optimizer's " +
                             std::to_string(tr.optimizer_steps()));
  return st;
}

void prune_checkpoints(const fs::path& out, int keep, const std::vector<fs::path>& protect) {
  if (keep <= 0) return;
  const auto dirs = complete_checkpoints(out);
  auto is_protected = [&](const fs::path& dir) {
    return std::any_of(protect.begin(), protect.end(),
                       [&](const fs::path& p) { return !p.empty() && fs::exists(p) && fs::equivalent(dir, p); });
  };
  for (std::size_t i = static_cast<std::size_t>(keep); i < dirs.size(); ++i) {
    if (is_protected(dirs[i])) continue;
    fs::remove(dirs[i] / kStateFile);
    fs::remove_all(dirs[i]);
  }
}

}  // namespace qlora
