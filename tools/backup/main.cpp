// SPDX-License-Identifier: MIT
// fleece-backup: full and incremental backups of a fleeced disk into a qcow2
// chain (flow B of the control API: bitmap rotation and fleece in one
// transaction), restore, verify, list, and a plain pull from any NBD export.
#include <fcntl.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <map>
#include <optional>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include <boost/json.hpp>

#include "backup/fleece_session.hpp"
#include "backup/manifest.hpp"
#include "backup/progress.hpp"
#include "backup/pull.hpp"
#include "backup/qcow2_writer.hpp"
#include "backup/targets.hpp"
#include "common/qmp_client.hpp"

namespace {

using namespace fleece::backup;
using fleece::tools::QmpClient;
namespace json = boost::json;

constexpr int kExitOk = 0;
constexpr int kExitError = 1;
constexpr int kExitUsage = 2;
constexpr int kExitMismatch = 3;
constexpr int kExitInterrupted = 130;

constexpr const char* kUsage = R"(Usage:
  fleece-backup full        DIR --node NODE --nbd URI [--qmp PATH] [OPTIONS]
  fleece-backup incremental DIR [--qmp PATH] [--nbd URI] [OPTIONS]
  fleece-backup restore     DIR [--at N] --to IMAGE [--force]
  fleece-backup verify      DIR
  fleece-backup list        DIR [--json]
  fleece-backup pull        --from NBD-URI [--bitmap NAME] --into IMAGE

full / incremental drive fleeced over its control socket (--qmp, or
$FLEECED_QMP): rotate the checkpoint bitmap and start a fleece in one
transaction, export it, pull it over NBD (--nbd: the server's URI without an
export name, e.g. nbd+unix:///?socket=/run/fleeced/nbd.sock, or $FLEECED_NBD;
nbds:// URIs with tls-psk-file=... or tls-certificates=... work too), and
tear the fleece down. A failed or interrupted incremental merges its frozen
bitmap back, so the next one loses nothing. DIR holds the qcow2 chain
(NNNN.full.qcow2 <- NNNN.inc.qcow2 ...), digest tables and manifest.json.

Options:
  --node NODE           the raw node to back up (full; incremental reads it from DIR)
  --granularity BYTES   bitmap granularity (default: the chunk size, 64 KiB for disks up to 64 GiB)
  --no-persistent       create the checkpoint bitmap without "persistent": true
  --scratch DIR         where the fleece's scratch file goes (default: DIR)
  --exec-at-cut CMD     run `sh -c CMD` while the fleece is exported, before the pull
                        ($FLEECE_URI, $FLEECE_INDEX, and for incrementals $FLEECE_BITMAP and
                        $FLEECE_BITMAP_COUNT set); a failure fails the backup. The control
                        socket is busy meanwhile (it serves one client).
  --connections N       NBD connections when the export allows multi-conn
                        (default 4, or the number of CPUs if fewer)
  --requests N          requests in flight per connection (default 16)
  --request-size BYTES  bytes per read (default 1M; at least the chunk size for full/incremental)
  --progress MODE       bar (default on a terminal), json (lines on stdout), none
  -q, --quiet           no progress and no report
  --json                print the report as one JSON object
  --timeout SECONDS     control-socket timeout (default 60)
  -h, --help, --version

Exit status: 0 done, 1 failed, 2 usage error, 3 verification or restore
mismatch, 130 interrupted (the fleece is torn down and the bitmap reclaimed).
)";

class UsageError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

std::atomic<bool> g_interrupted{false};

void on_signal(int) { g_interrupted = true; }

struct Args {
  std::string command;
  std::vector<std::string> positional;
  std::map<std::string, std::string> values;
  std::map<std::string, bool> flags;

