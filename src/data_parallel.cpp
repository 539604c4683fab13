// Data-parallel fine-tuning: the world of ranks, batch slices, the run's identity check
// and the mpirun command line. See data_parallel.hpp.
#include "data_parallel.hpp"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <stdexcept>
#include <thread>

#include <unistd.h>

#ifdef QLORA_HAVE_MPI
#define OMPI_SKIP_MPICXX 1  // the C API only: mpi.h would pull in the deprecated C++ bindings
#define MPICH_SKIP_MPICXX 1
#include <mpi.h>
#endif

namespace qlora {

namespace fs = std::filesystem;

void SingleProcess::abort(const std::string& message) {
  std::fprintf(stderr, "qlora: error: %s\n", message.c_str());
  std::exit(1);
}

bool launched_by_mpirun() {
  return std::getenv("OMPI_COMM_WORLD_SIZE") != nullptr || std::getenv("PMIX_RANK") != nullptr;
}

bool built_with_mpi() {
#ifdef QLORA_HAVE_MPI
  return true;
#else
  return false;
#endif
}

#ifdef QLORA_HAVE_MPI
namespace {

// MPI's blocking collectives wait for ever when a rank hangs. So each collective is
// started non-blocking and polled against a deadline; past it, the job is aborted with a
// message that says which collective this rank waited in. (A rank that exits ends the
// job anyway: mpirun kills the others when one exits without MPI_Finalize.)
class MpiWorld final : public Communicator {
 public:
  explicit MpiWorld(double timeout_s) : timeout_s_(timeout_s) {
    int provided = 0;
    MPI_Init_thread(nullptr, nullptr, MPI_THREAD_FUNNELED, &provided);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank_);
    MPI_Comm_size(MPI_COMM_WORLD, &size_);
    MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, rank_, MPI_INFO_NULL, &local_);
    MPI_Comm_rank(local_, &local_rank_);
    MPI_Comm_size(local_, &local_size_);
  }
  ~MpiWorld() override {
    MPI_Comm_free(&local_);
    MPI_Finalize();
  }
  MpiWorld(const MpiWorld&) = delete;
  MpiWorld& operator=(const MpiWorld&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  int local_rank() const override { return local_rank_; }
  int local_size() const override { return local_size_; }

  //! [mpi-deadline]
  void allreduce_sum(float* data, std::size_t n, const char* what) override {
    MPI_Request r;
    MPI_Iallreduce(MPI_IN_PLACE, data, count(n), MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD, &r);
    wait(r, what);
  }
  //! [mpi-deadline]
  void allreduce_sum(double* data, std::size_t n, const char* what) override {
    MPI_Request r;
    MPI_Iallreduce(MPI_IN_PLACE, data, count(n), MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD, &r);
    wait(r, what);
  }
  int allreduce_max(int v, const char* what) override {
    MPI_Request r;
    MPI_Iallreduce(MPI_IN_PLACE, &v, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD, &r);
    wait(r, what);
    return v;
  }
  void broadcast(void* data, std::size_t bytes, int root, const char* what) override {
    MPI_Request r;
    MPI_Ibcast(data, count(bytes), MPI_BYTE, root, MPI_COMM_WORLD, &r);
    wait(r, what);
  }
  std::vector<std::string> all_gather(const std::string& mine, const char* what) override {
    int len = count(mine.size());
    std::vector<int> lens(static_cast<std::size_t>(size_)), offsets(static_cast<std::size_t>(size_));
    MPI_Request r;
    MPI_Iallgather(&len, 1, MPI_INT, lens.data(), 1, MPI_INT, MPI_COMM_WORLD, &r);
    wait(r, what);
    int total = 0;
    for (std::size_t i = 0; i < lens.size(); ++i) {
      offsets[i] = total;
      total += lens[i];
    }
    std::string all(static_cast<std::size_t>(total), '\0');
    MPI_Iallgatherv(mine.data(), len, MPI_CHAR, all.data(), lens.data(), offsets.data(), MPI_CHAR, MPI_COMM_WORLD, &r);
    wait(r, what);
    std::vector<std::string> out;
    for (std::size_t i = 0; i < lens.size(); ++i)
      out.push_back(all.substr(static_cast<std::size_t>(offsets[i]), static_cast<std::size_t>(lens[i])));
    return out;
  }
  [[noreturn]] void abort(const std::string& message) override {
    std::fprintf(stderr, "qlora: error on rank %d of %d: %s\n", rank_, size_, message.c_str());
    std::fflush(stderr);
    MPI_Abort(MPI_COMM_WORLD, 1);
    std::_Exit(1);  // MPI_Abort does not return; this tells the compiler so
  }

 private:
  int rank_ = 0, size_ = 1, local_rank_ = 0, local_size_ = 1;
  MPI_Comm local_ = MPI_COMM_NULL;
  double timeout_s_;

  static int count(std::size_t n) {
    if (n > static_cast<std::size_t>(INT32_MAX)) throw std::length_error("a collective of more than 2^31 elements");
    return static_cast<int>(n);
  }
  //! [mpi-wait]
  // Spins for the first millisecond (a step's all-reduce of small adapters is that quick),
  // then sleeps between tests so that a waiting rank leaves its core to the others.
  void wait(MPI_Request& r, const char* what) {
    const auto start = std::chrono::steady_clock::now();
    for (int flag = 0;;) {
      MPI_Test(&r, &flag, MPI_STATUS_IGNORE);
      if (flag) return;
      const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      if (waited > timeout_s_)
        abort(std::string(what) + " did not complete in " + std::to_string(static_cast<long>(timeout_s_)) +
              " s (--collective-timeout): another rank died or hangs");
      if (waited < 1e-3)
        std::this_thread::yield();
      else
        std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
  }
  //! [mpi-wait]
};

}  // namespace
#endif

std::unique_ptr<Communicator> join_world(double timeout_s) {
  if (!launched_by_mpirun()) return std::make_unique<SingleProcess>();
#ifdef QLORA_HAVE_MPI
  return std::make_unique<MpiWorld>(timeout_s);
#else
  (void)timeout_s;
  throw std::runtime_error("started by mpirun, but this qlora was built without MPI (install libopenmpi-dev, "
                           "scripts/setup.sh, and configure again)");
#endif
}

std::pair<int, int> rank_rows(int batch, int rank, int size) {
  if (size < 1 || rank < 0 || rank >= size) throw std::invalid_argument("rank_rows: rank out of range");
  const int base = batch / size, extra = batch % size;
  const int first = rank * base + std::min(rank, extra);
  return {first, first + base + (rank < extra ? 1 : 0)};
}

MicroBatch rank_slice(const MicroBatch& global, int rank, int size) {
  const auto [first, last] = rank_rows(global.B, rank, size);
  const auto T = static_cast<std::size_t>(global.T);
  MicroBatch mb;
  mb.B = last - first;
  mb.T = global.T;
  mb.first_row = first;
  mb.x.assign(global.x.begin() + static_cast<std::ptrdiff_t>(first * T), global.x.begin() + static_cast<std::ptrdiff_t>(last * T));
  mb.y.assign(global.y.begin() + static_cast<std::ptrdiff_t>(first * T), global.y.begin() + static_cast<std::ptrdiff_t>(last * T));
  mb.counted = std::count_if(mb.y.begin(), mb.y.end(), [](int t) { return t != kIgnoreIndex; });
  return mb;
}

std::uint64_t content_hash(const void* data, std::size_t n, std::uint64_t h) {
  const auto* bytes = static_cast<const unsigned char*>(data);
  for (std::size_t i = 0; i < n; ++i) {
    h ^= bytes[i];
    h *= 0x100000001b3ull;
  }
  return h;
}

bool same_on_every_rank(Communicator& comm, std::uint64_t value, const char* what) {
  std::uint64_t first = value;
  comm.broadcast(&first, sizeof first, 0, what);
  return comm.allreduce_max(value != first ? 1 : 0, what) == 0;
}

namespace {

std::string hex(std::uint64_t v) {
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(v));
  return buf;
}

std::string one_file_fingerprint(const fs::path& file) {
  std::ifstream in(file, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read " + file.string());
  const auto size = static_cast<std::size_t>(fs::file_size(file));
  constexpr std::size_t kMiB = 1 << 20;
  std::string head(std::min(size, kMiB), '\0'), tail(std::min(size, kMiB), '\0');
  in.read(head.data(), static_cast<std::streamsize>(head.size()));
  in.seekg(static_cast<std::streamoff>(size - tail.size()));
  in.read(tail.data(), static_cast<std::streamsize>(tail.size()));
  if (!in) throw std::runtime_error("cannot read " + file.string());
  return std::to_string(size) + ":" + hex(content_hash(tail.data(), tail.size(), content_hash(head.data(), head.size())));
}

}  // namespace

std::string file_fingerprint(const fs::path& path) {
  if (!fs::is_directory(path)) return one_file_fingerprint(path);
  std::vector<fs::path> files;
  for (const auto& e : fs::directory_iterator(path))
    if (e.is_regular_file()) files.push_back(e.path());
  std::sort(files.begin(), files.end());
  std::string all;
  for (const auto& f : files) all += f.filename().string() + "=" + one_file_fingerprint(f) + ";";
  return all;
}

//! [check-same-run]
void check_same_run(Communicator& comm, const RunIdentity& id) {
  std::string text;
  for (const auto& [name, value] : id.fields) text += name + "=" + value + "\n";
  // One hash each first; the fields travel only when a hash differs.
  if (same_on_every_rank(comm, content_hash(text.data(), text.size()), "the configuration check")) return;
  const std::vector<std::string> all = comm.all_gather(text, "the configuration check");
  auto fields_of = [](const std::string& t) {
    std::vector<std::pair<std::string, std::string>> f;
    std::size_t pos = 0;
    for (std::size_t nl; (nl = t.find('\n', pos)) != std::string::npos; pos = nl + 1) {
      const std::string line = t.substr(pos, nl - pos);
      const auto eq = line.find('=');
      f.emplace_back(line.substr(0, eq), line.substr(eq + 1));
    }
    return f;
  };
  const auto ref = fields_of(all[0]);
  for (std::size_t i = 0; i < ref.size(); ++i) {
    std::string differs;
    for (std::size_t r = 1; r < all.size(); ++r) {
      const auto f = fields_of(all[r]);
      const std::string value = i < f.size() && f[i].first == ref[i].first ? f[i].second : "(missing)";
      if (value != ref[i].second) differs += ", " + value + " on rank " + std::to_string(r);
    }
    if (!differs.empty())
      throw std::runtime_error("the ranks of this run disagree on " + ref[i].first + ": " + ref[i].second +
                               " on rank 0" + differs + " (every rank must train the same model on the same data with the same flags)");
  }
  throw std::runtime_error("the ranks of this run disagree on their configuration (a field only some ranks have)");
}
//! [check-same-run]

std::vector<std::string> mpirun_command(int nproc, const std::string& program, const std::vector<std::string>& args) {
#ifdef QLORA_MPIEXEC
  std::vector<std::string> cmd = {QLORA_MPIEXEC};
#else
  std::vector<std::string> cmd = {"mpirun"};
#endif
  cmd.insert(cmd.end(), {"-np", std::to_string(nproc)});
  if (static_cast<long>(nproc) > sysconf(_SC_NPROCESSORS_ONLN)) cmd.push_back("--oversubscribe");
  if (geteuid() == 0) cmd.push_back("--allow-run-as-root");
  cmd.push_back(program);
  cmd.insert(cmd.end(), args.begin(), args.end());
  return cmd;
}

}  // namespace qlora
