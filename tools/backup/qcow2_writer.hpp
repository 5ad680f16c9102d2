// SPDX-License-Identifier: MIT
// Qcow2Writer: writes one new qcow2 v3 image, front to back, for fleece-backup.
// Data clusters are appended as they arrive; the L2/L1 tables, refcounts and
// header are laid out after the data by finish(). The caller owns the writer;
// write() and write_zeroes() may be called from many threads at once for
// disjoint ranges, create() and finish() from one thread.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "backup/page_cache.hpp"

namespace fleece::backup {

struct Qcow2Options {
  uint64_t virtual_size = 0;   // bytes, > 0; the header stores it rounded up to 512 (as QEMU does)
  uint32_t cluster_bits = 16;  // 9..21 (512 B .. 2 MiB)
  std::string backing_file;    // empty = none; stored verbatim (relative to the image's directory)
  std::string backing_format;  // e.g. "qcow2", "raw"; header extension when backing_file is set
};

class Qcow2Writer {
 public:
  // Creates a new image (refuses to overwrite an existing file).
  // Errors: std::invalid_argument for bad options (nothing is created),
  // std::system_error naming the path when the file cannot be created.
  static std::unique_ptr<Qcow2Writer> create(const std::string& path, const Qcow2Options& opts);

  // Without a successful finish(): closes and unlinks the partial file.
  ~Qcow2Writer();
  Qcow2Writer(const Qcow2Writer&) = delete;
  Qcow2Writer& operator=(const Qcow2Writer&) = delete;

  uint64_t cluster_size() const { return cluster_size_; }

  // Stores guest bytes [offset, offset + len). offset is cluster-aligned; len is a multiple of
  // the cluster size or the range ends exactly at virtual_size (the last cluster is zero-padded).
  // All-zero clusters are not stored: unallocated without a backing file, zero clusters with one.
  // Errors: std::invalid_argument (misaligned, out of range, a cluster already written; nothing
  // is changed), std::system_error with errno on I/O failure (the range stays unwritten).
  // Thread: any, concurrently with other writes to disjoint ranges.
  void write(uint64_t offset, const void* data, size_t len);

  // Makes [offset, offset + len) read as zeros; same rules and errors as write(). No I/O.
  void write_zeroes(uint64_t offset, uint64_t len);

  // Writes the L2 tables, L1 table, refcount structures and header, fdatasyncs and closes.
  // Returns the final file size in bytes. Errors: std::system_error on I/O failure,
  // std::logic_error if called twice or while a write() is still in progress.
  // Thread: one, after every write() has returned.
  uint64_t finish();

  // Bytes of data clusters written so far (whole clusters; zero clusters not counted).
  uint64_t data_bytes_stored() const { return data_bytes_.load(std::memory_order_relaxed); }

 private:
  Qcow2Writer(std::string path, const Qcow2Options& opts, int fd);

  // Checks alignment and range; returns the first guest cluster index and the cluster count.
  std::pair<uint64_t, uint64_t> check_range(uint64_t offset, uint64_t len) const;
  // Marks clusters [first, first + count) as being written, or throws if one already was.
  void claim(uint64_t first_index, uint64_t count);
  void release(uint64_t first_index, uint64_t count);
  void write_data(uint64_t first_index, const unsigned char* data, size_t len);
  void pwrite_all(const void* data, size_t len, uint64_t file_offset);
  [[noreturn]] void throw_io(int err, const char* what, uint64_t file_offset) const;
  uint64_t write_metadata();  // returns the file size
  std::vector<unsigned char> encode_header(uint64_t l1_offset, uint64_t l1_entries,
                                           uint64_t refcount_table_offset,
                                           uint64_t refcount_table_clusters) const;

  // Immutable after construction.
  const std::string path_;
  const Qcow2Options opts_;
  const uint64_t cluster_size_;
  const uint64_t header_size_;  // virtual size as stored in the header (512-aligned)
  const uint64_t guest_clusters_;
  const std::vector<unsigned char> zero_cluster_;  // padding for a partial last cluster

  // One entry per guest cluster, in memory form (see qcow2_writer.cpp). Each write claims its
  // clusters with a compare-exchange, so disjoint writers never touch the same entry.
  std::vector<std::atomic<uint64_t>> l2_;
  std::atomic<uint64_t> next_host_index_;  // next free host cluster for data
  std::atomic<uint64_t> data_bytes_{0};

  // Set at construction, used by every writer.
  int fd_;
  PageCacheWindow window_{fd_};  // data writes go to disk behind a small window
  // finish() thread only.
  bool finished_ = false;
};

}  // namespace fleece::backup