  bool flag(const std::string& k) const { return flags.count(k) != 0; }
  std::optional<std::string> value(const std::string& k) const {
    auto it = values.find(k);
    if (it == values.end()) return std::nullopt;
    return it->second;
  }
  std::string required(const std::string& k, const char* env = nullptr) const {
    if (auto v = value(k)) return *v;
    if (env) {
      if (const char* e = std::getenv(env); e && *e) return e;
    }
    throw UsageError("--" + k + " is required" + (env ? std::string(" (or $") + env + ")" : ""));
  }
};

uint64_t parse_size(const std::string& option, const std::string& text) {
  if (text.empty() || !std::isdigit(static_cast<unsigned char>(text[0]))) {
    throw UsageError("--" + option + " expects a number, got '" + text + "'");
  }
  std::size_t used = 0;
  unsigned long long v = 0;
  try {
    v = std::stoull(text, &used, 10);
  } catch (const std::exception&) {
    throw UsageError("--" + option + ": '" + text + "' is out of range");
  }
  std::string suffix = text.substr(used);
  uint64_t mult = 1;
  if (suffix == "k" || suffix == "K" || suffix == "KiB")
    mult = 1ull << 10;
  else if (suffix == "M" || suffix == "MiB")
    mult = 1ull << 20;
  else if (suffix == "G" || suffix == "GiB")
    mult = 1ull << 30;
  else if (!suffix.empty())
    throw UsageError("--" + option + ": bad suffix in '" + text + "'");
  if (v > UINT64_MAX / mult) throw UsageError("--" + option + ": '" + text + "' is out of range");
  return v * mult;
}

const std::map<std::string, bool> kOptions = {
    // name -> takes a value
    {"qmp", true},          {"node", true},           {"nbd", true},
    {"granularity", true},  {"no-persistent", false}, {"scratch", true},
    {"exec-at-cut", true},  {"connections", true},    {"requests", true},
    {"request-size", true}, {"progress", true},       {"quiet", false},
    {"json", false},        {"timeout", true},        {"at", true},
    {"to", true},           {"force", false},         {"from", true},
    {"bitmap", true},       {"into", true},
};

Args parse_args(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    std::string w = argv[i];
    if (w == "-h" || w == "--help") {
      std::cout << kUsage;
      std::exit(kExitOk);
    }
    if (w == "--version") {
      std::cout << "fleece-backup " << FLEECED_VERSION << '\n';
      std::exit(kExitOk);
    }
    if (w == "-q") w = "--quiet";
    if (w.rfind("--", 0) == 0) {
      std::string name = w.substr(2), value;
      const std::size_t eq = name.find('=');
      bool has_value = eq != std::string::npos;
      if (has_value) {
        value = name.substr(eq + 1);
        name = name.substr(0, eq);
      }
      auto it = kOptions.find(name);
      if (it == kOptions.end()) throw UsageError("unknown option --" + name);
      if (it->second) {
        if (!has_value) {
          if (i + 1 >= argc) throw UsageError("--" + name + " needs a value");
          value = argv[++i];
        }
        a.values[name] = value;
      } else {
        if (has_value) throw UsageError("--" + name + " takes no value");
        a.flags[name] = true;
      }
      continue;
    }
    if (w.size() > 1 && w[0] == '-') throw UsageError("unknown option " + w);
    if (a.command.empty()) {
      a.command = w;
    } else {
      a.positional.push_back(w);
    }
  }
  if (a.command.empty()) throw UsageError("no command given (try --help)");
  return a;
}

struct Common {
  ProgressMode progress = ProgressMode::none;
  bool quiet = false;
  bool json = false;
  PullOptions pull;
  int timeout = 60;
};

Common common_options(const Args& a) {
  Common c;
  c.quiet = a.flag("quiet");
  c.json = a.flag("json");
  c.progress = ::isatty(2) && !c.quiet ? ProgressMode::bar : ProgressMode::none;
  if (auto p = a.value("progress")) {
    if (*p == "bar")
      c.progress = ProgressMode::bar;
    else if (*p == "json")
      c.progress = ProgressMode::json;
    else if (*p == "none")
      c.progress = ProgressMode::none;
    else
      throw UsageError("--progress must be bar, json or none");
  }
  if (c.quiet) c.progress = ProgressMode::none;
  if (auto v = a.value("connections")) {
    const uint64_t n = parse_size("connections", *v);
    if (n < 1 || n > 64) throw UsageError("--connections must be 1..64");
    c.pull.connections = static_cast<unsigned>(n);
  }
  if (auto v = a.value("requests")) {
    const uint64_t n = parse_size("requests", *v);
    if (n < 1 || n > 1024) throw UsageError("--requests must be 1..1024");
    c.pull.requests = static_cast<unsigned>(n);
  }
  if (auto v = a.value("request-size")) {
    const uint64_t n = parse_size("request-size", *v);
    if (n < 4096 || n > (32u << 20) || (n & (n - 1))) {
      throw UsageError("--request-size must be a power of two from 4 KiB to 32 MiB");
    }
    c.pull.request_size = static_cast<uint32_t>(n);
  }
  if (auto v = a.value("timeout")) c.timeout = static_cast<int>(parse_size("timeout", *v));
  return c;
}

void expect_positional(const Args& a, std::size_t n, const char* synopsis) {
  if (a.positional.size() != n) throw UsageError(std::string("usage: fleece-backup ") + synopsis);
}

// One backup run at a time per directory.
class DirLock {
 public:
  explicit DirLock(const std::string& dir) {
    const std::string path = dir + "/.lock";
    fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd_ < 0) throw std::runtime_error("cannot create " + path + ": " + std::strerror(errno));
    if (::flock(fd_, LOCK_EX | LOCK_NB) != 0) {
      throw std::runtime_error(dir + " is in use by another fleece-backup");
    }
  }
  ~DirLock() { ::close(fd_); }

 private:
  int fd_ = -1;
};

