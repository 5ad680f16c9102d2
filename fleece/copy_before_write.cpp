// SPDX-License-Identifier: MIT
#include "fleece/copy_before_write.hpp"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <thread>

namespace fleeced::fleece {

namespace {

std::error_code errno_code(int e) { return {e, std::generic_category()}; }
std::error_code would_block() { return std::make_error_code(std::errc::operation_would_block); }

bool in_range(uint64_t offset, uint64_t length, uint64_t size) {
  return offset <= size && length <= size - offset;
}

bool all_zero(const std::byte* p, std::size_t n) {
  // Word-at-a-time test of a cluster-sized buffer.
  std::size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    uint64_t w;
    std::memcpy(&w, p + i, 8);
    if (w != 0) return false;
  }
  for (; i < n; ++i) {
    if (p[i] != std::byte{0}) return false;
  }
  return true;
}

// True if some aligned granule-sized block of buf is all zero.
bool has_zero_granule(std::span<const std::byte> buf, uint64_t granule) {
  for (uint64_t off = 0; off < buf.size(); off += granule) {
    if (all_zero(buf.data() + off, std::min<uint64_t>(granule, buf.size() - off))) return true;
  }
  return false;
}

// Point-in-time holes inside copied clusters are remembered at this
// granularity, so base:allocation of the snapshot stays exact.
constexpr uint32_t kHoleGranularity = 4096;

// Automatic cluster size (CbwOptions::cluster_size == 0).
constexpr uint32_t kAutoClusterMin = 4096;
constexpr uint64_t kAutoClusterMaxCount = uint64_t{1} << 27;

// Copies are read and written in chunks of at most this many bytes.
constexpr uint64_t kCopyChunk = 1024 * 1024;

}  // namespace

uint32_t CopyBeforeWrite::auto_cluster_size(uint64_t disk_size) {
  uint32_t cluster = kAutoClusterMin;
  while (disk_size / cluster > kAutoClusterMaxCount && cluster < (1u << 26)) cluster *= 2;
  return cluster;
}

std::shared_ptr<CopyBeforeWrite> CopyBeforeWrite::create(block::DevicePtr source,
                                                         block::DevicePtr target,
                                                         const CbwOptions& options,
                                                         std::error_code& ec) {
  ec = {};
  CbwOptions opts = options;
  if (source && opts.cluster_size == 0) opts.cluster_size = auto_cluster_size(source->size());
  if (!source || !target || target->size() < source->size() || target->capabilities().read_only ||
      opts.cluster_size < 512 || (opts.cluster_size & (opts.cluster_size - 1)) != 0 ||
      (opts.bitmap && opts.bitmap->disk_size() != source->size())) {
    ec = errno_code(EINVAL);
    return nullptr;
  }
  return std::shared_ptr<CopyBeforeWrite>(
      new CopyBeforeWrite(std::move(source), std::move(target), opts));
}

CopyBeforeWrite::CopyBeforeWrite(block::DevicePtr source, block::DevicePtr target,
                                 const CbwOptions& options)
    : source_(std::move(source)),
      target_(std::move(target)),
      size_(source_->size()),
      cluster_(options.cluster_size),
      clusters_((size_ + cluster_ - 1) / cluster_),
      on_error_(options.on_error),
      timeout_(options.timeout),
      access_(size_, cluster_),
      done_(size_, cluster_),
      zero_(size_, cluster_),
      hole_(size_, std::min<uint32_t>(cluster_, kHoleGranularity)) {
  if (options.bitmap) {
    access_.merge_from(*options.bitmap);
  } else {
    access_.set_range(0, size_);
  }
}

CopyBeforeWrite::~CopyBeforeWrite() = default;

CbwStats CopyBeforeWrite::stats() const {
  std::lock_guard lock(mu_);
  return {copied_bytes_, target_bytes_, copy_ops_, static_cast<bool>(broken_) || released_};
}

// ---- range locks ----

bool CopyBeforeWrite::conflicts(uint64_t first, uint64_t last, bool exclusive) const {
  return std::any_of(held_.begin(), held_.end(), [&](const Held& h) {
    return h.first < last && first < h.last && (exclusive || h.exclusive);
  });
}

