// SPDX-License-Identifier: MIT
// The backup directory: manifest.json (the chain, checkpoints, sizes,
// digests) and one digest table per backup (NNNN.sums: 16 bytes per chunk).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "backup/pull.hpp"

namespace fleece::backup {

struct BackupEntry {
  unsigned index = 0;
  std::string kind;                    // "full" | "incremental"
  std::string file;                    // qcow2 image, relative to the directory
  std::string sums;                    // digest table, relative to the directory
  std::string checkpoint;              // bitmap created at this backup's cut
  std::string bitmap;                  // incremental: the frozen bitmap that was pulled
  std::string started, cut, finished;  // ISO 8601 UTC
  double seconds = 0;                  // the whole run, fleece set-up and teardown included
  double pull_seconds = 0;             // mapping and copying only
  uint64_t bytes_pulled = 0, bytes_zeroed = 0, dirty_bytes = 0, file_size = 0;
  std::string digest;  // disk digest at the cut (xxh3-128 over the chunk digests)
};

struct Manifest {
  std::string node;
  uint64_t size = 0;
  uint64_t chunk_size = 0;
  uint64_t granularity = 0;
  std::string chain;          // random id in bitmap names
  std::string active_bitmap;  // records the changes since the last good cut
  unsigned next_serial = 0;   // for bitmap names
  std::vector<BackupEntry> backups;

  static Manifest load(const std::string& dir);  // throws with a clear message
  void save(const std::string& dir) const;       // atomic (rename) and durable
  std::string to_json() const;
};

bool manifest_exists(const std::string& dir);
std::vector<Digest> load_sums(const std::string& path, uint64_t entries);
void save_sums(const std::string& path, const std::vector<Digest>& sums);
std::string iso_time_now();
// Writes a file durably (tmp + fsync + rename + fsync dir).
void write_file_atomic(const std::string& path, const std::string& bytes);

}  // namespace fleece::backup
