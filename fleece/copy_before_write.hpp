// SPDX-License-Identifier: MIT
// CopyBeforeWrite is the fleecing filter: a Device placed between the live
// format node and its file. From its creation (the point in time) it keeps a
// snapshot of `source`: before a write, write-zeroes or discard changes a
// cluster the snapshot still needs, the old contents are copied to `target`
// once; later writes to that cluster go straight through. The snapshot side
// (snapshot_read / snapshot_extents, used by the snapshot-access device)
// reads copied clusters from the target and the others from the source,
// holding a shared range lock that writers needing a copy wait for, so a
// reader never sees new data or a torn cluster.
//
// Clusters whose old contents are all zero are not written to the target
// (it only grows by data actually copied); they read back as zeroes and
// report hole|zero. Thread-safe.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <vector>

#include "block/device.hpp"
#include "block/dirty_bitmap.hpp"

namespace fleeced::fleece {

enum class OnCbwError {
  break_guest_write,  // the live write fails with the copy's error
  break_snapshot,     // the live write proceeds; every later snapshot read fails (EIO)
};

struct CbwOptions {
  // Copy granularity. 0 = automatic: 4 KiB (a 4 KiB guest write copies only
  // 4 KiB), doubled while the disk has more than 2^27 clusters, so each
  // tracking bitmap stays within 16 MiB (4 KiB up to 512 GiB, 8 KiB up to
  // 1 TiB, ...).
  uint32_t cluster_size = 0;
  OnCbwError on_error = OnCbwError::break_guest_write;
  // 0 = none. A live write waits at most this long for its copy; then the
  // copy counts as failed (on_error decides) and finishes in the background.
  std::chrono::milliseconds timeout{0};
  // Only these clusters are protected and readable (null: the whole disk).
  const block::DirtyBitmap* bitmap = nullptr;
};

struct CbwStats {
  uint64_t copied_bytes = 0;  // clusters copied (data and zero)
  uint64_t target_bytes = 0;  // bytes written to the target
  uint64_t copy_ops = 0;      // batched copy operations
  bool broken = false;
};

class CopyBeforeWrite final : public block::Device,
                              public std::enable_shared_from_this<CopyBeforeWrite> {
 public:
  // Errors: EINVAL if the target is smaller than the source, read-only, or
  // the bitmap's size differs from the source.
  static std::shared_ptr<CopyBeforeWrite> create(block::DevicePtr source, block::DevicePtr target,
                                                 const CbwOptions& options, std::error_code& ec);
  ~CopyBeforeWrite() override;
  // The cluster size chosen when CbwOptions::cluster_size is 0.
  static uint32_t auto_cluster_size(uint64_t disk_size);

  const block::DevicePtr& source() const { return source_; }
  const block::DevicePtr& target() const { return target_; }
  uint32_t cluster_size() const { return cluster_; }
  CbwStats stats() const;

  // Live side (block::Device): forwards to the source after copying.
  uint64_t size() const override { return size_; }
  // The source's, but a write here may first read old data from storage: many
  // of those may run at once.
  block::Capabilities capabilities() const override {
    block::Capabilities c = source_->capabilities();
    c.serial_writes = false;
    return c;
  }
  std::error_code read(uint64_t offset, std::span<std::byte> out) override;
  std::error_code try_read(uint64_t offset, std::span<std::byte> out) override;
  std::error_code write(uint64_t offset, std::span<const std::byte> data, bool fua) override;
  std::error_code try_write(uint64_t offset, std::span<const std::byte> data) override;
  std::error_code write_zeroes(uint64_t offset, uint64_t length, block::ZeroFlags flags) override;
  std::error_code discard(uint64_t offset, uint64_t length, bool fua) override;
  std::error_code flush() override;
  std::error_code cache(uint64_t offset, uint64_t length) override;
  std::error_code extents(uint64_t offset, uint64_t length,
                          std::vector<block::Extent>& out) override;

  // Snapshot side. Errors: EACCES outside the protected clusters, EIO once
  // the snapshot is broken, EINVAL out of range.
  std::error_code snapshot_read(uint64_t offset, std::span<std::byte> out);
  // Never blocks: operation_would_block if a copy holds the range or the
  // data is not cached.
  std::error_code snapshot_try_read(uint64_t offset, std::span<std::byte> out);
  std::error_code snapshot_extents(uint64_t offset, uint64_t length,
                                   std::vector<block::Extent>& out);

  // Stops protecting and punches the target's copied clusters (the fleece
  // ended). Later snapshot reads fail with EIO; live writes go straight.
  void release();

 private:
  CopyBeforeWrite(block::DevicePtr source, block::DevicePtr target, const CbwOptions& options);

  // Cluster range [first, last) locks; shared = snapshot readers,
  // exclusive = a writer copying.
  struct Held {
    uint64_t first, last;
    bool exclusive;
  };
  bool conflicts(uint64_t first, uint64_t last, bool exclusive) const;  // mu_ held
  // Blocks until acquired or the deadline passes (false).
  bool lock(uint64_t first, uint64_t last, bool exclusive,
            std::optional<std::chrono::steady_clock::time_point> deadline);
  bool try_lock(uint64_t first, uint64_t last, bool exclusive);
  void unlock(uint64_t first, uint64_t last, bool exclusive);

  // True if some cluster of [offset, offset+length) still needs a copy.
  bool needs_copy(uint64_t offset, uint64_t length) const;
  // Copies what [offset, offset+length) still needs; applies on_error.
  std::error_code copy_before(uint64_t offset, uint64_t length);
  std::error_code copy_clusters(uint64_t first, uint64_t last);  // exclusive lock held
  // copy_clusters unless broken/released, then releases the exclusive lock.
  std::error_code copy_locked(uint64_t first, uint64_t last);
  // Sets hole_ where the source has [at, at+n) unallocated (before the copy).
  std::error_code mark_holes(uint64_t at, uint64_t n);
  void break_snapshot(std::error_code ec);
  std::error_code snapshot_state() const;  // EIO if broken/released
  // Reads [offset, offset+len) of the snapshot; lock held. try_only: never block.
  std::error_code read_locked(uint64_t offset, std::span<std::byte> out, bool try_only);

  block::DevicePtr source_;
  block::DevicePtr target_;
  uint64_t size_;
  uint32_t cluster_;
  uint64_t clusters_;
  OnCbwError on_error_;
  std::chrono::milliseconds timeout_;

  // Granularity = cluster. `access_`: clusters the snapshot can read;
  // `done_`: copied (or found zero); `zero_`: copied clusters that were all
  // zero (not stored in the target); `hole_` (4 KiB granules): what was
  // unallocated in the source when a cluster was copied (reported
  // hole|zero; the rest of a copied cluster is reported as data).
  block::DirtyBitmap access_;
  block::DirtyBitmap done_;
  block::DirtyBitmap zero_;
  block::DirtyBitmap hole_;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::vector<Held> held_;
  std::error_code broken_;  // set once; snapshot reads fail with EIO
  bool released_ = false;
  uint64_t copied_bytes_ = 0;
  uint64_t target_bytes_ = 0;
  uint64_t copy_ops_ = 0;
};

// The snapshot-access device: a read-only view of a CopyBeforeWrite's
// snapshot, exported as the fleece.
class SnapshotAccess final : public block::Device {
 public:
  explicit SnapshotAccess(std::shared_ptr<CopyBeforeWrite> cbw) : cbw_(std::move(cbw)) {}
  const std::shared_ptr<CopyBeforeWrite>& cbw() const { return cbw_; }

  uint64_t size() const override { return cbw_->size(); }
  block::Capabilities capabilities() const override;
  std::error_code read(uint64_t offset, std::span<std::byte> out) override;
  std::error_code try_read(uint64_t offset, std::span<std::byte> out) override;
  std::error_code write(uint64_t offset, std::span<const std::byte> data, bool fua) override;
  std::error_code write_zeroes(uint64_t offset, uint64_t length, block::ZeroFlags flags) override;
  std::error_code discard(uint64_t offset, uint64_t length, bool fua) override;
  std::error_code flush() override { return {}; }
  std::error_code cache(uint64_t, uint64_t) override { return {}; }
  std::error_code extents(uint64_t offset, uint64_t length,
                          std::vector<block::Extent>& out) override;

 private:
  std::shared_ptr<CopyBeforeWrite> cbw_;
};

}  // namespace fleeced::fleece