std::string index_name(unsigned i, const char* suffix) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%04u.%s", i, suffix);
  return buf;
}

std::string random_id() {
  std::random_device rd;
  char buf[16];
  std::snprintf(buf, sizeof buf, "%08x", static_cast<unsigned>(rd()));
  return buf;
}

uint64_t default_chunk(uint64_t size) {
  uint64_t chunk = 64 * 1024;
  while (chunk < (2u << 20) && size / chunk > (1u << 20)) chunk *= 2;
  return chunk;
}

int run_hook(const std::string& cmd, const std::string& uri, unsigned index,
             const std::string& bitmap, uint64_t bitmap_count) {
  const pid_t pid = ::fork();
  if (pid < 0) throw std::runtime_error(std::string("fork: ") + std::strerror(errno));
  if (pid == 0) {
    ::setenv("FLEECE_URI", uri.c_str(), 1);
    ::setenv("FLEECE_INDEX", std::to_string(index).c_str(), 1);
    if (!bitmap.empty()) {
      ::setenv("FLEECE_BITMAP", bitmap.c_str(), 1);
      ::setenv("FLEECE_BITMAP_COUNT", std::to_string(bitmap_count).c_str(), 1);
    }
    ::execl("/bin/sh", "sh", "-c", cmd.c_str(), static_cast<char*>(nullptr));
    ::_exit(127);
  }
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0) {
    if (errno != EINTR) throw std::runtime_error(std::string("waitpid: ") + std::strerror(errno));
  }
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

void report(const Common& c, const json::object& o, const std::string& text) {
  if (c.quiet) return;
  if (c.json) {
    std::cout << json::serialize(o) << '\n';
  } else {
    std::cout << text;
  }
}

std::string fmt_seconds(double s) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.2f s", s);
  return buf;
}

// ---- full and incremental

// DIR/.pending names the bitmap a run is about to create, until the run ends
// (a full backup killed after its transaction would otherwise leak it).
void write_pending(const std::string& dir, const std::string& bitmap) {
  write_file_atomic(dir + "/.pending", bitmap + "\n");
}

std::optional<std::string> read_pending(const std::string& dir) {
  std::FILE* f = std::fopen((dir + "/.pending").c_str(), "r");
  if (!f) return std::nullopt;
  char buf[256] = "";
  const bool ok = std::fgets(buf, sizeof buf, f) != nullptr;
  std::fclose(f);
  std::string name = ok ? buf : "";
  while (!name.empty() && (name.back() == '\n' || name.back() == '\r')) name.pop_back();
  if (name.rfind("fleece-backup.", 0) != 0) return std::nullopt;
  return name;
}

void clear_pending(const std::string& dir) { ::unlink((dir + "/.pending").c_str()); }

