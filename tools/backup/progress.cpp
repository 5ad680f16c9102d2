// SPDX-License-Identifier: MIT
#include "backup/progress.hpp"

#include <cstdio>

#include <boost/json.hpp>

namespace fleece::backup {

std::string human_bytes(double bytes) {
  static const char* const units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
  int u = 0;
  while (bytes >= 1024 && u < 5) {
    bytes /= 1024;
    ++u;
  }
  char buf[32];
  std::snprintf(buf, sizeof buf, u == 0 ? "%.0f %s" : "%.1f %s", bytes, units[u]);
  return buf;
}

Progress::Progress(ProgressMode mode, std::string label) : mode_(mode), label_(std::move(label)) {}

Progress::~Progress() {
  {
    std::lock_guard lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void Progress::start(uint64_t total) {
  total_ = total;
  started_ = std::chrono::steady_clock::now();
  if (mode_ != ProgressMode::none) thread_ = std::thread([this] { loop(); });
}

void Progress::finish() {
  {
    std::lock_guard lock(mu_);
    if (stop_) return;
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
  if (mode_ != ProgressMode::none) draw(true);
}

void Progress::loop() {
  const auto period =
      mode_ == ProgressMode::bar ? std::chrono::milliseconds(200) : std::chrono::milliseconds(1000);
  std::unique_lock lock(mu_);
  while (!cv_.wait_for(lock, period, [this] { return stop_; })) {
    lock.unlock();
    draw(false);
    lock.lock();
  }
}

void Progress::draw(bool final) {
  const uint64_t done = done_.load(std::memory_order_relaxed);
  const double secs =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - started_).count();
  const double rate = secs > 0 ? static_cast<double>(done) / secs : 0;
  const double eta = rate > 0 && total_ > done ? static_cast<double>(total_ - done) / rate : 0;
  if (mode_ == ProgressMode::json) {
    boost::json::object o{{"event", final ? "done" : "progress"},
                          {"label", label_},
                          {"bytes", done},
                          {"total", total_},
                          {"seconds", secs},
                          {"rate", rate},
                          {"eta", eta}};
    std::printf("%s\n", boost::json::serialize(o).c_str());
    std::fflush(stdout);
    return;
  }
  const double fraction =
      total_ ? static_cast<double>(done) / static_cast<double>(total_) : (final ? 1.0 : 0.0);
  constexpr int kWidth = 30;
  const int filled = static_cast<int>(fraction * kWidth);
  std::string bar(static_cast<size_t>(filled), '#');
  bar.resize(kWidth, '.');
  char eta_text[32] = "";
  if (!final && rate > 0) {
    std::snprintf(eta_text, sizeof eta_text, " ETA %02d:%02d", static_cast<int>(eta) / 60,
                  static_cast<int>(eta) % 60);
  }
  std::fprintf(stderr, "\r%s [%s] %5.1f%% %s / %s  %s/s%s%s", label_.c_str(), bar.c_str(),
               fraction * 100, human_bytes(static_cast<double>(done)).c_str(),
               human_bytes(static_cast<double>(total_)).c_str(), human_bytes(rate).c_str(),
               eta_text, final ? "\n" : "   ");
  std::fflush(stderr);
}

}  // namespace fleece::backup
