// SPDX-License-Identifier: MIT
// Exports and the registry that names them. An Export is immutable once
// published (std::shared_ptr<const Export>), so connections never see one
// half-built; the registry is guarded by a mutex and may be changed from the
// control socket while connections look exports up.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

#include "block/device.hpp"
#include "server/io_pool.hpp"

namespace fleeced::server {

// A metadata context other than base:allocation, e.g. qemu:dirty-bitmap:b0.
struct MetaContextSource {
  std::string name;
  // Appends extents for [offset, offset+length) (may stop early, at least one
  // on success); flags are the context's own. Runs on the I/O pool.
  std::function<std::error_code(uint64_t offset, uint64_t length, std::vector<block::Extent>& out)>
      extents;
  // Optional: called when a connection that had selected this context in
  // transmission ends (any thread).
  std::function<void()> on_release;
  // extents never blocks (in-memory, e.g. a dirty bitmap): block status
  // requests that only ask such contexts are answered on the event loop.
  bool nonblocking = false;
};

// Per-export live state shared with connections (client count, closing).
struct ExportState {
  std::atomic<int> clients{0};
  std::atomic<bool> closing{false};  // set by a hard delete: connections end
  // Runs this export's writes one at a time on the I/O pool when the device
  // asks for it (Capabilities::serial_writes), for all its connections.
  const std::shared_ptr<SerialQueue> write_queue = std::make_shared<SerialQueue>();
};

struct Export {
  std::string name;
  std::string description;
  block::DevicePtr device;
  bool writable = false;
  std::vector<MetaContextSource> meta_contexts;  // besides base:allocation
  std::shared_ptr<ExportState> state = std::make_shared<ExportState>();

  uint64_t size() const { return device->size(); }
  // Transmission flags for a connection; DF only with structured replies.
  uint16_t transmission_flags(bool structured_replies) const;
  // Every context name this export offers, base:allocation first.
  std::vector<std::string> context_names() const;
};

using ExportPtr = std::shared_ptr<const Export>;

class ExportRegistry {
 public:
  // Errors: EEXIST if the name is taken.
  std::error_code add(ExportPtr e);
  // Returns the removed export, or null if there was none.
  ExportPtr remove(std::string_view name);
  ExportPtr find(std::string_view name) const;
  std::vector<ExportPtr> list() const;  // in insertion order

 private:
  mutable std::mutex mu_;
  std::vector<ExportPtr> exports_;  // guarded by mu_
};

}  // namespace fleeced::server
