// SPDX-License-Identifier: MIT
// The control-socket side of a backup: flow B of the control API (bitmap
// rotation and fleece in one transaction), teardown, and reclaiming a
// frozen bitmap after a failure. Works against fleeced and QEMU alike.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace fleece::tools {
class QmpClient;
}

namespace fleece::backup {

struct BitmapState {
  std::string name;
  bool recording = false;
  bool busy = false;
  bool persistent = false;
  uint64_t granularity = 0;
  uint64_t count = 0;
};

struct NodeState {
  uint64_t size = 0;
  std::vector<BitmapState> bitmaps;
  const BitmapState* find(const std::string& name) const;
};

class FleeceSession {
 public:
  FleeceSession(tools::QmpClient& qmp, std::string node, std::string scratch_dir);
  ~FleeceSession();

  NodeState inspect();  // throws if the node does not exist
  // Removes an export, nodes and job with this session's names that an
  // earlier, killed run left behind.
  void clean_leftovers();
  // If `active` is frozen (a run was killed before reclaiming), merges it into
  // the one recording bitmap named with `prefix` and removes it; returns the
  // new active bitmap's name.
  std::optional<std::string> reclaim_stale(const std::string& active, const std::string& prefix);
  // Throws unless `name` exists, records, and its granularity is a multiple of chunk.
  void require_active(const std::string& name, uint64_t chunk);

  // blockdev-add of the scratch file; one transaction: add `new_bitmap`,
  // disable `frozen` (if not empty), blockdev-backup sync=none; the
  // snapshot-access node; the read-only export (with `frozen` if any).
  void create(const std::string& new_bitmap, const std::string& frozen, uint64_t granularity,
              bool persistent);
  const std::string& export_name() const { return export_; }
  // Undoes what create() did, in order; never throws; returns the first error.
  std::string teardown();
  // After a failure: merge `frozen` into `active`, remove `frozen`. Returns an error or "".
  std::string reclaim(const std::string& frozen, const std::string& active);
  // Best effort; returns an error or "".
  std::string remove_bitmap(const std::string& name);

 private:
  tools::QmpClient& qmp_;
  std::string node_, scratch_dir_;
  std::string tmp_, cbw_, access_, job_, export_, scratch_path_;
  uint64_t size_ = 0;
  bool have_scratch_ = false, have_tmp_ = false, have_job_ = false, have_access_ = false,
       have_export_ = false;
};

}  // namespace fleece::backup
