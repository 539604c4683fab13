// SIGINT and SIGTERM as a request to stop after the current step. See interrupt.hpp.
#include "interrupt.hpp"

#include <csignal>
#include <stdexcept>

#include <unistd.h>

namespace qlora {

namespace {

// A handler may only touch lock-free atomics (and call async-signal-safe functions).
std::atomic<int> g_signal{0};
static_assert(std::atomic<int>::is_always_lock_free);
std::atomic<bool> g_installed{false};
struct sigaction g_old_int{}, g_old_term{};

extern "C" void on_signal(int sig) {
  int none = 0;
  if (!g_signal.compare_exchange_strong(none, sig)) _exit(exit_status_for_signal(sig));  // the second one: now
}

}  // namespace

InterruptGuard::InterruptGuard() {
  if (g_installed.exchange(true)) throw std::logic_error("InterruptGuard: another guard is already installed");
  g_signal = 0;
  struct sigaction sa{};
  sa.sa_handler = on_signal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;  // reads and writes in progress carry on rather than fail with EINTR
  sigaction(SIGINT, &sa, &g_old_int);
  sigaction(SIGTERM, &sa, &g_old_term);
}

InterruptGuard::~InterruptGuard() {
  sigaction(SIGINT, &g_old_int, nullptr);
  sigaction(SIGTERM, &g_old_term, nullptr);
  g_installed = false;
}

const std::atomic<int>& InterruptGuard::signal() { return g_signal; }

std::string signal_name(int signal) {
  if (signal == SIGINT) return "SIGINT";
  if (signal == SIGTERM) return "SIGTERM";
  return "signal " + std::to_string(signal);
}

}  // namespace qlora