bool CopyBeforeWrite::lock(uint64_t first, uint64_t last, bool exclusive,
                           std::optional<std::chrono::steady_clock::time_point> deadline) {
  std::unique_lock lk(mu_);
  auto free = [&] { return !conflicts(first, last, exclusive); };
  if (deadline) {
    if (!cv_.wait_until(lk, *deadline, free)) return false;
  } else {
    cv_.wait(lk, free);
  }
  held_.push_back({first, last, exclusive});
  return true;
}

bool CopyBeforeWrite::try_lock(uint64_t first, uint64_t last, bool exclusive) {
  std::lock_guard lk(mu_);
  if (conflicts(first, last, exclusive)) return false;
  held_.push_back({first, last, exclusive});
  return true;
}

void CopyBeforeWrite::unlock(uint64_t first, uint64_t last, bool exclusive) {
  {
    std::lock_guard lk(mu_);
    auto it = std::find_if(held_.begin(), held_.end(), [&](const Held& h) {
      return h.first == first && h.last == last && h.exclusive == exclusive;
    });
    if (it != held_.end()) held_.erase(it);
  }
  cv_.notify_all();
}

// ---- live side ----

bool CopyBeforeWrite::needs_copy(uint64_t offset, uint64_t length) const {
  if (length == 0 || offset >= size_) return false;
  const uint64_t end = std::min(size_, offset + length);
  // Whole clusters: a partial write still copies its cluster first.
  uint64_t pos = offset / cluster_ * cluster_;
  while (pos < end) {
    pos = access_.next_dirty(pos);
    if (pos >= end) return false;
    const uint64_t c = done_.next_clean(pos);
    if (c >= end) return false;
    if (access_.is_dirty(c)) return true;
    pos = c + cluster_;
  }
  return false;
}

void CopyBeforeWrite::break_snapshot(std::error_code ec) {
  std::lock_guard lk(mu_);
  if (!broken_) broken_ = ec;
}

std::error_code CopyBeforeWrite::copy_before(uint64_t offset, uint64_t length) {
  if (!needs_copy(offset, length)) return {};
  {
    std::lock_guard lk(mu_);
    if (broken_ || released_) return {};  // nothing is protected any more
  }
  const uint64_t end = std::min(size_, offset + length);
  const uint64_t first = offset / cluster_;
  const uint64_t last = (end + cluster_ - 1) / cluster_;
  std::optional<std::chrono::steady_clock::time_point> deadline;
  if (timeout_.count() > 0) deadline = std::chrono::steady_clock::now() + timeout_;
  std::error_code ec;
  if (!lock(first, last, true, deadline)) {
    ec = errno_code(ETIMEDOUT);
  } else if (!deadline) {
    ec = copy_locked(first, last);
  } else {
    // Copy on a helper thread so this write waits at most until the
    // deadline; a late copy finishes (and unlocks) in the background.
    struct Shared {
      std::mutex mu;
      std::condition_variable cv;
      bool done = false;
      std::error_code ec;
    };
    auto shared = std::make_shared<Shared>();
    std::thread([self = shared_from_this(), shared, first, last] {
      std::error_code copy_ec = self->copy_locked(first, last);
      std::lock_guard lk(shared->mu);
      shared->ec = copy_ec;
      shared->done = true;
      shared->cv.notify_all();
    }).detach();
    std::unique_lock lk(shared->mu);
    if (shared->cv.wait_until(lk, *deadline, [&] { return shared->done; })) {
      ec = shared->ec;
    } else {
      ec = errno_code(ETIMEDOUT);
    }
  }
  if (!ec) return {};
  if (on_error_ == OnCbwError::break_snapshot) {
    break_snapshot(ec);
    return {};
  }
  // A timed-out copy is a storage failure for the client (NBD EIO), not an
  // invalid request (QEMU would send EINVAL for ETIMEDOUT).
  if (ec == std::errc::timed_out) return errno_code(EIO);
  return ec;
}

std::error_code CopyBeforeWrite::copy_locked(uint64_t first, uint64_t last) {
  bool skip;
  {
    std::lock_guard lk(mu_);
    skip = broken_ || released_;
  }
  std::error_code ec = skip ? std::error_code() : copy_clusters(first, last);
  unlock(first, last, true);
  return ec;
}

