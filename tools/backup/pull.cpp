// SPDX-License-Identifier: MIT
#include "backup/pull.hpp"

#include <libnbd.h>
#include <xxhash.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <thread>

#include "backup/progress.hpp"

namespace fleece::backup {

namespace {

constexpr const char* kAllocation = "base:allocation";
constexpr uint64_t kMapStep = 1ull << 30;  // block-status request length

std::string nbd_message(const char* what) {
  const char* e = nbd_get_error();
  return std::string(what) + ": " + (e ? e : "unknown libnbd error");
}

struct HandleDeleter {
  void operator()(nbd_handle* h) const {
    if (h) nbd_close(h);
  }
};
using Handle = std::unique_ptr<nbd_handle, HandleDeleter>;

using detail::Range;

void append(std::vector<Range>& v, uint64_t offset, uint64_t length, bool data) {
  if (length == 0) return;
  if (!v.empty() && v.back().data == data && v.back().end() == offset) {
    v.back().length += length;
    return;
  }
  v.push_back({offset, length, data});
}

struct Extents {
  std::vector<std::pair<uint64_t, uint32_t>> alloc;  // (length, flags)
  std::vector<std::pair<uint64_t, uint32_t>> bitmap;
  std::string bitmap_context;
};

int extent_callback(void* user, const char* context, uint64_t /*offset*/, uint32_t* entries,
                    size_t n, int* /*error*/) {
  auto* ex = static_cast<Extents*>(user);
  std::vector<std::pair<uint64_t, uint32_t>>* out = nullptr;
  if (std::strcmp(context, kAllocation) == 0) {
    out = &ex->alloc;
  } else if (context == ex->bitmap_context) {
    out = &ex->bitmap;
  }
  if (!out) return 0;
  for (size_t i = 0; i + 1 < n; i += 2) out->emplace_back(entries[i], entries[i + 1]);
  return 0;
}

}  // namespace

// Chunk mode: data and zero ranges grow to whole chunks; a chunk with any
// data in it is data. Input sorted and disjoint; output likewise.
std::vector<Range> detail::align_to_chunks(const std::vector<Range>& in, uint64_t chunk,
                                           uint64_t size) {
  auto down = [chunk](uint64_t x) { return x / chunk * chunk; };
  auto up = [chunk, size](uint64_t x) { return std::min(size, (x + chunk - 1) / chunk * chunk); };
  std::vector<Range> data, zero;
  for (const Range& r : in) {
    std::vector<Range>& v = r.data ? data : zero;
    const uint64_t s = down(r.offset), e = up(r.end());
    if (!v.empty() && v.back().end() >= s) {
      v.back().length = std::max(v.back().end(), e) - v.back().offset;
    } else {
      v.push_back({s, e - s, r.data});
    }
  }
  // zero minus data
  std::vector<Range> out;
  std::size_t di = 0;
  for (const Range& z : zero) {
    uint64_t s = z.offset;
    while (s < z.end()) {
      while (di < data.size() && data[di].end() <= s) ++di;
      if (di < data.size() && data[di].offset <= s) {
        s = std::min(z.end(), data[di].end());
        continue;
      }
      const uint64_t e = di < data.size() ? std::min(z.end(), data[di].offset) : z.end();
      out.push_back({s, e - s, false});
      s = e;
    }
  }
  out.insert(out.end(), data.begin(), data.end());
  std::sort(out.begin(), out.end(),
            [](const Range& x, const Range& y) { return x.offset < y.offset; });
  return out;
}

Digest digest_of(const void* data, size_t length) {
  static const bool avx2 = __builtin_cpu_supports("avx2");
  XXH128_hash_t h;
  if (avx2) {
    detail::xxh3_128_avx2(data, length, &h.high64, &h.low64);
  } else {
    h = XXH3_128bits(data, length);
  }
  Digest d;
  for (int i = 0; i < 8; ++i) {
    d[static_cast<size_t>(i)] = static_cast<unsigned char>(h.high64 >> (56 - 8 * i));
    d[static_cast<size_t>(8 + i)] = static_cast<unsigned char>(h.low64 >> (56 - 8 * i));
  }
  return d;
}

Digest zero_digest(size_t length) {
  std::vector<unsigned char> zeros(length, 0);
  return digest_of(zeros.data(), zeros.size());
}

std::string disk_digest(const std::vector<Digest>& chunks) {
  const Digest d = digest_of(chunks.data(), chunks.size() * sizeof(Digest));
  static const char* const hex = "0123456789abcdef";
  std::string s;
  for (unsigned char c : d) {
    s += hex[c >> 4];
    s += hex[c & 15];
  }
  return s;
}

unsigned default_connections() {
  const unsigned cpus = std::thread::hardware_concurrency();
  return std::clamp(cpus, 1u, 4u);
}

std::string Source::description() const {
  if (!uri.empty()) return uri;
  std::string s;
  for (const auto& a : argv) s += (s.empty() ? "" : " ") + a;
  return s;
}

std::string uri_with_export(const std::string& uri, const std::string& name) {
  const std::size_t scheme = uri.find("://");
  if (scheme == std::string::npos) throw std::invalid_argument("not an NBD URI: " + uri);
  const std::size_t auth = scheme + 3;
  std::size_t path = uri.find_first_of("/?#", auth);
  if (path == std::string::npos) return uri + "/" + name;
  const std::size_t rest = uri.find_first_of("?#", path);
  const std::string tail = rest == std::string::npos ? "" : uri.substr(rest);
  return uri.substr(0, path) + "/" + name + tail;
}

struct Puller::Impl {
  Source source;
  PullOptions options;
  std::vector<Handle> handles;
  ExportInfo info;

