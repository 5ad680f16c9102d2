// SPDX-License-Identifier: MIT
// The server's spdlog logger ("server"), created on first use with a stderr
// sink. Thread-safe.
#pragma once

#include <spdlog/spdlog.h>

namespace fleeced::server {

spdlog::logger& log();

}  // namespace fleeced::server
