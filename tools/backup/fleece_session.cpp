// SPDX-License-Identifier: MIT
#include "backup/fleece_session.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <iostream>
#include <stdexcept>
#include <thread>

#include <boost/json.hpp>

#include "common/qmp_client.hpp"

namespace fleece::backup {

namespace json = boost::json;
using tools::QmpClient;
using tools::QmpError;

namespace {
constexpr auto kEventWait = std::chrono::seconds(30);

uint64_t as_u64(const json::value* v) {
  if (!v) return 0;
  if (v->is_uint64()) return v->as_uint64();
  if (v->is_int64() && v->as_int64() > 0) return static_cast<uint64_t>(v->as_int64());
  return 0;
}
bool as_bool(const json::value* v) { return v && v->is_bool() && v->as_bool(); }
}  // namespace

const BitmapState* NodeState::find(const std::string& name) const {
  for (const auto& b : bitmaps) {
    if (b.name == name) return &b;
  }
  return nullptr;
}

FleeceSession::FleeceSession(QmpClient& qmp, std::string node, std::string scratch_dir)
    : qmp_(qmp), node_(std::move(node)), scratch_dir_(std::move(scratch_dir)) {
  // Short names: QEMU limits node names to 31 characters.
  tmp_ = "fbt-" + node_;
  cbw_ = "fbc-" + node_;
  access_ = "fba-" + node_;
  job_ = "fbj-" + node_;
  export_ = "fleece-backup-" + node_;
  scratch_path_ = scratch_dir_ + "/.fleece-scratch-" + node_ + ".raw";
}

FleeceSession::~FleeceSession() { teardown(); }

NodeState FleeceSession::inspect() {
  json::value nodes = qmp_.execute("query-named-block-nodes", {{"flat", true}});
  if (!nodes.is_array()) throw std::runtime_error("query-named-block-nodes: not a list");
  for (const auto& n : nodes.as_array()) {
    if (!n.is_object()) continue;
    const json::object& o = n.as_object();
    const json::value* name = o.if_contains("node-name");
    if (!name || !name->is_string() || name->as_string() != node_) continue;
    NodeState s;
    if (const json::value* img = o.if_contains("image"); img && img->is_object()) {
      s.size = as_u64(img->as_object().if_contains("virtual-size"));
    }
    if (const json::value* bl = o.if_contains("dirty-bitmaps"); bl && bl->is_array()) {
      for (const auto& b : bl->as_array()) {
        if (!b.is_object()) continue;
        const json::object& bo = b.as_object();
        BitmapState st;
        if (const json::value* bn = bo.if_contains("name"); bn && bn->is_string()) {
          st.name = std::string(bn->as_string());
        }
        st.recording = as_bool(bo.if_contains("recording"));
        st.busy = as_bool(bo.if_contains("busy"));
        st.persistent = as_bool(bo.if_contains("persistent"));
        st.granularity = as_u64(bo.if_contains("granularity"));
        st.count = as_u64(bo.if_contains("count"));
        s.bitmaps.push_back(std::move(st));
      }
    }
    if (s.size == 0) {
      throw std::runtime_error("node '" + node_ + "' reports no virtual size");
    }
    size_ = s.size;
    return s;
  }
  throw std::runtime_error("the server has no node named '" + node_ + "'");
}

void FleeceSession::clean_leftovers() {
  bool found_export = false, found_job = false, found_access = false, found_tmp = false;
  json::value exports = qmp_.execute("query-block-exports");
  for (const auto& e : exports.as_array()) {
    const json::value* id = e.as_object().if_contains("id");
    if (id && id->is_string() && id->as_string() == export_) found_export = true;
  }
  json::value jobs = qmp_.execute("query-block-jobs");
  for (const auto& j : jobs.as_array()) {
    const json::value* dev = j.as_object().if_contains("device");
    if (dev && dev->is_string() && dev->as_string() == job_) found_job = true;
  }
  json::value nodes = qmp_.execute("query-named-block-nodes", {{"flat", true}});
  for (const auto& n : nodes.as_array()) {
    const json::value* name = n.as_object().if_contains("node-name");
    if (!name || !name->is_string()) continue;
    if (name->as_string() == access_) found_access = true;
    if (name->as_string() == tmp_) found_tmp = true;
  }
  if (found_export || found_job || found_access || found_tmp) {
    std::cerr << "fleece-backup: removing a fleece of '" << node_
              << "' left behind by an earlier run\n";
    have_export_ = found_export;
    have_access_ = found_access;
    have_job_ = found_job;
    have_tmp_ = found_tmp;
    const std::string err = teardown();
    if (!err.empty()) throw std::runtime_error("cannot remove the old fleece: " + err);
  }
  ::unlink(scratch_path_.c_str());
}

std::optional<std::string> FleeceSession::reclaim_stale(const std::string& active,
                                                        const std::string& prefix) {
  const NodeState s = inspect();
  const BitmapState* a = s.find(active);
  if (!a || a->recording) return std::nullopt;
  const BitmapState* newer = nullptr;
  for (const auto& b : s.bitmaps) {
    if (b.name != active && b.name.rfind(prefix, 0) == 0 && b.recording) {
      if (newer) {
        throw std::runtime_error("bitmap " + active +
                                 " is disabled and several newer bitmaps "
                                 "record; cannot tell which one to merge it into");
      }
      newer = &b;
    }
  }
  if (!newer) {
    throw std::runtime_error("bitmap " + active +
                             " is disabled and no newer bitmap records "
                             "changes; take a full backup into a new directory");
  }
  const std::string target = newer->name;
  const std::string err = reclaim(active, target);
  if (!err.empty()) throw std::runtime_error(err);
  std::cerr << "fleece-backup: merged bitmap " << active << ", frozen by an interrupted run, into "
            << target << '\n';
  return target;
}

void FleeceSession::require_active(const std::string& name, uint64_t chunk) {
  const NodeState s = inspect();
  const BitmapState* b = s.find(name);
  if (!b) {
    throw std::runtime_error("node '" + node_ + "' has no bitmap " + name +
                             " (was the daemon restarted without persistent bitmaps?); the "
                             "changes since the last backup are unknown: take a full backup "
                             "into a new directory");
  }
  if (!b->recording) throw std::runtime_error("bitmap " + name + " is disabled");
  if (b->granularity == 0 || b->granularity % chunk != 0) {
    throw std::runtime_error("bitmap " + name + " has granularity " +
                             std::to_string(b->granularity) +
                             ", not a multiple of the chain's chunk size " + std::to_string(chunk));
  }
}

void FleeceSession::create(const std::string& new_bitmap, const std::string& frozen,
                           uint64_t granularity, bool persistent) {
  const int fd = ::open(scratch_path_.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd < 0) {
    throw std::runtime_error("cannot create the scratch file " + scratch_path_ + ": " +
                             std::strerror(errno));
  }
  have_scratch_ = true;
  const int rc = ::ftruncate(fd, static_cast<off_t>(size_));
  const int err = errno;
  ::close(fd);
  if (rc != 0) {
    throw std::runtime_error("cannot size the scratch file " + scratch_path_ + ": " +
                             std::strerror(err));
  }
  qmp_.execute("blockdev-add",
               {{"driver", "file"}, {"node-name", tmp_}, {"filename", scratch_path_}});
  have_tmp_ = true;
  json::array actions;
  json::object add{{"node", node_}, {"name", new_bitmap}, {"granularity", granularity}};
  if (persistent) add["persistent"] = true;
  actions.push_back(json::object{{"type", "block-dirty-bitmap-add"}, {"data", std::move(add)}});
  if (!frozen.empty()) {
    actions.push_back(json::object{{"type", "block-dirty-bitmap-disable"},
                                   {"data", json::object{{"node", node_}, {"name", frozen}}}});
  }
  actions.push_back(json::object{{"type", "blockdev-backup"},
                                 {"data", json::object{{"job-id", job_},
                                                       {"device", node_},
                                                       {"target", tmp_},
                                                       {"sync", "none"},
                                                       {"filter-node-name", cbw_}}}});
  qmp_.execute("transaction", {{"actions", std::move(actions)}});
  have_job_ = true;
  qmp_.execute("blockdev-add",
               {{"driver", "snapshot-access"}, {"node-name", access_}, {"file", cbw_}});
  have_access_ = true;
  json::object exp{{"type", "nbd"},
                   {"id", export_},
                   {"node-name", access_},
                   {"name", export_},
                   {"writable", false}};
  if (!frozen.empty()) {
    exp["bitmaps"] = json::array{json::object{{"node", node_}, {"name", frozen}}};
  }
  qmp_.execute("block-export-add", exp);
  have_export_ = true;
}

std::string FleeceSession::teardown() {
  std::string first;
  // Each step runs if its object exists; a failure is noted and the next
  // step still runs.
  auto step = [&first](bool& have, auto&& undo) {
    if (!have) return;
    try {
      undo();
      have = false;
    } catch (const std::exception& e) {
      if (first.empty()) first = e.what();
    }
  };
  step(have_export_, [this] {
    // The server may not have seen our connections close yet: retry, then force.
    bool done = false;
    for (int i = 0; i < 50 && !done; ++i) {
      try {
        qmp_.execute("block-export-del", {{"id", export_}});
        done = true;
      } catch (const QmpError& e) {
        if (e.desc().find("in use") == std::string::npos) throw;
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
      }
    }
    if (!done) qmp_.execute("block-export-del", {{"id", export_}, {"mode", "hard"}});
    qmp_.wait_event("BLOCK_EXPORT_DELETED", {{"id", export_}}, kEventWait);
  });
  step(have_access_, [this] { qmp_.execute("blockdev-del", {{"node-name", access_}}); });
  step(have_job_, [this] {
    qmp_.execute("block-job-cancel", {{"device", job_}});
    qmp_.wait_event("BLOCK_JOB_CANCELLED", {{"device", job_}}, kEventWait);
  });
  step(have_tmp_, [this] { qmp_.execute("blockdev-del", {{"node-name", tmp_}}); });
  step(have_scratch_, [this] { ::unlink(scratch_path_.c_str()); });
  return first;
}

std::string FleeceSession::reclaim(const std::string& frozen, const std::string& active) {
  try {
    qmp_.execute("block-dirty-bitmap-merge",
                 {{"node", node_}, {"target", active}, {"bitmaps", json::array{frozen}}});
    qmp_.execute("block-dirty-bitmap-remove", {{"node", node_}, {"name", frozen}});
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}

std::string FleeceSession::remove_bitmap(const std::string& name) {
  try {
    qmp_.execute("block-dirty-bitmap-remove", {{"node", node_}, {"name", name}});
  } catch (const std::exception& e) {
    std::cerr << "fleece-backup: warning: could not remove bitmap " << name << ": " << e.what()
              << '\n';
    return e.what();
  }
  return "";
}

}  // namespace fleece::backup
