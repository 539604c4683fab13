// Stopping a long run cleanly (chapter 7, "When things go wrong"). While an
// InterruptGuard lives, SIGINT (Ctrl-C) and SIGTERM (what schedulers and `kill` send)
// only set a flag, which the training loop reads after each optimizer step: the step
// finishes and a checkpoint is written before the process ends. A second signal ends
// the process at once with the shell's status for it, 128 + the signal number; the
// files written so far are whole, since every write is atomic.
#pragma once

#include <atomic>
#include <string>

namespace qlora {

class InterruptGuard {
 public:
  /// Installs the handlers (clearing the flag); throws std::logic_error when another guard lives.
  InterruptGuard();
  /// Puts the previous handlers back.
  ~InterruptGuard();
  InterruptGuard(const InterruptGuard&) = delete;
  InterruptGuard& operator=(const InterruptGuard&) = delete;

  /// The first signal received (SIGINT or SIGTERM), 0 while none.
  static const std::atomic<int>& signal();
};

/// "SIGINT", "SIGTERM", else "signal N".
std::string signal_name(int signal);

/// The exit status a shell gives a process ended by `signal`: 128 + its number (130 for SIGINT, 143 for SIGTERM).
constexpr int exit_status_for_signal(int signal) { return 128 + signal; }

}  // namespace qlora
