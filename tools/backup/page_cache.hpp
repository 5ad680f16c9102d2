// SPDX-License-Identifier: MIT
// Keeps a file being written from filling the page cache.
#pragma once

#include <cstdint>

namespace fleece::backup {

// Writes are grouped in aligned blocks of `step` bytes. When a write reaches
// the end of a block, the disk write of that block starts at once, and the
// block `lag` bytes earlier is waited for and dropped from the page cache. So
// only about `lag` bytes are ever dirty or cached: a backup neither evicts the
// page cache of everything else on the machine nor pays for touching a whole
// disk's worth of fresh page-cache memory (on a VM, first-touch can cost more
// than the copy), and the final fdatasync has almost nothing left to wait
// for. nbdcopy does the same with its file output.
//
// Writes are expected to be roughly sequential (a backup's image, or a pull's
// requests handed out in order); a range another thread has not written yet
// when its turn to be dropped comes simply stays cached until the final sync.
// Everything here is advisory: errors show up again in the final fdatasync.
// Thread-safe (it holds only the descriptor and constants).
class PageCacheWindow {
 public:
  static constexpr uint64_t kDefaultStep = 2ull << 20;
  static constexpr uint64_t kDefaultLag = 16ull << 20;

  // lag must be a multiple of step, step a power of two.
  explicit PageCacheWindow(int fd, uint64_t step = kDefaultStep, uint64_t lag = kDefaultLag)
      : fd_(fd), step_(step), lag_(lag) {}

  // [offset, offset + length) was just written.
  void written(uint64_t offset, uint64_t length) const;

 private:
  int fd_;
  uint64_t step_;
  uint64_t lag_;
};

}  // namespace fleece::backup
