// SPDX-License-Identifier: MIT
// Progress reporting for fleece-backup: a bar with bytes, rate and ETA on a
// terminal, JSON lines for scripts, or nothing. Counters are updated from
// the copy threads; a reporter thread draws.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <string>
#include <thread>

namespace fleece::backup {

enum class ProgressMode { none, bar, json };

class Progress {
 public:
  Progress(ProgressMode mode, std::string label);
  ~Progress();
  Progress(const Progress&) = delete;
  Progress& operator=(const Progress&) = delete;

  void start(uint64_t total);  // starts the reporter
  void add(uint64_t bytes) { done_.fetch_add(bytes, std::memory_order_relaxed); }
  void finish();  // final line, stops the reporter

 private:
  void loop();
  void draw(bool final);

  ProgressMode mode_;
  std::string label_;
  uint64_t total_ = 0;
  std::atomic<uint64_t> done_{0};
  std::chrono::steady_clock::time_point started_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  std::thread thread_;
};

std::string human_bytes(double bytes);

}  // namespace fleece::backup