std::error_code CopyBeforeWrite::copy_clusters(uint64_t first, uint64_t last) {
  std::vector<std::byte> buf;
  uint64_t c = first;
  while (c < last) {
    // Next run of clusters that are protected and not yet copied.
    uint64_t pos = access_.next_dirty(c * cluster_);
    if (pos >= last * cluster_ || pos >= size_) break;
    pos = done_.next_clean(pos);
    if (pos >= last * cluster_ || pos >= size_) break;
    if (!access_.is_dirty(pos)) {
      c = pos / cluster_ + 1;
      continue;
    }
    const uint64_t run_end =
        std::min({access_.next_clean(pos), done_.next_dirty(pos), last * cluster_, size_});
    // Copy [pos, run_end) in chunks: one source read, target writes for the
    // non-zero clusters (adjacent ones batched), then mark them copied.
    for (uint64_t at = pos; at < run_end;) {
      const uint64_t n = std::min(kCopyChunk, run_end - at);
      buf.resize(n);
      if (std::error_code ec = source_->read(at, buf)) return ec;
      uint64_t data_start = 0;
      bool in_data = false;
      uint64_t written = 0;
      std::vector<std::pair<uint64_t, uint64_t>> zeros;  // (offset, length)
      auto flush_data = [&](uint64_t upto) -> std::error_code {
        if (!in_data) return {};
        in_data = false;
        written += upto - data_start;
        return target_->write(at + data_start,
                              std::span(buf).subspan(data_start, upto - data_start), false);
      };
      for (uint64_t off = 0; off < n; off += cluster_) {
        const uint64_t len = std::min<uint64_t>(cluster_, n - off);
        if (all_zero(buf.data() + off, len)) {
          if (std::error_code ec = flush_data(off)) return ec;
          zeros.emplace_back(at + off, len);
        } else if (!in_data) {
          in_data = true;
          data_start = off;
        }
      }
      if (std::error_code ec = flush_data(n)) return ec;
      // Where the copied range was unallocated at the point in time, so the
      // snapshot's base:allocation stays exact (allocated zeroes are data).
      // A hole reads as zeroes: without an all-zero hole granule in the
      // chunk there is nothing to ask the source about.
      if (has_zero_granule(buf, hole_.granularity()) || !zeros.empty()) {
        if (std::error_code ec = mark_holes(at, n)) return ec;
      }
      for (auto [zoff, zlen] : zeros) zero_.set_range(zoff, zlen);
      done_.set_range(at, n);
      {
        std::lock_guard lk(mu_);
        copied_bytes_ += n;
        target_bytes_ += written;
        ++copy_ops_;
      }
      at += n;
    }
    c = (run_end + cluster_ - 1) / cluster_;
  }
  return {};
}

std::error_code CopyBeforeWrite::mark_holes(uint64_t at, uint64_t n) {
  std::vector<block::Extent> ext;
  for (uint64_t pos = at; pos < at + n;) {
    ext.clear();
    if (std::error_code ec = source_->extents(pos, at + n - pos, ext)) return ec;
    if (ext.empty()) break;
    for (const auto& e : ext) {
      if (e.flags & block::kExtentHole) {
        // Inward to the hole granularity, except at the end of the disk.
        const uint64_t g = hole_.granularity();
        const uint64_t first = (e.offset + g - 1) / g * g;
        const uint64_t end = e.offset + e.length;
        const uint64_t last = end == size_ ? end : end / g * g;
        if (first < last) hole_.set_range(first, last - first);
      }
      pos = e.offset + e.length;
    }
  }
  return {};
}

std::error_code CopyBeforeWrite::read(uint64_t offset, std::span<std::byte> out) {
  return source_->read(offset, out);
}

std::error_code CopyBeforeWrite::try_read(uint64_t offset, std::span<std::byte> out) {
  return source_->try_read(offset, out);
}

std::error_code CopyBeforeWrite::write(uint64_t offset, std::span<const std::byte> data, bool fua) {
  if (!in_range(offset, data.size(), size_)) return source_->write(offset, data, fua);
  if (std::error_code ec = copy_before(offset, data.size())) return ec;
  return source_->write(offset, data, fua);
}

std::error_code CopyBeforeWrite::try_write(uint64_t offset, std::span<const std::byte> data) {
  if (needs_copy(offset, data.size())) return would_block();
  return source_->try_write(offset, data);
}