  Handle connect() {
    Handle h(nbd_create());
    if (!h) throw std::runtime_error(nbd_message("nbd_create"));
    nbd_set_handle_name(h.get(), "fleece-backup");
    if (nbd_set_uri_allow_local_file(h.get(), true) == -1 ||
        nbd_add_meta_context(h.get(), kAllocation) == -1 ||
        (!options.bitmap_context.empty() &&
         nbd_add_meta_context(h.get(), options.bitmap_context.c_str()) == -1)) {
      throw std::runtime_error(nbd_message("libnbd setup"));
    }
    int rc;
    if (!source.argv.empty()) {
      std::vector<char*> argv;
      for (auto& a : source.argv) argv.push_back(const_cast<char*>(a.c_str()));
      argv.push_back(nullptr);
      rc = nbd_connect_systemd_socket_activation(h.get(), argv.data());
    } else {
      rc = nbd_connect_uri(h.get(), source.uri.c_str());
    }
    if (rc == -1) {
      throw std::runtime_error("cannot connect to " + source.description() + ": " +
                               (nbd_get_error() ? nbd_get_error() : "?"));
    }
    return h;
  }

  // Walks block status; returns the ranges to copy, sorted.
  std::vector<Range> map(PullResult& result, const std::atomic<bool>* cancel) {
    nbd_handle* h = handles[0].get();
    const bool have_alloc = nbd_can_meta_context(h, kAllocation) == 1;
    const bool bitmap_mode = !options.bitmap_context.empty();
    std::vector<Range> ranges;
    uint64_t offset = 0;
    const uint64_t size = info.size;
    for (unsigned guard = 0; offset < size; ++guard) {
      if (cancel && cancel->load()) throw Cancelled();
      const uint64_t count = std::min(kMapStep, size - offset);
      Extents ex;
      ex.bitmap_context = options.bitmap_context;
      if (have_alloc || bitmap_mode) {
        if (nbd_block_status(h, count, offset, nbd_extent_callback{extent_callback, &ex, nullptr},
                             0) == -1) {
          throw std::runtime_error(nbd_message("block status"));
        }
      }
      if (!have_alloc) ex.alloc = {{count, 0}};
      auto sum = [](const auto& v) {
        uint64_t s = 0;
        for (const auto& e : v) s += e.first;
        return s;
      };
      uint64_t advance = std::min(count, sum(ex.alloc));
      if (bitmap_mode) advance = std::min(advance, sum(ex.bitmap));
      if (advance == 0) {
        throw std::runtime_error("the server answered block status at offset " +
                                 std::to_string(offset) + " with no extents");
      }
      // Sweep both lists over [offset, offset + advance).
      std::size_t ai = 0, bi = 0;
      uint64_t a_end = offset + ex.alloc[0].first,
               b_end = bitmap_mode ? offset + ex.bitmap[0].first : UINT64_MAX;
      uint64_t pos = offset;
      const uint64_t stop = offset + advance;
      while (pos < stop) {
        const uint64_t next = std::min({a_end, b_end, stop});
        const bool zero = (ex.alloc[ai].second & LIBNBD_STATE_ZERO) != 0;
        const bool dirty = bitmap_mode && (ex.bitmap[bi].second & 1) != 0;
        if (!zero) result.mapped_data += next - pos;
        if (bitmap_mode) {
          if (dirty) {
            result.dirty_bytes += next - pos;
            append(ranges, pos, next - pos, !zero);
          }
        } else if (!zero || options.write_zeroes_in_full) {
          append(ranges, pos, next - pos, !zero);
        }
        pos = next;
        if (pos == a_end && pos < stop) a_end += ex.alloc[++ai].first;
        if (bitmap_mode && pos == b_end && pos < stop) b_end += ex.bitmap[++bi].first;
      }
      offset = stop;
      if (guard > 100'000'000) throw std::runtime_error("block status does not advance");
    }
    if (options.chunk_size) ranges = detail::align_to_chunks(ranges, options.chunk_size, size);
    return ranges;
  }
};

Puller::Puller(Source source, PullOptions options) : impl_(std::make_unique<Impl>()) {
  impl_->source = std::move(source);
  impl_->options = options;
  if (impl_->options.connections == 0) impl_->options.connections = 1;
  if (impl_->options.requests == 0) impl_->options.requests = 1;
  if (impl_->options.chunk_size && impl_->options.request_size % impl_->options.chunk_size) {
    impl_->options.request_size = static_cast<uint32_t>(
        std::max<uint64_t>(1, impl_->options.request_size / impl_->options.chunk_size) *
        impl_->options.chunk_size);
  }
}

Puller::~Puller() = default;

ExportInfo Puller::open() {
  Impl& d = *impl_;
  d.handles.push_back(d.connect());
  nbd_handle* h = d.handles[0].get();
  const int64_t size = nbd_get_size(h);
  if (size < 0) throw std::runtime_error(nbd_message("export size"));
  d.info.size = static_cast<uint64_t>(size);
  d.info.multi_conn = nbd_can_multi_conn(h) == 1;
  d.info.has_context = d.options.bitmap_context.empty() ||
                       nbd_can_meta_context(h, d.options.bitmap_context.c_str()) == 1;
  if (!d.info.has_context) {
    throw std::runtime_error("the export " + d.source.description() + " does not offer " +
                             d.options.bitmap_context);
  }
  if (d.options.expect_size && d.info.size != d.options.expect_size) {
    throw std::runtime_error("the export is " + std::to_string(d.info.size) + " bytes, expected " +
                             std::to_string(d.options.expect_size));
  }
  return d.info;
}

namespace {

struct Slot {
  std::unique_ptr<unsigned char[], decltype(&std::free)> buffer{nullptr, &std::free};
  std::size_t task = 0;
  bool busy = false;
  bool done = false;
  int error = 0;
};

struct Shared {
  const std::vector<Range>* tasks = nullptr;
  std::atomic<std::size_t> next{0};
  std::atomic<bool> failed{false};
  std::atomic<uint64_t> pulled{0}, zeroed{0};
  std::mutex mu;
  std::string error;  // first failure
  void fail(std::string message) {
    std::lock_guard lock(mu);
    if (error.empty()) error = std::move(message);
    failed = true;
  }
};

struct CompletionData {
  Slot* slot;
};

int on_read_done(void* user, int* error) {
  Slot* slot = static_cast<Slot*>(user);
  slot->error = *error;
  slot->done = true;
  return 1;
}

void digest_range(std::vector<Digest>* digests, uint64_t chunk, uint64_t size, uint64_t offset,
                  const unsigned char* data, uint64_t length) {
  if (!digests || chunk == 0) return;
  for (uint64_t o = 0; o < length; o += chunk) {
    const uint64_t n = std::min(chunk, std::min(length - o, size - (offset + o)));
    (*digests)[(offset + o) / chunk] = digest_of(data + o, n);
  }
}

void zero_digests(std::vector<Digest>* digests, uint64_t chunk, uint64_t size, uint64_t offset,
                  uint64_t length, const Digest& full, const Digest& tail) {
  if (!digests || chunk == 0) return;
  for (uint64_t o = offset; o < offset + length; o += chunk) {
    (*digests)[o / chunk] = o + chunk <= size ? full : tail;
  }
}

}  // namespace

PullResult Puller::run(Target& target, std::vector<Digest>* digests, Progress* progress,
                       const std::atomic<bool>* cancel) {
  Impl& d = *impl_;
  if (d.handles.empty()) open();
  PullResult result;
  result.size = d.info.size;
  const uint64_t chunk = d.options.chunk_size;
  if (chunk && digests && digests->size() != (d.info.size + chunk - 1) / chunk) {
    throw std::invalid_argument("digest table does not match the disk size");
  }
  const auto t_map = std::chrono::steady_clock::now();
  std::vector<Range> tasks_in = d.map(result, cancel);
  const auto t_mapped = std::chrono::steady_clock::now();
  // Split data ranges into requests.
  std::vector<Range> tasks;
  uint64_t total = 0;
  for (const Range& r : tasks_in) {
    total += r.length;
    if (!r.data) {
      tasks.push_back(r);
      continue;
    }
    for (uint64_t o = r.offset; o < r.end(); o += d.options.request_size) {
      tasks.push_back({o, std::min<uint64_t>(d.options.request_size, r.end() - o), true});
    }
  }
  const unsigned n = d.info.multi_conn ? std::max(1u, d.options.connections) : 1u;
  while (d.handles.size() < n) d.handles.push_back(d.connect());
  result.connections = n;
  if (progress) progress->start(total);

  const Digest zero_full = chunk ? zero_digest(chunk) : Digest{};
  const Digest zero_tail =
      chunk && d.info.size % chunk ? zero_digest(d.info.size % chunk) : zero_full;

  Shared shared;
  shared.tasks = &tasks;
  auto worker = [&](nbd_handle* h) {
    std::vector<Slot> slots(d.options.requests);
    try {
      for (;;) {
        bool stop = shared.failed.load() || (cancel && cancel->load());
        // Issue.
        for (Slot& s : slots) {
          if (stop || s.busy) continue;
          const std::size_t i = shared.next.fetch_add(1);
          if (i >= tasks.size()) {
            stop = true;
            break;
          }
          const Range& t = tasks[i];
          if (!t.data) {
            target.write_zeroes(t.offset, t.length);
            zero_digests(digests, chunk, d.info.size, t.offset, t.length, zero_full, zero_tail);
            shared.zeroed += t.length;
            if (progress) progress->add(t.length);
            continue;
          }
          if (!s.buffer) {
            void* p = nullptr;
            if (posix_memalign(&p, 4096, d.options.request_size) != 0) throw std::bad_alloc();
            s.buffer.reset(static_cast<unsigned char*>(p));
          }
          s.task = i;
          s.busy = true;
          s.done = false;
          s.error = 0;
          if (nbd_aio_pread(h, s.buffer.get(), t.length, t.offset,
                            nbd_completion_callback{on_read_done, &s, nullptr}, 0) == -1) {
            s.busy = false;
            throw std::runtime_error(nbd_message("read request"));
          }
        }
        bool any_busy = false, any_done = false;
        for (const Slot& s : slots) {
          any_busy = any_busy || s.busy;
          any_done = any_done || (s.busy && s.done);
        }
        if (!any_busy) {
          if (stop || shared.next.load() >= tasks.size()) break;
          continue;
        }
        // Replies can complete while requests are issued: only wait when
        // nothing is ready.
        if (!any_done && nbd_poll(h, 500) == -1) throw std::runtime_error(nbd_message("poll"));
        for (Slot& s : slots) {
          if (!s.busy || !s.done) continue;
          s.busy = false;
          const Range& t = tasks[s.task];
          if (s.error) {
            throw std::runtime_error("read of " + std::to_string(t.length) + " bytes at offset " +
                                     std::to_string(t.offset) +
                                     " failed: " + std::strerror(s.error));
          }
          target.write(t.offset, s.buffer.get(), t.length);
          digest_range(digests, chunk, d.info.size, t.offset, s.buffer.get(), t.length);
          shared.pulled += t.length;
          if (progress) progress->add(t.length);
        }
      }
    } catch (const std::exception& e) {
      shared.fail(e.what());
    }
    // Drain what is still in flight before the buffers go.
    for (int guard = 0; guard < 1200 && nbd_aio_in_flight(h) > 0; ++guard) {
      if (nbd_poll(h, 100) == -1) break;
    }
    if (nbd_aio_in_flight(h) > 0) nbd_shutdown(h, LIBNBD_SHUTDOWN_ABANDON_PENDING);
  };
  std::vector<std::thread> threads;
  for (unsigned i = 1; i < n; ++i) threads.emplace_back(worker, d.handles[i].get());
  worker(d.handles[0].get());
  for (auto& t : threads) t.join();
  if (std::getenv("FLEECE_BACKUP_TRACE")) {
    const auto now = std::chrono::steady_clock::now();
    std::fprintf(
        stderr,
        "trace: map %.3f s (%zu ranges), connect+copy %.3f s (%zu requests, %u connections)\n",
        std::chrono::duration<double>(t_mapped - t_map).count(), tasks_in.size(),
        std::chrono::duration<double>(now - t_mapped).count(), tasks.size(), n);
  }
  if (progress) progress->finish();
  for (auto& h : d.handles) nbd_shutdown(h.get(), 0);
  if (shared.failed) {
    if (cancel && cancel->load()) throw Cancelled();
    throw std::runtime_error(shared.error);
  }
  if (cancel && cancel->load()) throw Cancelled();
  result.bytes_pulled = shared.pulled;
  result.bytes_zeroed = shared.zeroed;
  return result;
}

}  // namespace fleece::backup
