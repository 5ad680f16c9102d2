// SPDX-License-Identifier: MIT
#include "server/log.hpp"

#include <spdlog/sinks/stdout_sinks.h>

namespace fleeced::server {

spdlog::logger& log() {
  static std::shared_ptr<spdlog::logger> logger = [] {
    auto existing = spdlog::get("server");
    if (existing) return existing;
    auto l = spdlog::stderr_logger_mt("server");
    l->set_pattern("%Y-%m-%d %H:%M:%S.%e %^%l%$ [%n] %v");
    return l;
  }();
  return *logger;
}

}  // namespace fleeced::server
