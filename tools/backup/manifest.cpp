// SPDX-License-Identifier: MIT
#include "backup/manifest.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <ctime>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <system_error>

#include <boost/json.hpp>

namespace fleece::backup {

namespace json = boost::json;

namespace {

constexpr const char* kFormat = "fleece-backup/1";

std::string join(const std::string& dir, const std::string& name) { return dir + "/" + name; }

[[noreturn]] void io_error(const std::string& what, const std::string& path) {
  throw std::system_error(errno, std::generic_category(), what + " " + path);
}

void write_all(int fd, const char* p, size_t n, const std::string& path) {
  while (n) {
    const ssize_t w = ::write(fd, p, n);
    if (w < 0 && errno == EINTR) continue;
    if (w < 0) io_error("write", path);
    p += w;
    n -= static_cast<size_t>(w);
  }
}

const json::value& member(const json::object& o, const char* key, const std::string& where) {
  const json::value* v = o.if_contains(key);
  if (!v) throw std::runtime_error(where + ": missing \"" + key + "\"");
  return *v;
}
std::string str(const json::object& o, const char* key, const std::string& where) {
  const json::value& v = member(o, key, where);
  if (!v.is_string()) throw std::runtime_error(where + ": \"" + key + "\" is not a string");
  return std::string(v.as_string());
}
uint64_t num(const json::object& o, const char* key, const std::string& where) {
  const json::value& v = member(o, key, where);
  if (v.is_uint64()) return v.as_uint64();
  if (v.is_int64() && v.as_int64() >= 0) return static_cast<uint64_t>(v.as_int64());
  throw std::runtime_error(where + ": \"" + key + "\" is not a non-negative integer");
}
double real(const json::object& o, const char* key, const std::string& where) {
  const json::value& v = member(o, key, where);
  if (v.is_double()) return v.as_double();
  if (v.is_int64()) return static_cast<double>(v.as_int64());
  if (v.is_uint64()) return static_cast<double>(v.as_uint64());
  throw std::runtime_error(where + ": \"" + key + "\" is not a number");
}

}  // namespace

std::string iso_time_now() {
  timespec ts{};
  clock_gettime(CLOCK_REALTIME, &ts);
  tm t{};
  gmtime_r(&ts.tv_sec, &t);
  char buf[96];
  std::snprintf(buf, sizeof buf, "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ", t.tm_year + 1900,
                t.tm_mon + 1, t.tm_mday, t.tm_hour, t.tm_min, t.tm_sec, ts.tv_nsec / 1000000);
  return buf;
}

void write_file_atomic(const std::string& path, const std::string& bytes) {
  const std::string tmp = path + ".tmp";
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) io_error("cannot create", tmp);
  try {
    write_all(fd, bytes.data(), bytes.size(), tmp);
    if (::fsync(fd) != 0) io_error("fsync", tmp);
  } catch (...) {
    ::close(fd);
    ::unlink(tmp.c_str());
    throw;
  }
  ::close(fd);
  if (::rename(tmp.c_str(), path.c_str()) != 0) io_error("rename to", path);
  const std::size_t slash = path.rfind('/');
  const std::string dir = slash == std::string::npos ? "." : path.substr(0, slash);
  const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
}

bool manifest_exists(const std::string& dir) {
  struct stat st {};
  return ::stat(join(dir, "manifest.json").c_str(), &st) == 0;
}

std::string Manifest::to_json() const {
  json::array list;
  for (const BackupEntry& b : backups) {
    json::object o{{"index", b.index},
                   {"kind", b.kind},
                   {"file", b.file},
                   {"sums", b.sums},
                   {"checkpoint", b.checkpoint},
                   {"started", b.started},
                   {"cut", b.cut},
                   {"finished", b.finished},
                   {"seconds", b.seconds},
                   {"pull_seconds", b.pull_seconds},
                   {"bytes_pulled", b.bytes_pulled},
                   {"bytes_zeroed", b.bytes_zeroed},
                   {"file_size", b.file_size},
                   {"digest", b.digest}};
    if (b.kind == "incremental") {
      o["bitmap"] = b.bitmap;
      o["dirty_bytes"] = b.dirty_bytes;
    }
    list.push_back(std::move(o));
  }
  json::object m{{"format", kFormat},
                 {"node", node},
                 {"virtual_size", size},
                 {"chunk_size", chunk_size},
                 {"granularity", granularity},
                 {"checksum", "xxh3-128 per chunk; digest = xxh3-128 of the chunk digests"},
                 {"chain", chain},
                 {"active_bitmap", active_bitmap},
                 {"next_serial", next_serial},
                 {"backups", std::move(list)}};
  std::ostringstream out;
  out << json::serialize(m) << '\n';
  return out.str();
}

