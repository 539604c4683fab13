// Where models and data are found. The project never ships the checkpoints; it
// looks, in order, in: $QLORA_MODELS_DIR (models) / $QLORA_DATA_DIR (data), then
// ../shared/models and ../shared/data relative to the source tree and the current
// directory, then ./models and ./data (filled by scripts/fetch_models.sh on
// machines with internet).
#pragma once

#include <filesystem>
#include <optional>
#include <string>
#include <vector>

namespace qlora {

/// Directories searched for model files, in order (existing ones only).
std::vector<std::filesystem::path> model_dirs();
/// Directories searched for data files, in order (existing ones only).
std::vector<std::filesystem::path> data_dirs();

/// Resolves a model file name (e.g. "stories260K.bin", "kjv15M-hf"): an existing
/// path is returned as is, otherwise the first match in model_dirs(); nullopt if none.
std::optional<std::filesystem::path> find_model(const std::string& name);
std::optional<std::filesystem::path> find_data(const std::string& name);

/// Like find_model/find_data, but throws std::runtime_error listing the directories searched.
std::filesystem::path require_model(const std::string& name);
std::filesystem::path require_data(const std::string& name);

}  // namespace qlora
