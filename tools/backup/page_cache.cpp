// SPDX-License-Identifier: MIT
#include "backup/page_cache.hpp"

#include <fcntl.h>

namespace fleece::backup {

void PageCacheWindow::written(uint64_t offset, uint64_t length) const {
  // The block ends this write reaches: b in (offset, offset + length].
  const uint64_t first_end = (offset / step_ + 1) * step_;
  const uint64_t last_end = (offset + length) / step_ * step_;
  if (length == 0 || last_end < first_end) return;
  const uint64_t from = first_end - step_;
  (void)::sync_file_range(fd_, static_cast<off_t>(from), static_cast<off_t>(last_end - from),
                          SYNC_FILE_RANGE_WRITE);
  if (last_end <= lag_) return;
  const uint64_t old_from = from > lag_ ? from - lag_ : 0;
  const uint64_t old_to = last_end - lag_;
  (void)::sync_file_range(
      fd_, static_cast<off_t>(old_from), static_cast<off_t>(old_to - old_from),
      SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER);
  (void)::posix_fadvise(fd_, static_cast<off_t>(old_from), static_cast<off_t>(old_to - old_from),
                        POSIX_FADV_DONTNEED);
}

}  // namespace fleece::backup