int cmd_backup(const Args& a, bool incremental) {
  expect_positional(a, 1,
                    incremental ? "incremental DIR [OPTIONS]" : "full DIR --node NODE [OPTIONS]");
  const Common c = common_options(a);
  const std::string dir = a.positional[0];
  const std::string qmp_path = a.required("qmp", "FLEECED_QMP");
  const std::string nbd_uri = a.required("nbd", "FLEECED_NBD");
  Manifest m;
  std::unique_ptr<DirLock> lock;
  if (incremental) {
    lock = std::make_unique<DirLock>(dir);
    if (!manifest_exists(dir)) {
      throw std::runtime_error(dir + " holds no backup chain; take a full backup first");
    }
    m = Manifest::load(dir);
    if (auto node = a.value("node"); node && *node != m.node) {
      throw UsageError(dir + " backs up node '" + m.node + "', not '" + *node + "'");
    }
  } else {
    m.node = a.required("node");
    if (manifest_exists(dir)) {
      throw std::runtime_error(dir +
                               " already holds a backup chain; take an incremental, or a "
                               "full backup into a new directory");
    }
  }

  QmpClient qmp(qmp_path, c.timeout, false);
  if (auto refused = qmp.negotiate()) {
    throw std::runtime_error("the control socket refused qmp_capabilities: " +
                             json::serialize(*refused));
  }
  FleeceSession session(qmp, m.node, a.value("scratch").value_or(dir));
  const NodeState node = session.inspect();
  if (incremental) {
    if (node.size != m.size) {
      throw std::runtime_error("node '" + m.node + "' is " + std::to_string(node.size) +
                               " bytes but the chain in " + dir + " is " + std::to_string(m.size) +
                               "; take a full backup into a new directory");
    }
  } else {
    m.size = node.size;
    m.chunk_size = default_chunk(m.size);
    m.granularity = m.chunk_size;
    if (auto g = a.value("granularity")) {
      m.granularity = parse_size("granularity", *g);
      if (m.granularity < m.chunk_size || (m.granularity & (m.granularity - 1)) ||
          m.granularity > (1ull << 31)) {
        throw UsageError("--granularity must be a power of two from " +
                         std::to_string(m.chunk_size) + " to 2 GiB");
      }
    }
    m.chain = random_id();
    // The node is there: now the directory.
    if (::mkdir(dir.c_str(), 0755) != 0 && errno != EEXIST) {
      throw std::runtime_error("cannot create " + dir + ": " + std::strerror(errno));
    }
    lock = std::make_unique<DirLock>(dir);
    if (manifest_exists(dir)) throw std::runtime_error(dir + " already holds a backup chain");
  }
  session.clean_leftovers();
  // A full backup killed in an earlier run left its bitmap behind.
  if (auto stale = read_pending(dir); !incremental && stale) {
    if (node.find(*stale)) {
      session.remove_bitmap(*stale);
      std::cerr << "fleece-backup: removed bitmap " << *stale
                << " of a full backup that did not finish\n";
    }
  }
  if (incremental) {
    // A run killed before it could reclaim leaves the active bitmap frozen.
    if (auto merged = session.reclaim_stale(m.active_bitmap, "fleece-backup." + m.chain + ".")) {
      m.active_bitmap = *merged;
      m.save(dir);
    }
    session.require_active(m.active_bitmap, m.chunk_size);
    const std::string prefix = "fleece-backup." + m.chain + ".";
    for (const BitmapState& b : session.inspect().bitmaps) {
      if (b.name.rfind(prefix, 0) != 0 || b.name == m.active_bitmap) continue;
      // Names stay unique even if a killed run could not count its bitmap.
      const unsigned long serial = std::strtoul(b.name.c_str() + prefix.size(), nullptr, 10);
      if (serial >= m.next_serial) m.next_serial = static_cast<unsigned>(serial + 1);
      if (!b.recording) {
        // Frozen by a run that saved its backup but was killed before removing it.
        session.remove_bitmap(b.name);
        std::cerr << "fleece-backup: removed bitmap " << b.name << ", already covered by backup "
                  << m.backups.size() - 1 << '\n';
      }
    }
  }

  const unsigned index = static_cast<unsigned>(m.backups.size());
  const std::string new_bitmap = "fleece-backup." + m.chain + "." + std::to_string(m.next_serial);
  const std::string frozen = incremental ? m.active_bitmap : std::string();
  BackupEntry e;
  e.index = index;
  e.kind = incremental ? "incremental" : "full";
  e.file = index_name(index, incremental ? "inc.qcow2" : "full.qcow2");
  e.sums = index_name(index, "sums");
  e.checkpoint = new_bitmap;
  e.bitmap = frozen;
  e.started = iso_time_now();
  const auto t0 = std::chrono::steady_clock::now();

  const uint64_t chunks = (m.size + m.chunk_size - 1) / m.chunk_size;
  std::vector<Digest> sums;
  if (incremental) {
    sums = load_sums(dir + "/" + m.backups.back().sums, chunks);
  } else {
    const Digest z = zero_digest(m.chunk_size);
    sums.assign(chunks, z);
    if (m.size % m.chunk_size) sums.back() = zero_digest(m.size % m.chunk_size);
  }

  bool bitmap_created = false;
  const std::string path = dir + "/" + e.file;
  std::unique_ptr<Qcow2Writer> writer;
  std::string failure;
  PullResult r;
  uint64_t bitmap_count = 0;
  try {
    // Written before the transaction: a run killed from here on leaves names
    // the next run can repair from.
    ++m.next_serial;
    if (incremental) m.save(dir);
    write_pending(dir, new_bitmap);
    session.create(new_bitmap, frozen, m.granularity, !a.flag("no-persistent"));
    bitmap_created = true;
    e.cut = iso_time_now();
    const std::string fleece_uri = uri_with_export(nbd_uri, session.export_name());
    if (incremental) {
      // The frozen bitmap's count: what the pull must add up to.
      const NodeState now = session.inspect();
      if (const BitmapState* b = now.find(frozen)) bitmap_count = b->count;
    }
    if (auto hook = a.value("exec-at-cut")) {
      const int rc = run_hook(*hook, fleece_uri, index, frozen, bitmap_count);
      if (rc != 0)
        throw std::runtime_error("--exec-at-cut command exited with " + std::to_string(rc));
    }
    if (g_interrupted) throw Cancelled();
    Qcow2Options qo;
    qo.virtual_size = m.size;
    qo.cluster_bits = static_cast<uint32_t>(__builtin_ctzll(m.chunk_size));
    if (incremental) {
      qo.backing_file = m.backups.back().file;
      qo.backing_format = "qcow2";
    }
    writer = Qcow2Writer::create(path, qo);
    Qcow2Target target(*writer);
    PullOptions po = c.pull;
    po.chunk_size = m.chunk_size;
    po.expect_size = m.size;
    if (incremental) po.bitmap_context = "qemu:dirty-bitmap:" + frozen;
    Puller puller(Source{fleece_uri, {}}, po);
    puller.open();
    Progress progress(c.progress, e.kind + " " + std::to_string(index));
    const auto p0 = std::chrono::steady_clock::now();
    r = puller.run(target, &sums, &progress, &g_interrupted);
    const auto f0 = std::chrono::steady_clock::now();
    e.file_size = writer->finish();
    if (std::getenv("FLEECE_BACKUP_TRACE")) {
      std::fprintf(stderr, "trace: image finish %.3f s\n",
                   std::chrono::duration<double>(std::chrono::steady_clock::now() - f0).count());
    }
    e.pull_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - p0).count();
    writer.reset();
  } catch (const Cancelled&) {
    failure = "interrupted";
  } catch (const std::exception& ex) {
    failure = ex.what();
  }
  writer.reset();  // unlinks an unfinished image
  // Tear the fleece down whatever happened.
  std::string teardown_error = session.teardown();
  if (failure.empty() && !teardown_error.empty()) failure = teardown_error;

  if (!failure.empty()) {
    ::unlink(path.c_str());
    std::cerr << "fleece-backup: " << e.kind << " backup " << index << " of '" << m.node
              << "' failed: " << failure << '\n';
    if (bitmap_created) {
      if (incremental) {
        const std::string err = session.reclaim(frozen, new_bitmap);
        if (err.empty()) {
          m.active_bitmap = new_bitmap;
          std::cerr << "fleece-backup: merged bitmap " << frozen << " into " << new_bitmap
                    << "; the next incremental covers every change since backup " << index - 1
                    << '\n';
        } else {
          std::cerr << "fleece-backup: could not reclaim bitmap " << frozen << ": " << err
                    << "\nfleece-backup: the next run will retry (it merges a frozen bitmap back "
                       "before it starts)\n";
        }
        m.save(dir);
      } else {
        session.remove_bitmap(new_bitmap);
      }
    }
    if (!teardown_error.empty() && teardown_error != failure) {
      std::cerr << "fleece-backup: teardown: " << teardown_error << '\n';
    }
    clear_pending(dir);
    return failure == "interrupted" ? kExitInterrupted : kExitError;
  }

  // Success: the frozen bitmap's changes are in the image now.
  e.finished = iso_time_now();
  e.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  e.bytes_pulled = r.bytes_pulled;
  e.bytes_zeroed = r.bytes_zeroed;
  e.dirty_bytes = r.dirty_bytes;
  e.digest = disk_digest(sums);
  save_sums(dir + "/" + e.sums, sums);
  const std::string old_active = m.active_bitmap;
  m.active_bitmap = new_bitmap;
  m.backups.push_back(e);
  m.save(dir);
  clear_pending(dir);
  if (incremental) {
    session.remove_bitmap(frozen);
  } else if (!old_active.empty()) {
    session.remove_bitmap(old_active);
  }

  const double rate = e.pull_seconds > 0 ? static_cast<double>(e.bytes_pulled) / e.pull_seconds : 0;
  json::object o{{"event", "backup"},
                 {"kind", e.kind},
                 {"index", e.index},
                 {"node", m.node},
                 {"file", path},
                 {"virtual_size", m.size},
                 {"bytes_pulled", e.bytes_pulled},
                 {"bytes_zeroed", e.bytes_zeroed},
                 {"file_size", e.file_size},
                 {"seconds", e.seconds},
                 {"pull_seconds", e.pull_seconds},
                 {"rate", rate},
                 {"connections", r.connections},
                 {"checkpoint", e.checkpoint},
                 {"digest", e.digest}};
  std::string text = e.kind + " backup " + std::to_string(index) + " of " + m.node + " (" +
                     human_bytes(static_cast<double>(m.size)) + "): pulled " +
                     human_bytes(static_cast<double>(e.bytes_pulled));
  if (incremental) {
    o["dirty_bytes"] = e.dirty_bytes;
    o["bitmap"] = frozen;
    o["bitmap_count"] = bitmap_count;
    text += " of " + human_bytes(static_cast<double>(e.dirty_bytes)) + " dirty";
  }
  text += ", zeroed " + human_bytes(static_cast<double>(e.bytes_zeroed)) + " in " +
          fmt_seconds(e.pull_seconds) + " (" + human_bytes(rate) + "/s; " + fmt_seconds(e.seconds) +
          " in all) -> " + path + " (" + human_bytes(static_cast<double>(e.file_size)) + ")\n";
  report(c, o, text);
  return kExitOk;
}

