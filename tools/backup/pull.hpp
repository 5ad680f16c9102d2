// SPDX-License-Identifier: MIT
// The pull engine of fleece-backup: maps an NBD export (base:allocation,
// optionally a qemu:dirty-bitmap context), then copies what the map selects
// into a Target over several connections with many requests in flight,
// computing per-chunk digests on the way. It knows nothing of QMP or of
// backup directories.
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace fleece::backup {

class Progress;

// Where pulled bytes go. write() and write_zeroes() are called from several
// threads at once, for disjoint ranges.
class Target {
 public:
  virtual ~Target() = default;
  virtual void write(uint64_t offset, const void* data, size_t length) = 0;
  virtual void write_zeroes(uint64_t offset, uint64_t length) = 0;
};

// A 128-bit chunk digest (XXH3-128), stored big-endian (high half first).
using Digest = std::array<unsigned char, 16>;
Digest digest_of(const void* data, size_t length);
Digest zero_digest(size_t length);
// The digest of a whole disk: XXH3-128 over the chunk digests, in hex.
std::string disk_digest(const std::vector<Digest>& chunks);

// How to reach the source.
struct Source {
  std::string uri;                // nbd_connect_uri (nbd://, nbds+unix://, ...)
  std::vector<std::string> argv;  // or: a server started per connection with
                                  // systemd socket activation (qemu-nbd -r IMAGE)
  std::string description() const;
};

unsigned default_connections();

struct PullOptions {
  // Empty: a full pull (every byte that is not known zero). Otherwise only
  // the extents dirty in this meta context (e.g. "qemu:dirty-bitmap:b0").
  std::string bitmap_context;
  // Used only when the export offers multi-conn. Default: 4, but no more
  // than the CPUs (every connection is a thread that copies into one file;
  // more threads than CPUs only wait on each other).
  unsigned connections = default_connections();
  unsigned requests = 16;  // in flight per connection
  uint32_t request_size = 1u << 20;
  // > 0: chunk-aligned pulls and per-chunk digests (digests[] must then
  // hold size/chunk entries rounded up; chunks the pull writes are updated).
  uint64_t chunk_size = 0;
  // Write zeroes for areas that read as zero in the source (full pulls into
  // a target that may hold old data; dirty zero areas are always written).
  bool write_zeroes_in_full = false;
  // Refuse unless the export size equals this (0: any size).
  uint64_t expect_size = 0;
};

struct PullResult {
  uint64_t size = 0;
  uint64_t bytes_pulled = 0;  // data read from the source and written
  uint64_t bytes_zeroed = 0;  // written as zeroes (not read)
  uint64_t dirty_bytes = 0;   // bitmap pulls: sum of the dirty extents
  uint64_t mapped_data = 0;   // bytes the map found to be data (before alignment)
  unsigned connections = 0;
};

// Opens one connection to learn the size (and whether a context is offered).
struct ExportInfo {
  uint64_t size = 0;
  bool multi_conn = false;
  bool has_context = false;
};

class Puller {
 public:
  Puller(Source source, PullOptions options);
  ~Puller();
  Puller(const Puller&) = delete;
  Puller& operator=(const Puller&) = delete;

  // Connects the first connection; throws std::runtime_error with the client's message.
  ExportInfo open();
  // Maps and copies. cancel is polled; when it becomes true the pull stops
  // and throws Cancelled. digests may be null when chunk_size == 0.
  PullResult run(Target& target, std::vector<Digest>* digests, Progress* progress,
                 const std::atomic<bool>* cancel);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

class Cancelled : public std::runtime_error {
 public:
  Cancelled() : std::runtime_error("interrupted") {}
};

namespace detail {
struct Range {
  uint64_t offset;
  uint64_t length;
  bool data;  // false: reads as zero
  uint64_t end() const { return offset + length; }
  bool operator==(const Range&) const = default;
};
// Chunk mode: data and zero ranges grow to whole chunks (the last one ends at
// size); a chunk with any data in it is data. Input and output sorted, disjoint.
std::vector<Range> align_to_chunks(const std::vector<Range>& in, uint64_t chunk, uint64_t size);
// XXH3-128 built for AVX2 (xxh3_avx2.cpp); call only when the CPU has it.
void xxh3_128_avx2(const void* data, size_t length, uint64_t* high, uint64_t* low);
}  // namespace detail

// Inserts an export name into an NBD URI that has none (or replaces its
// name): nbd+unix:///?socket=S + "fleece" -> nbd+unix:///fleece?socket=S.
std::string uri_with_export(const std::string& uri, const std::string& name);

}  // namespace fleece::backup