std::error_code CopyBeforeWrite::write_zeroes(uint64_t offset, uint64_t length,
                                              block::ZeroFlags flags) {
  if (!in_range(offset, length, size_)) return source_->write_zeroes(offset, length, flags);
  if (flags.fast && needs_copy(offset, length)) {
    // A copy is as slow as a write; FAST_ZERO asks us not to.
    return errno_code(ENOTSUP);
  }
  if (std::error_code ec = copy_before(offset, length)) return ec;
  return source_->write_zeroes(offset, length, flags);
}

std::error_code CopyBeforeWrite::discard(uint64_t offset, uint64_t length, bool fua) {
  if (!in_range(offset, length, size_)) return source_->discard(offset, length, fua);
  if (std::error_code ec = copy_before(offset, length)) return ec;
  return source_->discard(offset, length, fua);
}

std::error_code CopyBeforeWrite::flush() {
  // Copies need not be durable (the fleece dies with the process), so only
  // the source is flushed.
  return source_->flush();
}

std::error_code CopyBeforeWrite::cache(uint64_t offset, uint64_t length) {
  return source_->cache(offset, length);
}

std::error_code CopyBeforeWrite::extents(uint64_t offset, uint64_t length,
                                         std::vector<block::Extent>& out) {
  return source_->extents(offset, length, out);
}

// ---- snapshot side ----

std::error_code CopyBeforeWrite::snapshot_state() const {
  std::lock_guard lk(mu_);
  if (broken_ || released_) return errno_code(EIO);
  return {};
}

std::error_code CopyBeforeWrite::read_locked(uint64_t offset, std::span<std::byte> out,
                                             bool try_only) {
  const uint64_t end = offset + out.size();
  uint64_t pos = offset;
  while (pos < end) {
    if (!access_.is_dirty(pos)) return errno_code(EACCES);
    const uint64_t access_end = std::min(access_.next_clean(pos), end);
    uint64_t run_end;
    std::error_code ec;
    std::span<std::byte> dst;
    if (done_.is_dirty(pos)) {
      if (zero_.is_dirty(pos)) {
        run_end = std::min({zero_.next_clean(pos), done_.next_clean(pos), access_end});
        dst = out.subspan(pos - offset, run_end - pos);
        std::fill(dst.begin(), dst.end(), std::byte{0});
      } else {
        run_end = std::min({zero_.next_dirty(pos), done_.next_clean(pos), access_end});
        dst = out.subspan(pos - offset, run_end - pos);
        ec = try_only ? target_->try_read(pos, dst) : target_->read(pos, dst);
      }
    } else {
      run_end = std::min(done_.next_dirty(pos), access_end);
      dst = out.subspan(pos - offset, run_end - pos);
      ec = try_only ? source_->try_read(pos, dst) : source_->read(pos, dst);
    }
    if (ec) return ec;
    pos = run_end;
  }
  return {};
}

std::error_code CopyBeforeWrite::snapshot_read(uint64_t offset, std::span<std::byte> out) {
  if (!in_range(offset, out.size(), size_)) return errno_code(EINVAL);
  if (std::error_code ec = snapshot_state()) return ec;
  if (out.empty()) return {};
  const uint64_t first = offset / cluster_;
  const uint64_t last = (offset + out.size() + cluster_ - 1) / cluster_;
  lock(first, last, false, std::nullopt);
  std::error_code ec = read_locked(offset, out, false);
  unlock(first, last, false);
  // A copy that failed while we read may have broken the snapshot: what we
  // read can only be trusted if it is still intact.
  if (!ec) ec = snapshot_state();
  return ec;
}

std::error_code CopyBeforeWrite::snapshot_try_read(uint64_t offset, std::span<std::byte> out) {
  if (!in_range(offset, out.size(), size_)) return errno_code(EINVAL);
  if (std::error_code ec = snapshot_state()) return ec;
  if (out.empty()) return {};
  const uint64_t first = offset / cluster_;
  const uint64_t last = (offset + out.size() + cluster_ - 1) / cluster_;
  if (!try_lock(first, last, false)) return would_block();
  std::error_code ec = read_locked(offset, out, true);
  unlock(first, last, false);
  if (!ec) ec = snapshot_state();
  return ec;
}

