// SPDX-License-Identifier: MIT
#include "server/export_registry.hpp"

#include <algorithm>
#include <cerrno>

#include "protocol/nbd.hpp"

namespace fleeced::server {

namespace p = fleeced::protocol;

uint16_t Export::transmission_flags(bool structured_replies) const {
  const block::Capabilities caps = device->capabilities();
  uint16_t flags = p::kFlagHasFlags | p::kFlagSendFlush | p::kFlagSendFua | p::kFlagSendCache |
                   p::kFlagCanMultiConn;
  if (structured_replies) flags |= p::kFlagSendDf;
  if (!writable || caps.read_only) {
    flags |= p::kFlagReadOnly;
  } else {
    flags |= p::kFlagSendTrim | p::kFlagSendWriteZeroes;
    if (caps.can_fast_zero) flags |= p::kFlagSendFastZero;
  }
  return flags;
}

std::vector<std::string> Export::context_names() const {
  std::vector<std::string> names;
  names.reserve(1 + meta_contexts.size());
  names.emplace_back(p::kContextBaseAllocation);
  for (const auto& c : meta_contexts) names.push_back(c.name);
  return names;
}

std::error_code ExportRegistry::add(ExportPtr e) {
  std::lock_guard lock(mu_);
  for (const auto& x : exports_) {
    if (x->name == e->name) return std::make_error_code(std::errc::file_exists);
  }
  exports_.push_back(std::move(e));
  return {};
}

ExportPtr ExportRegistry::remove(std::string_view name) {
  std::lock_guard lock(mu_);
  auto it = std::find_if(exports_.begin(), exports_.end(),
                         [&](const ExportPtr& e) { return e->name == name; });
  if (it == exports_.end()) return nullptr;
  ExportPtr e = *it;
  exports_.erase(it);
  return e;
}

ExportPtr ExportRegistry::find(std::string_view name) const {
  std::lock_guard lock(mu_);
  for (const auto& e : exports_) {
    if (e->name == name) return e;
  }
  return nullptr;
}

std::vector<ExportPtr> ExportRegistry::list() const {
  std::lock_guard lock(mu_);
  return exports_;
}

}  // namespace fleeced::server
