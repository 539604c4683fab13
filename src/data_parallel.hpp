// Data-parallel fine-tuning (chapter 9, "More than one GPU"). Every process (a rank)
// holds the frozen 4-bit base and its own copy of the adapters; each step, rank r trains
// on its rows of the global batch and the ranks sum their LoRA gradients, so that every
// rank takes the same optimizer step from the same gradient. A Communicator is the set of
// ranks and the few collectives the training loop needs. Under mpirun it is MPI's world
// (Open MPI); a process started on its own is a world of one that never touches MPI.
// Every collective has a deadline: a rank that died or hangs ends the whole job with a
// message naming the collective and the rank that waited, instead of a silent hang.
#pragma once
#include "example_batches.hpp"

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace qlora {

//! [communicator]
/// The ranks of a data-parallel run and the collectives between them. `what` names the
/// collective in the message of a timeout.
class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  /// This rank's index among the ranks on its host, and their number (which GPU it takes).
  virtual int local_rank() const = 0;
  virtual int local_size() const = 0;
  /// data[i] ← the sum of data[i] over all ranks.
  virtual void allreduce_sum(float* data, std::size_t n, const char* what) = 0;
  virtual void allreduce_sum(double* data, std::size_t n, const char* what) = 0;
  /// The largest of every rank's v.
  virtual int allreduce_max(int v, const char* what) = 0;
  /// `bytes` bytes of rank root's data to every rank.
  virtual void broadcast(void* data, std::size_t bytes, int root, const char* what) = 0;
  /// Every rank's string, in rank order.
  virtual std::vector<std::string> all_gather(const std::string& mine, const char* what) = 0;
  /// Prints "qlora: error on rank R of N: message" and ends every rank of the job.
  [[noreturn]] virtual void abort(const std::string& message) = 0;
};
//! [communicator]

/// A process on its own: every collective leaves its input as it is.
class SingleProcess final : public Communicator {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  int local_rank() const override { return 0; }
  int local_size() const override { return 1; }
  void allreduce_sum(float*, std::size_t, const char*) override {}
  void allreduce_sum(double*, std::size_t, const char*) override {}
  int allreduce_max(int v, const char*) override { return v; }
  void broadcast(void*, std::size_t, int, const char*) override {}
  std::vector<std::string> all_gather(const std::string& mine, const char*) override { return {mine}; }
  [[noreturn]] void abort(const std::string& message) override;
};

/// True when mpirun (Open MPI, or another launcher that sets PMIx's variables) started
/// this process.
bool launched_by_mpirun();

/// Whether this build can run under mpirun (it was configured with MPI).
bool built_with_mpi();

/// The world this process belongs to: MPI's (MPI_Init now, MPI_Finalize when it is
/// destroyed) when mpirun started it, else a world of one. A collective that has not
/// completed after timeout_s seconds aborts the job. Throws std::runtime_error under
/// mpirun in a build without MPI.
std::unique_ptr<Communicator> join_world(double timeout_s);

/// The rows [first, last) of a global batch of `batch` rows that rank `rank` of `size`
/// trains on: contiguous blocks, the first batch % size ranks one row longer.
std::pair<int, int> rank_rows(int batch, int rank, int size);

/// Rank `rank`'s rows of a micro-batch (the same T, its counted targets recounted).
MicroBatch rank_slice(const MicroBatch& global, int rank, int size);

/// FNV-1a, 64 bits, of n bytes, continuing from h: a hash for comparing, not for security.
std::uint64_t content_hash(const void* data, std::size_t n, std::uint64_t h = 0xcbf29ce484222325ull);

/// Whether every rank passed the same value (a collective: one broadcast, one all-reduce).
bool same_on_every_rank(Communicator& comm, std::uint64_t value, const char* what);

/// Size and a hash of the first and last MiB of a file, or of every file in a folder
/// (by name): what tells two copies of a model apart without reading gigabytes.
std::string file_fingerprint(const std::filesystem::path& path);

/// What must be the same on every rank of a run: the model, the data and every training
/// flag, as (name, value) pairs in a fixed order.
struct RunIdentity {
  std::vector<std::pair<std::string, std::string>> fields;
  void add(const std::string& name, const std::string& value) { fields.emplace_back(name, value); }
};

/// Compares every rank's identity with rank 0's: first by a hash of it, then, when a hash
/// differs, field by field. Throws std::runtime_error naming the first field that differs,
/// with its value on each rank that disagrees.
void check_same_run(Communicator& comm, const RunIdentity& id);

/// The mpirun command line that starts `nproc` copies of `program args...`: with
/// --oversubscribe when there are more ranks than cores (a 2-core CI machine), and with
/// --allow-run-as-root when run as root (containers), which Open MPI otherwise refuses.
std::vector<std::string> mpirun_command(int nproc, const std::string& program, const std::vector<std::string>& args);

}  // namespace qlora
