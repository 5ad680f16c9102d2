// SPDX-License-Identifier: MIT
#include "backup/targets.hpp"

#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <system_error>
#include <vector>

#include "backup/qcow2_writer.hpp"

namespace fleece::backup {

namespace {
[[noreturn]] void fail(const std::string& what, const std::string& path) {
  throw std::system_error(errno, std::generic_category(), what + " " + path);
}
}  // namespace

uint64_t RawTarget::size_of(const std::string& path, bool* exists) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) {
    if (errno != ENOENT) fail("cannot stat", path);
    *exists = false;
    return 0;
  }
  *exists = true;
  if (S_ISBLK(st.st_mode)) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) fail("cannot open", path);
    uint64_t size = 0;
    const int rc = ::ioctl(fd, BLKGETSIZE64, &size);
    ::close(fd);
    if (rc != 0) fail("cannot get the size of", path);
    return size;
  }
  if (!S_ISREG(st.st_mode)) {
    errno = EINVAL;
    fail("not a regular file or block device:", path);
  }
  return static_cast<uint64_t>(st.st_size);
}

RawTarget::RawTarget(const std::string& path, uint64_t size, bool create, bool fresh)
    : path_(path) {
  fd_ = ::open(path.c_str(), O_WRONLY | O_CLOEXEC | (create ? O_CREAT : 0), 0644);
  if (fd_ < 0) fail("cannot open", path);
  struct stat st {};
  if (::fstat(fd_, &st) != 0) fail("cannot stat", path);
  block_device_ = S_ISBLK(st.st_mode);
  window_ = PageCacheWindow(fd_);
  if (!block_device_) {
    if (fresh && ::ftruncate(fd_, 0) != 0) fail("cannot truncate", path);
    if (::ftruncate(fd_, static_cast<off_t>(size)) != 0) fail("cannot resize", path);
  }
}

RawTarget::~RawTarget() {
  if (fd_ >= 0) ::close(fd_);
}

void RawTarget::write(uint64_t offset, const void* data, size_t length) {
  const uint64_t start = offset;
  const size_t total = length;
  const char* p = static_cast<const char*>(data);
  while (length) {
    const ssize_t n = ::pwrite(fd_, p, length, static_cast<off_t>(offset));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) fail("write at " + std::to_string(offset) + " to", path_);
    p += n;
    offset += static_cast<uint64_t>(n);
    length -= static_cast<size_t>(n);
  }
  window_.written(start, total);
}

void RawTarget::write_zeroes(uint64_t offset, uint64_t length) {
  if (block_device_) {
    uint64_t range[2] = {offset, length};
    if (::ioctl(fd_, BLKZEROOUT, range) == 0) return;
  } else {
    if (::fallocate(fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(offset),
                    static_cast<off_t>(length)) == 0) {
      return;
    }
    if (::fallocate(fd_, FALLOC_FL_ZERO_RANGE, static_cast<off_t>(offset),
                    static_cast<off_t>(length)) == 0) {
      return;
    }
  }
  static const std::vector<char> zeros(1 << 20, 0);
  while (length) {
    const size_t n = static_cast<size_t>(std::min<uint64_t>(length, zeros.size()));
    write(offset, zeros.data(), n);
    offset += n;
    length -= n;
  }
}

void RawTarget::sync() {
  if (::fsync(fd_) != 0) fail("fsync", path_);
}

void Qcow2Target::write(uint64_t offset, const void* data, size_t length) {
  w_.write(offset, data, length);
}

void Qcow2Target::write_zeroes(uint64_t offset, uint64_t length) {
  w_.write_zeroes(offset, length);
}

}  // namespace fleece::backup
