// Training checkpoints (chapter 7, "Training" and "When things go wrong"): the folders
// out/checkpoint-STEP that --save-every, an interrupted run and --resume share. One holds
// the PEFT adapter, the optimizer state and trainer_state.json (the step, the steps
// skipped as non-finite, the states of the data and dropout generators). Each file is
// written atomically and trainer_state.json last, so a folder is either complete (all
// four files) or ignored. --resume takes a checkpoint or the output folder, where it
// picks the newest complete one; --save-total-limit keeps the newest N.
#pragma once
#include "finetune.hpp"

#include <filesystem>
#include <random>
#include <vector>

namespace qlora {

/// What a checkpoint restores besides the adapter and the optimizer state.
struct TrainerState {
  int step = 0;           ///< optimizer steps of the loop done, skipped ones included
  int skipped_steps = 0;  ///< of those, steps skipped as non-finite (the optimizer never saw them)
  std::mt19937_64 data_rng;
  std::mt19937_64 dropout_rng;
};

/// out/checkpoint-STEP.
std::filesystem::path checkpoint_dir(const std::filesystem::path& out, int step);

/// True when the folder holds all four files of a checkpoint.
bool checkpoint_complete(const std::filesystem::path& dir);

/// The complete checkpoint-N folders of `out`, newest (highest N) first; none when `out` does not exist.
std::vector<std::filesystem::path> complete_checkpoints(const std::filesystem::path& out);

/// What --resume DIR means: DIR itself when it holds trainer_state.json, else the newest
/// complete checkpoint in DIR. Throws std::runtime_error naming DIR when it is neither.
std::filesystem::path resolve_resume(const std::filesystem::path& dir);

/// Writes the trainer's adapter and optimizer state and `st` into `dir` (created).
void save_checkpoint(const std::filesystem::path& dir, Trainer& tr, const TrainerState& st);

/// Loads a checkpoint into the trainer and returns its state. Throws std::runtime_error
/// naming the file when a file is missing or corrupt, or when the optimizer's step count
/// disagrees with the trainer's.
TrainerState load_checkpoint(const std::filesystem::path& dir, Trainer& tr);

/// Deletes the complete checkpoints of `out` older than the newest `keep` (keep 0: none),
/// never one in `protect` (the checkpoint a run resumed from, the last good one of a run
/// that is skipping steps). trainer_state.json goes first, so a deletion cut short leaves
/// an incomplete folder, which --resume skips.
void prune_checkpoints(const std::filesystem::path& out, int keep, const std::vector<std::filesystem::path>& protect);

}  // namespace qlora
