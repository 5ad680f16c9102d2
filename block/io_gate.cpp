// SPDX-License-Identifier: MIT
#include "block/io_gate.hpp"

namespace fleeced::block {

// Ordering: an operation increments active_ before it looks at paused_, and
// pause() sets paused_ before it looks at active_ (both seq_cst), so either
// the operation sees the pause and backs out, or pause() sees it and waits.
IoGate::Guard IoGate::enter() {
  for (;;) {
    active_.fetch_add(1);
    if (!paused_.load()) return Guard(this);
    exit();
    std::unique_lock lock(mu_);
    cv_.wait(lock, [this] { return !paused_.load(); });
  }
}

IoGate::Guard IoGate::try_enter() {
  active_.fetch_add(1);
  if (!paused_.load()) return Guard(this);
  exit();
  return Guard();
}

void IoGate::exit() {
  if (active_.fetch_sub(1) == 1 && paused_.load()) {
    std::lock_guard lock(mu_);
    cv_.notify_all();
  }
}

void IoGate::pause() {
  pause_mu_.lock();
  std::unique_lock lock(mu_);
  paused_.store(true);
  cv_.wait(lock, [this] { return active_.load() == 0; });
}

void IoGate::resume() {
  {
    std::lock_guard lock(mu_);
    paused_.store(false);
    cv_.notify_all();
  }
  pause_mu_.unlock();
}

}  // namespace fleeced::block
