// SPDX-License-Identifier: MIT
// IoGate lets the control plane change the block graph "with I/O drained":
// every device operation holds the gate open while it runs; pause() waits
// until no operation is inside and keeps new ones out until resume().
// Thread-safe. The fast path is one atomic increment and one load.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>

namespace fleeced::block {

class IoGate {
 public:
  class Guard {
   public:
    Guard() = default;
    explicit Guard(IoGate* gate) : gate_(gate) {}
    Guard(Guard&& o) noexcept : gate_(o.gate_) { o.gate_ = nullptr; }
    Guard& operator=(Guard&&) = delete;
    ~Guard() {
      if (gate_) gate_->exit();
    }
    explicit operator bool() const { return gate_ != nullptr; }

   private:
    IoGate* gate_ = nullptr;
  };

  // Enters, waiting while the gate is paused.
  Guard enter();
  // Enters unless paused (never blocks): an empty Guard means "would block".
  Guard try_enter();
  // Waits until no operation is inside; new ones wait until resume().
  // Thread: control plane; pauses do not nest.
  void pause();
  void resume();

 private:
  void exit();

  std::atomic<int64_t> active_{0};
  std::atomic<bool> paused_{false};
  std::mutex mu_;
  std::condition_variable cv_;
  std::mutex pause_mu_;  // one pauser at a time
};

// Pauses a gate for a scope.
class GatePause {
 public:
  explicit GatePause(IoGate& gate) : gate_(gate) { gate_.pause(); }
  ~GatePause() { gate_.resume(); }
  GatePause(const GatePause&) = delete;
  GatePause& operator=(const GatePause&) = delete;

 private:
  IoGate& gate_;
};

}  // namespace fleeced::block