// ---- restore, verify, list

Source image_source(const std::string& path) {
  return Source{"", {"qemu-nbd", "--read-only", "--format=qcow2", "--shared=1", path}};
}

struct Check {
  uint64_t mismatched = 0;
  uint64_t first_bad = 0;
};

Check compare_sums(const std::vector<Digest>& got, const std::vector<Digest>& want,
                   uint64_t chunk) {
  Check c;
  for (std::size_t i = 0; i < got.size() && i < want.size(); ++i) {
    if (got[i] != want[i]) {
      if (c.mismatched == 0) c.first_bad = i * chunk;
      ++c.mismatched;
    }
  }
  return c;
}

std::vector<Digest> read_point(const Manifest& m, const std::string& dir, unsigned index,
                               Target& target, const Common& c, bool write_zeroes,
                               PullResult* result) {
  const uint64_t chunks = (m.size + m.chunk_size - 1) / m.chunk_size;
  std::vector<Digest> sums(chunks, zero_digest(m.chunk_size));
  if (m.size % m.chunk_size) sums.back() = zero_digest(m.size % m.chunk_size);
  PullOptions po = c.pull;
  po.chunk_size = m.chunk_size;
  po.expect_size = m.size;
  po.write_zeroes_in_full = write_zeroes;
  po.connections = 1;  // one qemu-nbd per connection; one is enough for a local file
  Puller puller(image_source(dir + "/" + m.backups.at(index).file), po);
  puller.open();
  Progress progress(c.progress, "read " + std::to_string(index));
  PullResult r = puller.run(target, &sums, &progress, &g_interrupted);
  if (result) *result = r;
  return sums;
}

