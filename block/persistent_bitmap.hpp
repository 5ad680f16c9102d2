// SPDX-License-Identifier: MIT
// PersistentBitmap keeps a DirtyBitmap in a file beside the disk image and
// makes it crash-safe: mark() returns only once the bits covering the range
// are durable, so a data write issued after mark() can never be on disk
// without its dirty bits. Concurrent marks share one fdatasync (group
// commit); a range already durably dirty costs one lookup. Thread-safe.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <system_error>
#include <vector>

#include "block/dirty_bitmap.hpp"

namespace fleeced::block {

class PersistentBitmap {
 public:
  // Directory holding the bitmaps of one image: "<image>.bitmaps".
  static std::string directory_for(const std::string& image_path);
  // Paths of every bitmap file in that directory (none if it does not exist).
  static std::vector<std::string> list(const std::string& image_path);

  // Creates a new bitmap file (the directory too). Errors: EEXIST, I/O.
  static std::unique_ptr<PersistentBitmap> create(const std::string& image_path,
                                                  const std::string& name, uint64_t disk_size,
                                                  uint32_t granularity, bool recording,
                                                  std::error_code& ec);
  // Opens and loads an existing bitmap file. Errors: EINVAL (corrupt), I/O.
  static std::unique_ptr<PersistentBitmap> open(const std::string& path, std::error_code& ec);
  ~PersistentBitmap();

  const std::string& name() const { return name_; }
  const std::string& path() const { return path_; }
  DirtyBitmap& bitmap() { return bitmap_; }
  const DirtyBitmap& bitmap() const { return bitmap_; }
  bool recording() const;

  // Records the new recording state durably.
  std::error_code set_recording(bool recording);
  // Sets the bits for [offset, offset+length) and returns once they are durable.
  std::error_code mark(uint64_t offset, uint64_t length);
  // True if every granule of the range is already durably dirty (never blocks).
  bool is_durable(uint64_t offset, uint64_t length) const;
  // Writes the whole bitmap durably (after clear, merge, reset).
  std::error_code sync_all();
  // Deletes the file (the bitmap was removed).
  std::error_code remove_file();
  // Completed commits (page writes + fdatasync), for tests and statistics.
  uint64_t commit_count() const;

 private:
  PersistentBitmap(std::string path, std::string name, uint64_t disk_size, uint32_t granularity);
  // Writes the pages holding changed words and words [first_word, end_word),
  // then fdatasync, then records what was written in durable_. Only the
  // thread that set committing_ calls it.
  std::error_code commit_pending(std::size_t first_word, std::size_t end_word);
  // Writes every word (sync_all). Committer only.
  std::error_code write_all();
  // Waits for and takes the committer role; gives it back with an outcome.
  void begin_commit(std::unique_lock<std::mutex>& lock);
  void end_commit(std::unique_lock<std::mutex>& lock, std::error_code ec, bool sticky);

  // Immutable after construction.
  std::string path_;
  std::string name_;
  DirtyBitmap bitmap_;   // the live bits (thread-safe itself)
  DirtyBitmap durable_;  // bits known to be on stable storage
  int fd_ = -1;

  mutable std::mutex mu_;  // guards the members below
  std::condition_variable cv_;
  bool recording_ = true;
  bool committing_ = false;       // a thread is writing + syncing
  uint64_t commit_seq_ = 0;       // completed commits
  std::error_code sticky_error_;  // first write error; later marks fail with it
  uint64_t header_seq_ = 0;       // sequence of the newest valid header slot
  bool removed_ = false;          // remove_file() done: nothing more to write
};

}  // namespace fleeced::block
