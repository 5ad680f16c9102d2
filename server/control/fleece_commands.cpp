// SPDX-License-Identifier: MIT
// Fleecing commands: blockdev-add of copy-before-write and snapshot-access,
// blockdev-reopen (inserting/removing the filter under the live raw node),
// blockdev-backup sync=none (the filter inserted by a job, also inside a
// transaction), query-block-jobs and block-job-cancel. Error texts follow
// QEMU 7.2 (shared control-api.md §3.2–3.4, §3.9–3.10, §5).
#include <chrono>

#include "fleece/nodes.hpp"
#include "server/control/control_plane.hpp"
#include "server/log.hpp"

namespace fleeced::server::control {

namespace {

QmpError generic(std::string desc) { return QmpError{"GenericError", std::move(desc)}; }

std::string not_found_ref(std::string_view name) {
  return "Cannot find device='' nor node-name='" + std::string(name) + "'";
}

std::string job_busy(std::string_view node) {
  return "Node '" + std::string(node) + "' is busy: block device is in use by block job: backup";
}

// True if `node` is `target` or has it below (a child, a child's child...).
bool reaches(const block::NodePtr& node, const block::Node* target, int depth = 0) {
  if (node.get() == target) return true;
  if (depth > 64) return true;  // deeper than any graph we build: treat as a cycle
  for (const auto& c : node->children()) {
    if (reaches(c, target, depth + 1)) return true;
  }
  return false;
}

std::string cycle_text(std::string_view child, std::string_view parent) {
  return "Making '" + std::string(child) + "' a child of '" + std::string(parent) +
         "' would create a cycle";
}

}  // namespace

std::string ControlPlane::job_using(const block::Node& node) const {
  for (const auto& [id, job] : jobs_) {
    if (job.target.get() == &node || job.filter.get() == &node) return id;
  }
  return "";
}

CommandResult ControlPlane::blockdev_add_cbw(const std::string& node_name, Args& a) {
  auto file = a.string("file", true);
  auto target = a.string("target", true);
  const json::object* bitmap = a.object("bitmap", false);
  auto on_error = a.enumeration("on-cbw-error", {"break-guest-write", "break-snapshot"}, false);
  auto timeout = a.uint32("cbw-timeout", false);
  auto min_cluster = a.uint64("min-cluster-size", false);  // QEMU 9.2's option
  a.allow("read-only");
  a.allow("auto-read-only");
  a.allow("discard");
  a.allow("cache");
  if (!a.finish()) return {json::object(), a.error()};
  if (graph_.find(node_name)) {
    return CommandResult::fail("Duplicate nodes with node-name='" + node_name + "'");
  }
  block::NodePtr file_node = graph_.find(*file);
  if (!file_node) return CommandResult::fail(not_found_ref(*file));
  block::NodePtr target_node = graph_.find(*target);
  if (!target_node) return CommandResult::fail(not_found_ref(*target));
  if (!job_using(*target_node).empty()) return CommandResult::fail(job_busy(*target));
  if (file_node == target_node) {
    return CommandResult::fail("The target of copy-before-write must differ from its file");
  }
  // A target that is (or sits over) the filtered file would copy into
  // itself through the filter once inserted: refuse it now.
  if (reaches(target_node, file_node.get())) {
    return CommandResult::fail(cycle_text(*target, node_name));
  }
  for (const auto& p : graph_.parents_of(*file_node)) {
    if (reaches(target_node, p.get())) return CommandResult::fail(cycle_text(*target, node_name));
  }
  fleece::CbwOptions options;
  if (min_cluster) {
    if (*min_cluster < 512 || *min_cluster > (uint64_t{1} << 26) ||
        (*min_cluster & (*min_cluster - 1)) != 0) {
      return CommandResult::fail("min-cluster-size must be a power of two from 512 to 64 MiB");
    }
    options.cluster_size = static_cast<uint32_t>(*min_cluster);
  }
  if (bitmap) {
    Args ref(bitmap, "bitmap.");
    auto bnode = ref.string("node", true);
    auto bname = ref.string("name", true);
    if (!ref.finish()) return {json::object(), ref.error()};
    QmpError err;
    block::NodeBitmapPtr b = bitmap_or_error(*bnode, *bname, err);
    if (!b) return {json::object(), err};
    if (b->bits->disk_size() != file_node->device()->size()) {
      return CommandResult::fail("Bitmap '" + *bname + "' does not match the size of '" + *file +
                                 "'");
    }
    options.bitmap = b->bits.get();
  }
  if (on_error == "break-snapshot") options.on_error = fleece::OnCbwError::break_snapshot;
  options.timeout = std::chrono::seconds(timeout.value_or(0));
  std::error_code ec;
  std::shared_ptr<fleece::CopyBeforeWrite> cbw;
  {
    // The bitmap is read while writers may mark it: take it drained.
    block::GatePause pause(graph_.gate());
    cbw = fleece::CopyBeforeWrite::create(file_node->device(), target_node->device(), options, ec);
  }
  if (!cbw) {
    return CommandResult::fail("Cannot use '" + *target + "' as copy-before-write target of '" +
                               *file + "': it must be writable and at least as large");
  }
  (void)graph_.add(std::make_shared<fleece::CbwNode>(node_name, file_node, target_node, cbw));
  log().info("blockdev-add: copy-before-write node '{}' over '{}' -> '{}'", node_name, *file,
             *target);
  return CommandResult::ok();
}

CommandResult ControlPlane::blockdev_add_snapshot_access(const std::string& node_name, Args& a) {
  auto file = a.string("file", true);
  a.allow("read-only");
  a.allow("auto-read-only");
  a.allow("cache");
  a.allow("discard");
  if (!a.finish()) return {json::object(), a.error()};
  if (graph_.find(node_name)) {
    return CommandResult::fail("Duplicate nodes with node-name='" + node_name + "'");
  }
  block::NodePtr file_node = graph_.find(*file);
  if (!file_node) return CommandResult::fail(not_found_ref(*file));
  auto cbw = std::dynamic_pointer_cast<fleece::CbwNode>(file_node);
  if (!cbw) {
    return CommandResult::fail("Node '" + *file +
                               "' is not a copy-before-write filter (no snapshot API)");
  }
  (void)graph_.add(std::make_shared<fleece::SnapshotAccessNode>(node_name, cbw));
  log().info("blockdev-add: snapshot-access node '{}' over '{}'", node_name, *file);
  return CommandResult::ok();
}

CommandResult ControlPlane::cmd_blockdev_reopen(Args& a) {
  const json::array* options = a.array("options", true);
  if (!a.finish()) return {json::object(), a.error()};
  struct Change {
    std::shared_ptr<block::RawNode> raw;
    block::NodePtr child;
    bool discard_unmap;
  };
  std::vector<Change> changes;
  for (std::size_t i = 0; i < options->size(); ++i) {
    const std::string prefix = "options[" + std::to_string(i) + "].";
    const json::value& item = (*options)[i];
    if (!item.is_object()) {
      return CommandResult::fail("Invalid parameter type for 'options[" + std::to_string(i) +
                                 "]', expected: object");
    }
    Args o(&item.as_object(), prefix);
    auto driver = o.string("driver", true);
    auto node_name = o.string("node-name", false);
    if (driver && node_name) {
      // A different driver is refused before its options are looked at.
      block::NodePtr existing = graph_.find(*node_name);
      if (existing && existing->driver() != *driver) {
        return CommandResult::fail("Cannot change the option 'driver'");
      }
    }
    auto file = o.string("file", true);  // a raw node's file is required, as in QEMU
    auto discard = o.enumeration("discard", {"ignore", "unmap"}, false);
    o.allow("read-only");
    o.allow("auto-read-only");
    o.allow("cache");
    o.allow("detect-zeroes");
    if (!o.finish()) return {json::object(), o.error()};
    if (!node_name) return CommandResult::fail("node-name not specified");
    block::NodePtr n = graph_.find(*node_name);
    if (!n) {
      return CommandResult::fail("Failed to find node with node-name='" + *node_name + "'");
    }
    if (*driver != n->driver()) return CommandResult::fail("Cannot change the option 'driver'");
    auto raw = std::dynamic_pointer_cast<block::RawNode>(n);
    if (!raw) {
      return CommandResult::fail("Reopening a '" + n->driver() + "' node is not supported");
    }
    block::NodePtr child = raw->child();
    if (file) {
      child = graph_.find(*file);
      if (!child) return CommandResult::fail(not_found_ref(*file));
    }
    block::NodePtr current = raw->child();
    if (child != current) {
      auto to_cbw = std::dynamic_pointer_cast<fleece::CbwNode>(child);
      auto from_cbw = std::dynamic_pointer_cast<fleece::CbwNode>(current);
      if (to_cbw && to_cbw->file() == current) {
        // Inserting the filter: the point in time of the fleece.
        if (!job_using(*to_cbw).empty()) return CommandResult::fail(job_busy(to_cbw->name()));
        for (const auto& p : graph_.parents_of(*to_cbw)) {
          if (std::dynamic_pointer_cast<block::RawNode>(p)) {
            return CommandResult::fail("Node " + to_cbw->name() + " is in use");
          }
        }
      } else if (from_cbw && from_cbw->file() == child) {
        // Removing it: refused while the fleece can still be read.
        if (!job_using(*from_cbw).empty()) {
          return CommandResult::fail(job_busy(from_cbw->name()));
        }
        for (const auto& p : graph_.parents_of(*from_cbw)) {
          if (std::dynamic_pointer_cast<fleece::SnapshotAccessNode>(p)) {
            const std::string f = child->name();
            return CommandResult::fail(
                "Permission conflict on node '" + f +
                "': permissions 'write' are both required by node '" + raw->name() +
                "' (uses node '" + f + "' as 'file' child) and unshared by node '" +
                from_cbw->name() + "' (uses node '" + f + "' as 'file' child).");
          }
        }
      } else {
        return CommandResult::fail("Cannot change the 'file' child of '" + raw->name() + "' to '" +
                                   child->name() +
                                   "': only inserting or removing a copy-before-write filter "
                                   "over its current file is supported");
      }
    }
    if (child != current && reaches(child, raw.get())) {
      return CommandResult::fail(cycle_text(child->name(), raw->name()));
    }
    changes.push_back({raw, child, discard.value_or("ignore") == "unmap"});
  }
  block::GatePause pause(graph_.gate());
  for (auto& c : changes) {
    if (c.raw->child() != c.child) {
      log().info("blockdev-reopen: node '{}' file '{}' -> '{}'", c.raw->name(),
                 c.raw->child()->name(), c.child->name());
      c.raw->set_child(c.child);
    }
    c.raw->set_discard_unmap(c.discard_unmap);
  }
  return CommandResult::ok();
}

ControlPlane::ActionResult ControlPlane::act_blockdev_backup(Args& a) {
  auto job_id = a.string("job-id", false);
  auto device = a.string("device", true);
  auto target = a.string("target", true);
  auto sync = a.enumeration("sync", {"top", "full", "none", "incremental", "bitmap"}, true);
  auto filter = a.string("filter-node-name", false);
  auto on_error = a.enumeration("on-cbw-error", {"break-guest-write", "break-snapshot"}, false);
  const json::object* perf = a.object("x-perf", false);
  for (const char* k : {"speed", "bitmap", "bitmap-mode", "compress", "on-source-error",
                        "on-target-error", "auto-finalize", "auto-dismiss", "discard-source"}) {
    a.allow(k);
  }
  if (!a.finish()) return a.error();
  std::optional<uint64_t> min_cluster;
  if (perf) {
    // QEMU's BackupPerf: min-cluster-size (9.2) sets the copy granularity.
    Args p(perf, "x-perf.");
    min_cluster = p.uint64("min-cluster-size", false);
    p.allow("use-copy-range");
    p.allow("max-workers");
    p.allow("max-chunk");
    if (!p.finish()) return p.error();
    if (min_cluster && (*min_cluster < 512 || *min_cluster > (uint64_t{1} << 26) ||
                        (*min_cluster & (*min_cluster - 1)) != 0)) {
      return generic("min-cluster-size must be a power of two from 512 to 64 MiB");
    }
  }
  if (*sync != "none") {
    return generic("blockdev-backup sync '" + *sync +
                   "' is not supported: fleeced runs backup jobs in fleecing mode (sync none)");
  }
  const std::string id = job_id.value_or(*device);
  if (jobs_.count(id)) return generic("Job ID '" + id + "' already in use");
  auto raw = graph_.find_raw(*device);
  if (!raw) {
    if (graph_.find(*device)) {
      return generic("Node '" + *device + "' is not a raw node (fleeced fleeces raw nodes)");
    }
    return generic("Cannot find device='" + *device + "' nor node-name='" + *device + "'");
  }
  block::NodePtr target_node = graph_.find(*target);
  if (!target_node) return generic(not_found_ref(*target));
  if (!job_using(*target_node).empty()) return generic(job_busy(*target));
  if (std::dynamic_pointer_cast<fleece::CbwNode>(raw->child())) return generic(job_busy(*device));
  const std::string filter_name = filter.value_or("#cbw-" + id);
  if (graph_.find(filter_name)) {
    return generic("Duplicate nodes with node-name='" + filter_name + "'");
  }
  block::NodePtr file_node = raw->child();
  if (reaches(target_node, file_node.get()) || reaches(target_node, raw.get())) {
    return generic("Cannot use '" + *target + "' as the backup target of '" + *device + "'");
  }
  fleece::CbwOptions options;
  if (on_error == "break-snapshot") options.on_error = fleece::OnCbwError::break_snapshot;
  if (min_cluster) options.cluster_size = static_cast<uint32_t>(*min_cluster);
  std::error_code ec;
  auto cbw =
      fleece::CopyBeforeWrite::create(file_node->device(), target_node->device(), options, ec);
  if (!cbw) {
    return generic("Cannot use '" + *target + "' as the backup target of '" + *device +
                   "': it must be writable and at least as large");
  }
  auto node = std::make_shared<fleece::CbwNode>(filter_name, file_node, target_node, cbw);
  (void)graph_.add(node);
  // Called with the gate paused (run_actions): this is the point in time.
  raw->set_child(node);
  jobs_[id] = Job{id, raw, target_node, node};
  log().info("blockdev-backup: job '{}' fleeces '{}' into '{}' (filter '{}')", id, *device, *target,
             filter_name);
  Applied done;
  done.undo = [this, id, raw, file_node, node, filter_name] {
    raw->set_child(file_node);
    graph_.remove(filter_name);
    jobs_.erase(id);
    node->cbw()->release();
  };
  return done;
}

CommandResult ControlPlane::cmd_blockdev_backup(Args& a) {
  return run_actions({[this, &a] { return act_blockdev_backup(a); }});
}

json::object ControlPlane::job_info(const Job& job) const {
  json::object o;
  o["device"] = job.id;
  o["type"] = "backup";
  o["len"] = job.raw->size();
  o["offset"] = job.filter->cbw()->stats().copied_bytes;
  o["speed"] = 0;
  return o;
}

CommandResult ControlPlane::cmd_query_block_jobs(Args& a) {
  if (!a.finish()) return {json::object(), a.error()};
  json::array out;
  for (const auto& [id, job] : jobs_) {
    json::object o = job_info(job);
    o["auto-finalize"] = true;
    o["auto-dismiss"] = true;
    o["io-status"] = "ok";
    o["busy"] = false;
    o["paused"] = false;
    o["ready"] = false;
    o["status"] = "running";
    out.push_back(std::move(o));
  }
  return CommandResult::ok(std::move(out));
}

CommandResult ControlPlane::cmd_block_job_cancel(Args& a, EventSink& events) {
  auto device = a.string("device", true);
  a.boolean("force", false);
  if (!a.finish()) return {json::object(), a.error()};
  auto it = jobs_.find(*device);
  if (it == jobs_.end()) {
    return CommandResult::fail("Block job '" + *device + "' not found", "DeviceNotActive");
  }
  Job job = it->second;
  auto status = [&](const char* s) {
    json::object d;
    d["status"] = s;
    d["id"] = job.id;
    events.emit("JOB_STATUS_CHANGE", std::move(d));
  };
  status("aborting");
  json::object info = job_info(job);
  {
    block::GatePause pause(graph_.gate());
    job.raw->set_child(job.filter->file());
    graph_.remove(job.filter->name());
    jobs_.erase(it);
  }
  // No writer goes through the filter any more: end the snapshot and give
  // the scratch space back. A snapshot-access node still over it reads EIO.
  job.filter->cbw()->release();
  log().info("block-job-cancel: job '{}' ended; '{}' writes go straight to '{}'", job.id,
             job.raw->name(), job.filter->file()->name());
  events.emit("BLOCK_JOB_CANCELLED", std::move(info));
  status("concluded");
  status("null");
  return CommandResult::ok();
}

}  // namespace fleeced::server::control