unsigned choose_point(const Args& a, const Manifest& m) {
  if (auto at = a.value("at")) {
    const uint64_t n = parse_size("at", *at);
    if (n >= m.backups.size()) {
      throw UsageError("--at " + *at + ": the chain has backups 0.." +
                       std::to_string(m.backups.size() - 1));
    }
    return static_cast<unsigned>(n);
  }
  return static_cast<unsigned>(m.backups.size() - 1);
}

int cmd_restore(const Args& a) {
  expect_positional(a, 1, "restore DIR [--at N] --to IMAGE [--force]");
  const Common c = common_options(a);
  const std::string dir = a.positional[0];
  const std::string to = a.required("to");
  const Manifest m = Manifest::load(dir);
  const unsigned index = choose_point(a, m);
  bool exists = false;
  const uint64_t existing = RawTarget::size_of(to, &exists);
  if (exists && !a.flag("force")) {
    throw UsageError(to + " exists; add --force to overwrite it");
  }
  const auto t0 = std::chrono::steady_clock::now();
  RawTarget target(to, m.size, true, true);
  if (target.is_block_device() && existing < m.size) {
    throw std::runtime_error(to + " is smaller than the disk (" + std::to_string(m.size) +
                             " bytes)");
  }
  PullResult r;
  const std::vector<Digest> sums =
      read_point(m, dir, index, target, c, target.is_block_device(), &r);
  target.sync();
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const std::string digest = disk_digest(sums);
  const BackupEntry& e = m.backups[index];
  const bool ok = digest == e.digest;
  json::object o{{"event", "restore"},
                 {"index", index},
                 {"to", to},
                 {"virtual_size", m.size},
                 {"bytes_written", r.bytes_pulled},
                 {"seconds", secs},
                 {"digest", digest},
                 {"verified", ok}};
  report(c, o,
         "restored backup " + std::to_string(index) + " (" + e.kind + ", cut " + e.cut + ") to " +
             to + ": " + human_bytes(static_cast<double>(r.bytes_pulled)) + " of data in " +
             fmt_seconds(secs) + "; digest " + digest +
             (ok ? " matches the manifest\n" : " DOES NOT match the manifest\n"));
  if (!ok) {
    const std::vector<Digest> want = load_sums(dir + "/" + e.sums, sums.size());
    const Check ch = compare_sums(sums, want, m.chunk_size);
    std::cerr << "fleece-backup: restore of backup " << index << " differs from the backup in "
              << ch.mismatched << " chunk(s), first at offset " << ch.first_bad << '\n';
    return kExitMismatch;
  }
  return kExitOk;
}