Manifest Manifest::load(const std::string& dir) {
  const std::string path = join(dir, "manifest.json");
  std::ifstream in(path);
  if (!in) throw std::runtime_error("cannot read " + path + ": " + std::strerror(errno));
  std::stringstream text;
  text << in.rdbuf();
  json::error_code ec;
  json::value v = json::parse(text.str(), ec);
  if (ec || !v.is_object()) throw std::runtime_error(path + " is not a JSON object");
  const json::object& o = v.as_object();
  if (str(o, "format", path) != kFormat) {
    throw std::runtime_error(path + ": unknown format (expected " + std::string(kFormat) + ")");
  }
  Manifest m;
  m.node = str(o, "node", path);
  m.size = num(o, "virtual_size", path);
  m.chunk_size = num(o, "chunk_size", path);
  m.granularity = num(o, "granularity", path);
  m.chain = str(o, "chain", path);
  m.active_bitmap = str(o, "active_bitmap", path);
  m.next_serial = static_cast<unsigned>(num(o, "next_serial", path));
  if (m.size == 0 || m.chunk_size == 0 || (m.chunk_size & (m.chunk_size - 1))) {
    throw std::runtime_error(path + ": bad virtual_size or chunk_size");
  }
  const json::value& list = member(o, "backups", path);
  if (!list.is_array()) throw std::runtime_error(path + ": \"backups\" is not a list");
  for (const json::value& e : list.as_array()) {
    if (!e.is_object()) throw std::runtime_error(path + ": a backup entry is not an object");
    const json::object& b = e.as_object();
    const std::string where = path + " backup " + std::to_string(m.backups.size());
    BackupEntry x;
    x.index = static_cast<unsigned>(num(b, "index", where));
    x.kind = str(b, "kind", where);
    x.file = str(b, "file", where);
    x.sums = str(b, "sums", where);
    x.checkpoint = str(b, "checkpoint", where);
    x.started = str(b, "started", where);
    x.cut = str(b, "cut", where);
    x.finished = str(b, "finished", where);
    x.seconds = real(b, "seconds", where);
    x.pull_seconds = real(b, "pull_seconds", where);
    x.bytes_pulled = num(b, "bytes_pulled", where);
    x.bytes_zeroed = num(b, "bytes_zeroed", where);
    x.file_size = num(b, "file_size", where);
    x.digest = str(b, "digest", where);
    if (x.kind == "incremental") {
      x.bitmap = str(b, "bitmap", where);
      x.dirty_bytes = num(b, "dirty_bytes", where);
    } else if (x.kind != "full") {
      throw std::runtime_error(where + ": unknown kind \"" + x.kind + "\"");
    }
    if (x.index != m.backups.size()) throw std::runtime_error(where + ": index out of order");
    if (x.file.find('/') != std::string::npos || x.sums.find('/') != std::string::npos) {
      throw std::runtime_error(where + ": file names must be plain names in the directory");
    }
    m.backups.push_back(std::move(x));
  }
  if (m.backups.empty() || m.backups[0].kind != "full") {
    throw std::runtime_error(path + ": the chain does not start with a full backup");
  }
  return m;
}

void Manifest::save(const std::string& dir) const {
  write_file_atomic(join(dir, "manifest.json"), to_json());
}

std::vector<Digest> load_sums(const std::string& path, uint64_t entries) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read " + path + ": " + std::strerror(errno));
  std::vector<Digest> sums(entries);
  in.read(reinterpret_cast<char*>(sums.data()),
          static_cast<std::streamsize>(entries * sizeof(Digest)));
  if (static_cast<uint64_t>(in.gcount()) != entries * sizeof(Digest) || in.peek() != EOF) {
    throw std::runtime_error(path + " does not hold " + std::to_string(entries) + " chunk digests");
  }
  return sums;
}

void save_sums(const std::string& path, const std::vector<Digest>& sums) {
  write_file_atomic(
      path, std::string(reinterpret_cast<const char*>(sums.data()), sums.size() * sizeof(Digest)));
}

}  // namespace fleece::backup
