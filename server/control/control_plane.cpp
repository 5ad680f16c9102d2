// SPDX-License-Identifier: MIT
// Block-graph, NBD-server and export commands. Error texts follow QEMU 7.2
// (shared control-api.md §3); every handler validates all arguments before it
// changes anything.
#include "server/control/control_plane.hpp"

#include <cstring>

#include "block/blkdebug.hpp"
#include "block/file_device.hpp"
#include "protocol/nbd.hpp"
#include "server/log.hpp"

namespace fleeced::server::control {

namespace {

std::string not_found_node(std::string_view name) {
  return "Cannot find device='' nor node-name='" + std::string(name) + "'";
}

json::object bitmap_info(const block::NodeBitmap& b) {
  json::object o;
  o["name"] = b.name;
  o["recording"] = b.recording;
  o["persistent"] = b.persistent != nullptr;
  o["busy"] = b.busy > 0;
  o["granularity"] = b.bits->granularity();
  o["count"] = b.bits->count_bytes();
  return o;
}

}  // namespace

ControlPlane::ControlPlane(Server& server, ExportRegistry& registry)
    : server_(server), registry_(registry), default_max_connections_(server.max_connections()) {}

void ControlPlane::register_commands(CommandTable& table, std::function<void()> on_quit) {
  auto simple = [this](CommandResult (ControlPlane::*fn)(Args&)) {
    return [this, fn](Args& a, EventSink&) { return (this->*fn)(a); };
  };
  auto with_events = [this](CommandResult (ControlPlane::*fn)(Args&, EventSink&)) {
    return [this, fn](Args& a, EventSink& e) { return (this->*fn)(a, e); };
  };
  table.add("blockdev-add", simple(&ControlPlane::cmd_blockdev_add));
  table.add("blockdev-del", simple(&ControlPlane::cmd_blockdev_del));
  table.add("query-named-block-nodes", simple(&ControlPlane::cmd_query_named_block_nodes));
  table.add("nbd-server-start", simple(&ControlPlane::cmd_nbd_server_start));
  table.add("nbd-server-stop", with_events(&ControlPlane::cmd_nbd_server_stop));
  table.add("block-export-add", simple(&ControlPlane::cmd_block_export_add));
  table.add("block-export-del", with_events(&ControlPlane::cmd_block_export_del));
  table.add("query-block-exports", simple(&ControlPlane::cmd_query_block_exports));
  table.add("transaction", with_events(&ControlPlane::cmd_transaction));
  table.add("blockdev-reopen", simple(&ControlPlane::cmd_blockdev_reopen));
  table.add("blockdev-backup", simple(&ControlPlane::cmd_blockdev_backup));
  table.add("query-block-jobs", simple(&ControlPlane::cmd_query_block_jobs));
  table.add("block-job-cancel", with_events(&ControlPlane::cmd_block_job_cancel));
  for (const char* type :
       {"block-dirty-bitmap-add", "block-dirty-bitmap-remove", "block-dirty-bitmap-clear",
        "block-dirty-bitmap-enable", "block-dirty-bitmap-disable", "block-dirty-bitmap-merge"}) {
    std::string t = type;
    table.add(t, [this, t](Args& a, EventSink&) {
      return run_actions({[this, t, &a] { return act_bitmap(t, a); }});
    });
  }
  register_tls_commands(table);
  table.add("quit", [on_quit = std::move(on_quit)](Args& a, EventSink&) {
    if (!a.finish()) return CommandResult{json::object(), a.error()};
    on_quit();
    return CommandResult::ok();
  });
}

block::DevicePtr ControlPlane::add_command_line_disk(const std::string& name,
                                                     const std::string& filename, bool writable,
                                                     bool direct, bool discard,
                                                     std::error_code& ec) {
  auto device = block::FileDevice::open(
      {.path = filename, .writable = writable, .direct = direct, .discard = discard}, ec);
  if (!device) return nullptr;
  auto file = std::make_shared<block::FileNode>(name + "-file", filename, device);
  auto raw = std::make_shared<block::RawNode>(name, file, discard, filename, graph_.gate());
  if ((ec = graph_.add(file)) || (ec = graph_.add(raw))) return nullptr;
  std::string error;
  auto loaded = load_persistent_bitmaps(filename, device->size(), error);
  if (!loaded) {
    // The export still works; the bitmaps stay on disk untouched for a later start.
    log().error("node '{}': {}", name, error);
    loaded.emplace();
  }
  for (auto& b : *loaded) {
    log().info("node '{}': loaded persistent bitmap '{}' ({} dirty bytes)", name, b->name,
               b->bits->count_bytes());
    raw->add_bitmap(b);
  }
  return raw;
}

std::optional<std::vector<block::NodeBitmapPtr>> ControlPlane::load_persistent_bitmaps(
    const std::string& image_path, uint64_t disk_size, std::string& error) {
  std::vector<block::NodeBitmapPtr> out;
  for (const auto& path : block::PersistentBitmap::list(image_path)) {
    std::error_code ec;
    auto pb = block::PersistentBitmap::open(path, ec);
    if (!pb) {
      error = "Could not load persistent bitmap '" + path + "': " + ec.message();
      return std::nullopt;
    }
    if (pb->bitmap().disk_size() != disk_size) {
      error = "Persistent bitmap '" + path + "' does not match the size of '" + image_path + "'";
      return std::nullopt;
    }
    auto b = std::make_shared<block::NodeBitmap>();
    b->name = pb->name();
    b->recording = pb->recording();
    b->persistent = std::shared_ptr<block::PersistentBitmap>(std::move(pb));
    b->bits = std::shared_ptr<block::DirtyBitmap>(b->persistent, &b->persistent->bitmap());
    out.push_back(std::move(b));
  }
  return out;
}

// blkdebug: {"image": NODE, "inject-error": [{"event": E, "iotype": T,
// "errno": N, "sector": S, "once": B}], "x-delay-ms": MS}. A testing driver:
// QEMU's syntax for the rules it has, plus x-delay-ms (delays every write).
CommandResult ControlPlane::blockdev_add_blkdebug(const std::string& node_name, Args& a) {
  auto image = a.string("image", true);
  const json::array* inject = a.array("inject-error", false);
  auto delay = a.uint32("x-delay-ms", false);
  for (const char* k :
       {"config", "align", "set-state", "read-only", "auto-read-only", "cache", "discard"}) {
    a.allow(k);
  }
  if (!a.finish()) return {json::object(), a.error()};
  if (graph_.find(node_name)) {
    return CommandResult::fail("Duplicate nodes with node-name='" + node_name + "'");
  }
  std::vector<block::InjectRule> rules;
  if (inject) {
    for (std::size_t i = 0; i < inject->size(); ++i) {
      const std::string prefix = "inject-error[" + std::to_string(i) + "].";
      if (!(*inject)[i].is_object()) {
        return CommandResult::fail("Invalid parameter type for 'inject-error[" + std::to_string(i) +
                                   "]', expected: object");
      }
      Args r(&(*inject)[i].as_object(), prefix);
      r.string("event", true);
      auto iotype = r.enumeration(
          "iotype", {"read", "write", "write-zeroes", "discard", "flush", "block-status"}, false);
      auto err = r.int64("errno", false);
      auto sector = r.int64("sector", false);
      auto once = r.boolean("once", false);
      r.allow("state");
      r.allow("immediately");
      if (!r.finish()) return {json::object(), r.error()};
      block::InjectRule rule;
      if (iotype == "read") rule.types = {block::IoType::read};
      if (iotype == "write") rule.types = {block::IoType::write};
      if (iotype == "write-zeroes") rule.types = {block::IoType::write_zeroes};
      if (iotype == "discard") rule.types = {block::IoType::discard};
      if (iotype == "flush") rule.types = {block::IoType::flush};
      rule.error = static_cast<int>(err.value_or(5));
      rule.sector = sector.value_or(-1);
      rule.once = once.value_or(false);
      rules.push_back(rule);
    }
  }
  QmpError qerr;
  block::NodePtr child = node_or_error(*image, qerr);
  if (!child) return {json::object(), qerr};
  auto device = std::make_shared<block::BlkdebugDevice>(
      child->device(), std::move(rules), std::chrono::milliseconds(delay.value_or(0)));
  (void)graph_.add(std::make_shared<block::BlkdebugNode>(node_name, child, device));
  log().info("blockdev-add: blkdebug node '{}' over '{}'", node_name, *image);
  return CommandResult::ok();
}

void ControlPlane::adopt_command_line_export(ExportPtr e) {
  exports_[e->name] = QmpExport{e->name, e->name, e->name, {}, e, true};
}

block::NodePtr ControlPlane::node_or_error(std::string_view name, QmpError& err) const {
  block::NodePtr n = graph_.find(name);
  if (!n) err.desc = not_found_node(name);
  return n;
}

// ---- blockdev-add / blockdev-del / query-named-block-nodes ----

CommandResult ControlPlane::cmd_blockdev_add(Args& a) {
  auto driver = a.enumeration(
      "driver", {"file", "raw", "qcow2", "copy-before-write", "snapshot-access", "nbd", "blkdebug"},
      true);
  auto node_name = a.string("node-name", true);
  if (!a.ok()) return {json::object(), a.error()};
  if (*driver == "file") {
    auto filename = a.string("filename", true);
    auto discard = a.enumeration("discard", {"ignore", "unmap"}, false);
    auto read_only = a.boolean("read-only", false);
    a.allow("cache");
    a.allow("aio");
    a.allow("auto-read-only");
    if (!a.finish()) return {json::object(), a.error()};
    if (graph_.find(*node_name)) {
      return CommandResult::fail("Duplicate nodes with node-name='" + *node_name + "'");
    }
    std::error_code ec;
    auto device = block::FileDevice::open({.path = *filename,
                                           .writable = !read_only.value_or(false),
                                           .direct = false,
                                           .discard = discard.value_or("ignore") == "unmap"},
                                          ec);
    if (!device) {
      return CommandResult::fail("Could not open '" + *filename + "': " + ec.message());
    }
    (void)graph_.add(std::make_shared<block::FileNode>(*node_name, *filename, device));
    log().info("blockdev-add: file node '{}' -> {}", *node_name, *filename);
    return CommandResult::ok();
  }
  if (*driver == "raw") {
    auto file = a.string("file", true);
    auto discard = a.enumeration("discard", {"ignore", "unmap"}, false);
    a.allow("read-only");
    a.allow("cache");
    a.allow("auto-read-only");
    if (!a.finish()) return {json::object(), a.error()};
    if (graph_.find(*node_name)) {
      return CommandResult::fail("Duplicate nodes with node-name='" + *node_name + "'");
    }
    QmpError err;
    block::NodePtr child = node_or_error(*file, err);
    if (!child) return {json::object(), err};
    std::string image_path;
    if (auto f = std::dynamic_pointer_cast<block::FileNode>(child)) image_path = f->filename();
    // Persistent bitmaps stored beside the image come back with the node.
    std::vector<block::NodeBitmapPtr> loaded;
    if (!image_path.empty()) {
      std::string error;
      auto found = load_persistent_bitmaps(image_path, child->device()->size(), error);
      if (!found) return CommandResult::fail(error);
      loaded = std::move(*found);
    }
    auto raw = std::make_shared<block::RawNode>(
        *node_name, child, discard.value_or("ignore") == "unmap", image_path, graph_.gate());
    for (auto& b : loaded) {
      log().info("node '{}': loaded persistent bitmap '{}' ({} dirty bytes)", *node_name, b->name,
                 b->bits->count_bytes());
      raw->add_bitmap(b);
    }
    (void)graph_.add(raw);
    log().info("blockdev-add: raw node '{}' over '{}'", *node_name, *file);
    return CommandResult::ok();
  }
  if (*driver == "blkdebug") return blockdev_add_blkdebug(*node_name, a);
  if (*driver == "copy-before-write") return blockdev_add_cbw(*node_name, a);
  if (*driver == "snapshot-access") return blockdev_add_snapshot_access(*node_name, a);
  return CommandResult::fail("Driver '" + *driver + "' is not supported yet");
}

CommandResult ControlPlane::cmd_blockdev_del(Args& a) {
  auto node_name = a.string("node-name", true);
  if (!a.finish()) return {json::object(), a.error()};
  block::NodePtr n = graph_.find(*node_name);
  if (!n) return CommandResult::fail("Failed to find node with node-name='" + *node_name + "'");
  for (const auto& [id, e] : exports_) {
    if (e.node == *node_name) return CommandResult::fail("Node " + *node_name + " is in use");
  }
  for (const auto& e : registry_.list()) {
    if (e->device == n->device()) return CommandResult::fail("Node " + *node_name + " is in use");
  }
  if (const std::string job = job_using(*n); !job.empty()) {
    // QEMU 7.2: the job's filter is "in use"; its target is "busy".
    if (std::dynamic_pointer_cast<fleece::CbwNode>(n)) {
      return CommandResult::fail("Node " + *node_name + " is in use");
    }
    return CommandResult::fail("Node '" + *node_name +
                               "' is busy: block device is in use by block job: backup");
  }
  if (const auto parents = graph_.parents_of(*n); !parents.empty()) {
    // A node that is some format node's "file" child is a "block device".
    bool file_child = n->driver() == "file";
    for (const auto& p : parents) {
      if (auto raw = std::dynamic_pointer_cast<block::RawNode>(p); raw && raw->child() == n) {
        file_child = true;
      }
    }
    if (file_child) return CommandResult::fail("Block device " + *node_name + " is in use");
    return CommandResult::fail("Node " + *node_name + " is in use");
  }
  graph_.remove(*node_name);
  if (auto cbw = std::dynamic_pointer_cast<fleece::CbwNode>(n)) {
    // The fleece is over: the scratch space goes back.
    cbw->cbw()->release();
  }
  log().info("blockdev-del: node '{}'", *node_name);
  return CommandResult::ok();
}

CommandResult ControlPlane::cmd_query_named_block_nodes(Args& a) {
  a.boolean("flat", false);
  if (!a.finish()) return {json::object(), a.error()};
  json::array out;
  for (const auto& n : graph_.list()) {
    json::object o;
    o["node-name"] = n->name();
    o["drv"] = n->driver();
    o["ro"] = n->device()->capabilities().read_only;
    o["write_threshold"] = 0;
    // As QEMU: "image" carries the virtual size (backup tools size their
    // scratch files from it).
    json::object image{{"virtual-size", n->device()->size()}, {"format", n->driver()}};
    if (auto f = std::dynamic_pointer_cast<block::FileNode>(n)) {
      o["file"] = f->filename();
      image["filename"] = f->filename();
    }
    if (auto raw = std::dynamic_pointer_cast<block::RawNode>(n)) {
      if (auto f = std::dynamic_pointer_cast<block::FileNode>(raw->child())) {
        o["file"] = f->filename();
        image["filename"] = f->filename();
      }
      if (!raw->bitmaps().empty()) {
        json::array bitmaps;
        for (const auto& b : raw->bitmaps()) bitmaps.push_back(bitmap_info(*b));
        o["dirty-bitmaps"] = std::move(bitmaps);
      }
    }
    o["image"] = std::move(image);
    out.push_back(std::move(o));
  }
  return CommandResult::ok(std::move(out));
}

// ---- NBD server and exports ----

CommandResult ControlPlane::cmd_nbd_server_start(Args& a) {
  const json::object* addr = a.object("addr", true);
  auto tls_creds = a.string("tls-creds", false);
  auto tls_authz = a.string("tls-authz", false);
  auto max_connections = a.uint32("max-connections", false);
  if (!a.finish()) return {json::object(), a.error()};
  Args addr_args(addr, "addr.");
  auto type = addr_args.enumeration("type", {"unix", "inet", "vsock", "fd"}, true);
  const json::object* data = addr_args.object("data", true);
  if (!addr_args.finish()) return {json::object(), addr_args.error()};
  ListenAddress address;
  Args data_args(data, "addr.data.");
  if (*type == "unix") {
    auto path = data_args.string("path", true);
    data_args.allow("abstract");
    data_args.allow("tight");
    if (!data_args.finish()) return {json::object(), data_args.error()};
    address.kind = ListenAddress::Kind::unix_socket;
    address.path = *path;
  } else if (*type == "inet") {
    auto host = data_args.string("host", true);
    auto port = data_args.string("port", true);
    for (const char* k : {"numeric", "to", "ipv4", "ipv6", "keep-alive"}) data_args.allow(k);
    if (!data_args.finish()) return {json::object(), data_args.error()};
    std::string err;
    if (!parse_listen_address("tcp:" + *host + ":" + *port, address, err)) {
      return CommandResult::fail(err);
    }
  } else {
    return CommandResult::fail("Socket address type '" + *type + "' is not supported");
  }
  if (nbd_address_) return CommandResult::fail("NBD server already running");
  std::shared_ptr<const TlsPolicy> tls;
  if (auto err = tls_policy(tls_creds, tls_authz, tls)) return {json::object(), *err};
  if (std::error_code ec = server_.listen_now(address, tls)) {
    return CommandResult::fail("Failed to bind socket to " + address.to_string() + ": " +
                               ec.message());
  }
  // Without max-connections the command line's limit applies again.
  server_.set_max_connections(max_connections ? *max_connections : default_max_connections_);
  nbd_address_ = address;
  return CommandResult::ok();
}

void ControlPlane::delete_export(QmpExport& e, EventSink& events) {
  e.exported->state->closing.store(true);
  server_.disconnect_export(e.exported->state.get());
  registry_.remove(e.name);
  for (auto& b : e.bitmaps) --b->busy;
  log().info("export '{}' (id '{}') deleted", e.name, e.id);
  json::object data;
  data["id"] = e.id;
  std::string id = e.id;
  exports_.erase(id);
  events.emit("BLOCK_EXPORT_DELETED", std::move(data));
}

CommandResult ControlPlane::cmd_nbd_server_stop(Args& a, EventSink& events) {
  if (!a.finish()) return {json::object(), a.error()};
  if (!nbd_address_) return CommandResult::fail("NBD server not running");
  for (auto it = exports_.begin(); it != exports_.end();) {
    auto next = std::next(it);
    if (!it->second.from_command_line) delete_export(it->second, events);
    it = next;
  }
  server_.close_listener(*nbd_address_);
  nbd_address_.reset();
  return CommandResult::ok();
}

CommandResult ControlPlane::cmd_block_export_add(Args& a) {
  a.enumeration("type", {"nbd", "vhost-user-blk", "fuse", "vduse-blk"}, true);
  auto id = a.string("id", true);
  auto node_name = a.string("node-name", true);
  auto name = a.string("name", false);
  auto description = a.string("description", false);
  auto writable = a.boolean("writable", false);
  auto allocation_depth = a.boolean("allocation-depth", false);
  const json::array* bitmaps = a.array("bitmaps", false);
  a.boolean("writethrough", false);
  a.string("iothread", false);
  a.boolean("fixed-iothread", false);
  if (!a.finish()) return {json::object(), a.error()};
  if (!nbd_address_ && !command_line_listeners_) {
    return CommandResult::fail("NBD server not running");
  }
  if (exports_.count(*id)) {
    return CommandResult::fail("Block export id '" + *id + "' is already in use");
  }
  const std::string export_name = name.value_or(*node_name);
  if (export_name.size() > protocol::kMaxStringLength) {
    return CommandResult::fail("export name '" + export_name.substr(0, 80) + "...' too long");
  }
  if (description && description->size() > protocol::kMaxStringLength) {
    return CommandResult::fail("description '" + description->substr(0, 80) + "...' too long");
  }
  if (registry_.find(export_name)) {
    return CommandResult::fail("NBD server already has export named '" + export_name + "'");
  }
  if (allocation_depth.value_or(false)) {
    return CommandResult::fail("allocation-depth is not supported");
  }
  QmpError err;
  block::NodePtr node = node_or_error(*node_name, err);
  if (!node) return {json::object(), err};
  if (writable.value_or(false) && node->device()->capabilities().read_only) {
    return CommandResult::fail("Cannot export read-only node '" + *node_name + "' as writable");
  }
  std::vector<block::NodeBitmapPtr> chosen;
  if (bitmaps) {
    for (std::size_t i = 0; i < bitmaps->size(); ++i) {
      const json::value& item = (*bitmaps)[i];
      std::string bnode, bname;
      bool string_form = item.is_string();
      if (string_form) {
        bnode = *node_name;
        bname = std::string(item.as_string());
      } else if (item.is_object()) {
        Args ref(&item.as_object(), "bitmaps[" + std::to_string(i) + "].");
        auto n = ref.string("node", true);
        auto nm = ref.string("name", true);
        if (!ref.finish()) return {json::object(), ref.error()};
        bnode = *n;
        bname = *nm;
      } else {
        return CommandResult::fail("Invalid parameter type for 'bitmaps[" + std::to_string(i) +
                                   "]', expected: BlockDirtyBitmapOrStr");
      }
      auto raw = graph_.find_raw(bnode);
      block::NodeBitmapPtr b = raw ? raw->find_bitmap(bname) : nullptr;
      if (!b) return CommandResult::fail("Bitmap '" + bname + "' is not found");
      if (b->busy > 0) {
        return CommandResult::fail("Bitmap '" + bname +
                                   "' is currently in use by another operation and cannot be "
                                   "used");
      }
      if (string_form && b->recording && !writable.value_or(false)) {
        return CommandResult::fail("Enabled bitmap '" + bname +
                                   "' incompatible with readonly export");
      }
      if (b->bits->disk_size() != node->device()->size()) {
        return CommandResult::fail("Bitmap '" + bname + "' does not match the export's size");
      }
      for (const auto& c : chosen) {
        if (c->name == bname) {
          return CommandResult::fail("Bitmap '" + bname + "' is listed twice");
        }
      }
      chosen.push_back(b);
    }
  }
  auto e = std::make_shared<Export>();
  e->name = export_name;
  e->description = description.value_or("");
  e->device = node->device();
  e->writable = writable.value_or(false);
  for (const auto& b : chosen) {
    std::weak_ptr<block::DirtyBitmap> bits = b->bits;
    e->meta_contexts.push_back(MetaContextSource{
        .name = protocol::kContextDirtyBitmapPrefix + b->name,
        .extents = [bits = b->bits](uint64_t offset, uint64_t length,
                                    std::vector<block::Extent>& out) -> std::error_code {
          bits->extents(offset, length, protocol::kMaxExtentsPerChunk, out);
          return {};
        },
        .on_release = nullptr,
        .nonblocking = true});
  }
  if (std::error_code ec = registry_.add(e)) {
    return CommandResult::fail("NBD server already has export named '" + export_name + "'");
  }
  for (auto& b : chosen) ++b->busy;
  exports_[*id] = QmpExport{*id, export_name, *node_name, chosen, e};
  log().info("export '{}' (id '{}') of node '{}' {} with {} bitmap(s)", export_name, *id,
             *node_name, e->writable ? "writable" : "read-only", chosen.size());
  return CommandResult::ok();
}

CommandResult ControlPlane::cmd_block_export_del(Args& a, EventSink& events) {
  auto id = a.string("id", true);
  auto mode = a.enumeration("mode", {"safe", "hard"}, false);
  if (!a.finish()) return {json::object(), a.error()};
  auto it = exports_.find(*id);
  if (it == exports_.end()) return CommandResult::fail("Export '" + *id + "' is not found");
  QmpExport& e = it->second;
  if (mode.value_or("safe") == "safe") {
    // Mark it closing before looking at the client count: a client that
    // chooses the export concurrently either is counted here or sees the
    // mark and is refused (Connection::claim_export).
    e.exported->state->closing.store(true);
    if (e.exported->state->clients.load() > 0) {
      e.exported->state->closing.store(false);
      return CommandResult::fail("export '" + e.id + "' still in use");
    }
  }
  delete_export(e, events);
  return CommandResult::ok();
}

CommandResult ControlPlane::cmd_query_block_exports(Args& a) {
  if (!a.finish()) return {json::object(), a.error()};
  json::array out;
  for (const auto& [id, e] : exports_) {
    json::object o;
    o["id"] = id;
    o["type"] = "nbd";
    o["node-name"] = e.node;
    o["shutting-down"] = false;
    out.push_back(std::move(o));
  }
  return CommandResult::ok(std::move(out));
}

}  // namespace fleeced::server::control