std::string run_capture(const std::vector<std::string>& argv, int* status) {
  int pipefd[2];
  if (::pipe2(pipefd, O_CLOEXEC) != 0) throw std::runtime_error("pipe failed");
  const pid_t pid = ::fork();
  if (pid < 0) throw std::runtime_error("fork failed");
  if (pid == 0) {
    ::dup2(pipefd[1], 1);
    ::dup2(pipefd[1], 2);
    std::vector<char*> args;
    for (const auto& s : argv) args.push_back(const_cast<char*>(s.c_str()));
    args.push_back(nullptr);
    ::execvp(args[0], args.data());
    ::_exit(127);
  }
  ::close(pipefd[1]);
  std::string out;
  char buf[4096];
  for (;;) {
    const ssize_t n = ::read(pipefd[0], buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    out.append(buf, static_cast<size_t>(n));
  }
  ::close(pipefd[0]);
  int st = 0;
  while (::waitpid(pid, &st, 0) < 0 && errno == EINTR) {
  }
  *status = WIFEXITED(st) ? WEXITSTATUS(st) : 128;
  return out;
}

int cmd_verify(const Args& a) {
  expect_positional(a, 1, "verify DIR");
  const Common c = common_options(a);
  const std::string dir = a.positional[0];
  const Manifest m = Manifest::load(dir);
  const uint64_t chunks = (m.size + m.chunk_size - 1) / m.chunk_size;
  int bad = 0;
  json::array results;
  // The chain as qemu-img sees it, newest first.
  int status = 0;
  const std::string last = dir + "/" + m.backups.back().file;
  const std::string info = run_capture(
      {"qemu-img", "info", "--backing-chain", "--output=json", "-f", "qcow2", last}, &status);
  std::vector<std::string> chain;
  if (status == 0) {
    json::error_code ec;
    json::value v = json::parse(info, ec);
    if (!ec && v.is_array()) {
      for (const auto& img : v.as_array()) {
        if (const json::value* f = img.as_object().if_contains("filename"); f && f->is_string()) {
          std::string name(f->as_string());
          chain.push_back(name.substr(name.rfind('/') + 1));
        }
      }
    }
  }
  std::vector<std::string> want_chain;
  for (auto it = m.backups.rbegin(); it != m.backups.rend(); ++it) want_chain.push_back(it->file);
  const bool chain_ok = chain == want_chain;
  if (!chain_ok) {
    ++bad;
    std::string got;
    for (const auto& s : chain) got += (got.empty() ? "" : " <- ") + s;
    std::cerr << "fleece-backup: the backing chain of " << last << " is [" << got
              << "], the manifest lists " << m.backups.size() << " images\n";
  }
  for (const BackupEntry& e : m.backups) {
    const std::string path = dir + "/" + e.file;
    json::object r{{"index", e.index}, {"file", e.file}};
    std::string problem;
    const std::string check =
        run_capture({"qemu-img", "check", "-q", "-f", "qcow2", path}, &status);
    if (status != 0) problem = "qemu-img check failed: " + check;
    std::vector<Digest> want;
    if (problem.empty()) {
      try {
        want = load_sums(dir + "/" + e.sums, chunks);
        if (disk_digest(want) != e.digest)
          problem = e.sums + " does not match the manifest's digest";
      } catch (const std::exception& ex) {
        problem = ex.what();
      }
    }
    if (problem.empty()) {
      NullTarget null;
      const std::vector<Digest> got = read_point(m, dir, e.index, null, c, false, nullptr);
      const Check ch = compare_sums(got, want, m.chunk_size);
      if (ch.mismatched) {
        problem = std::to_string(ch.mismatched) +
                  " chunk(s) differ from the digests taken at the "
                  "backup, first at offset " +
                  std::to_string(ch.first_bad);
      }
    }
    r["ok"] = problem.empty();
    if (!problem.empty()) {
      r["problem"] = problem;
      ++bad;
    }
    if (!c.quiet && !c.json) {
      std::cout << "backup " << e.index << " " << e.file << ": "
                << (problem.empty() ? "ok (digest " + e.digest + ")" : "FAILED: " + problem)
                << '\n';
    }
    results.push_back(std::move(r));
  }
  if (!c.quiet && !c.json) {
    std::cout << "chain: " << (chain_ok ? "ok" : "FAILED") << ", " << m.backups.size()
              << " backup(s), " << (bad ? "verification FAILED" : "all verified") << '\n';
  }
  if (c.json && !c.quiet) {
    std::cout << json::serialize(json::object{{"event", "verify"},
                                              {"chain_ok", chain_ok},
                                              {"backups", results},
                                              {"ok", bad == 0}})
              << '\n';
  }
  return bad ? kExitMismatch : kExitOk;
}

int cmd_list(const Args& a) {
  expect_positional(a, 1, "list DIR [--json]");
  const std::string dir = a.positional[0];
  const Manifest m = Manifest::load(dir);
  if (a.flag("json")) {
    std::cout << m.to_json();
    return kExitOk;
  }
  std::cout << "node " << m.node << ", " << human_bytes(static_cast<double>(m.size)) << " ("
            << m.size << " bytes), chunk " << m.chunk_size << ", active bitmap " << m.active_bitmap
            << '\n';
  std::printf("%-5s %-11s %-18s %-24s %12s %12s %12s  %s\n", "index", "kind", "file", "cut",
              "pulled", "dirty", "file size", "digest");
  for (const BackupEntry& e : m.backups) {
    std::printf(
        "%-5u %-11s %-18s %-24s %12s %12s %12s  %s\n", e.index, e.kind.c_str(), e.file.c_str(),
        e.cut.c_str(), human_bytes(static_cast<double>(e.bytes_pulled)).c_str(),
        e.kind == "incremental" ? human_bytes(static_cast<double>(e.dirty_bytes)).c_str() : "-",
        human_bytes(static_cast<double>(e.file_size)).c_str(), e.digest.c_str());
  }
  return kExitOk;
}

// ---- pull from any export

int cmd_pull(const Args& a) {
  expect_positional(a, 0, "pull --from NBD-URI [--bitmap NAME] --into IMAGE");
  const Common c = common_options(a);
  const std::string from = a.required("from");
  const std::string into = a.required("into");
  PullOptions po = c.pull;
  const auto bitmap = a.value("bitmap");
  if (bitmap) {
    po.bitmap_context = bitmap->rfind("qemu:", 0) == 0 ? *bitmap : "qemu:dirty-bitmap:" + *bitmap;
  }
  bool exists = false;
  const uint64_t existing = RawTarget::size_of(into, &exists);
  struct stat st {};
  const bool block_device = exists && ::stat(into.c_str(), &st) == 0 && S_ISBLK(st.st_mode);
  if (bitmap && !exists) {
    throw UsageError(into +
                     " does not exist: a --bitmap pull updates a copy of the previous "
                     "backup");
  }
  // A full pull into a block device must also clear what reads as zero.
  po.write_zeroes_in_full = !bitmap && block_device;
  const auto t0 = std::chrono::steady_clock::now();
  Puller puller(Source{from, {}}, po);
  const ExportInfo info = puller.open();
  if (exists && (bitmap || block_device) && existing != info.size &&
      !(block_device && !bitmap && existing > info.size)) {
    throw std::runtime_error(into + " is " + std::to_string(existing) + " bytes, the export " +
                             std::to_string(info.size));
  }
  RawTarget target(into, info.size, !exists, !bitmap);
  Progress progress(c.progress, "pull");
  PullResult r = puller.run(target, nullptr, &progress, &g_interrupted);
  target.sync();
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const double rate = secs > 0 ? static_cast<double>(r.bytes_pulled) / secs : 0;
  json::object o{{"event", "pull"},
                 {"from", from},
                 {"into", into},
                 {"virtual_size", r.size},
                 {"bytes_pulled", r.bytes_pulled},
                 {"bytes_zeroed", r.bytes_zeroed},
                 {"seconds", secs},
                 {"rate", rate},
                 {"connections", r.connections}};
  std::string text = "pulled " + human_bytes(static_cast<double>(r.bytes_pulled));
  if (bitmap) {
    o["dirty_bytes"] = r.dirty_bytes;
    text += " of " + human_bytes(static_cast<double>(r.dirty_bytes)) + " dirty";
  }
  text += " (zeroed " + human_bytes(static_cast<double>(r.bytes_zeroed)) + ") from " + from +
          " into " + into + " in " + fmt_seconds(secs) + " (" + human_bytes(rate) + "/s)\n";
  report(c, o, text);
  return kExitOk;
}

int run(int argc, char** argv) {
  const Args a = parse_args(argc, argv);
  struct sigaction sa {};
  sa.sa_handler = on_signal;
  sigemptyset(&sa.sa_mask);
  ::sigaction(SIGINT, &sa, nullptr);
  ::sigaction(SIGTERM, &sa, nullptr);
  ::signal(SIGPIPE, SIG_IGN);
  if (a.command == "full") return cmd_backup(a, false);
  if (a.command == "incremental") return cmd_backup(a, true);
  if (a.command == "restore") return cmd_restore(a);
  if (a.command == "verify") return cmd_verify(a);
  if (a.command == "list") return cmd_list(a);
  if (a.command == "pull") return cmd_pull(a);
  throw UsageError("unknown command '" + a.command + "' (try --help)");
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const UsageError& e) {
    std::cerr << "fleece-backup: error: " << e.what() << '\n';
    return kExitUsage;
  } catch (const Cancelled&) {
    std::cerr << "fleece-backup: interrupted\n";
    return kExitInterrupted;
  } catch (const std::exception& e) {
    std::cerr << "fleece-backup: " << e.what() << '\n';
    return kExitError;
  }
}