std::error_code CopyBeforeWrite::snapshot_extents(uint64_t offset, uint64_t length,
                                                  std::vector<block::Extent>& out) {
  if (!in_range(offset, length, size_) || length == 0) return errno_code(EINVAL);
  if (std::error_code ec = snapshot_state()) return ec;
  if (!access_.is_dirty(offset)) return errno_code(EACCES);
  const uint64_t end = offset + length;
  const uint64_t first = offset / cluster_;
  const uint64_t last = (end + cluster_ - 1) / cluster_;
  lock(first, last, false, std::nullopt);
  const std::size_t start_count = out.size();
  auto append = [&](uint64_t off, uint64_t len, uint32_t flags) {
    if (out.size() > start_count && out.back().flags == flags &&
        out.back().offset + out.back().length == off) {
      out.back().length += len;
    } else {
      out.push_back({off, len, flags});
    }
  };
  std::error_code ec;
  uint64_t pos = offset;
  std::vector<block::Extent> tmp;
  while (pos < end && access_.is_dirty(pos)) {
    const uint64_t access_end = std::min(access_.next_clean(pos), end);
    if (done_.is_dirty(pos)) {
      uint64_t run_end;
      // Copied: the point-in-time allocation was recorded at copy time.
      const bool hole = hole_.is_dirty(pos);
      run_end = std::min({hole ? hole_.next_clean(pos) : hole_.next_dirty(pos),
                          done_.next_clean(pos), access_end});
      append(pos, run_end - pos, hole ? block::kExtentHole | block::kExtentZero : 0);
      pos = run_end;
      continue;
    }
    const uint64_t run_end = std::min(done_.next_dirty(pos), access_end);
    tmp.clear();
    ec = source_->extents(pos, run_end - pos, tmp);
    if (ec) break;
    uint64_t covered = pos;
    for (const auto& e : tmp) {
      if (e.offset != covered || e.length == 0) break;
      const uint64_t len = std::min(e.length, run_end - covered);
      append(covered, len, e.flags);
      covered += len;
      if (covered >= run_end) break;
    }
    if (covered < run_end) break;  // the source stopped early; the caller asks again
    pos = run_end;
  }
  unlock(first, last, false);
  if (!ec && out.size() == start_count) ec = errno_code(EIO);
  if (!ec) ec = snapshot_state();
  return ec;
}

void CopyBeforeWrite::release() {
  {
    std::unique_lock lk(mu_);
    if (released_) return;
    released_ = true;
    // Wait for copies in flight, then nothing new starts.
    cv_.wait(lk, [&] {
      return std::none_of(held_.begin(), held_.end(), [](const Held& h) { return h.exclusive; });
    });
  }
  // Give the scratch space back (best effort: the fleece is over either way).
  if (target_bytes_ > 0) {
    (void)target_->write_zeroes(0, size_, {.may_trim = true, .fast = false, .fua = false});
  }
}

// ---- SnapshotAccess ----

block::Capabilities SnapshotAccess::capabilities() const {
  block::Capabilities c;
  c.read_only = true;
  c.can_flush = true;
  c.can_fua = true;
  c.can_extents = true;
  c.can_cache = true;
  c.can_multi_conn = true;
  return c;
}

std::error_code SnapshotAccess::read(uint64_t offset, std::span<std::byte> out) {
  return cbw_->snapshot_read(offset, out);
}

std::error_code SnapshotAccess::try_read(uint64_t offset, std::span<std::byte> out) {
  return cbw_->snapshot_try_read(offset, out);
}

std::error_code SnapshotAccess::write(uint64_t, std::span<const std::byte>, bool) {
  return errno_code(EPERM);
}

std::error_code SnapshotAccess::write_zeroes(uint64_t, uint64_t, block::ZeroFlags) {
  return errno_code(EPERM);
}

std::error_code SnapshotAccess::discard(uint64_t, uint64_t, bool) { return errno_code(EPERM); }

std::error_code SnapshotAccess::extents(uint64_t offset, uint64_t length,
                                        std::vector<block::Extent>& out) {
  return cbw_->snapshot_extents(offset, length, out);
}

}  // namespace fleeced::fleece
