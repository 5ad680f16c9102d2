// SPDX-License-Identifier: MIT
// ControlPlane owns the block graph and the control-side state (QMP exports,
// the QMP-started NBD server) and registers every QMP command handler. All
// handlers run on the control thread, one at a time; they validate every
// argument before changing anything.
#pragma once

#include <map>
#include <memory>
#include <optional>
#include <string>
#include <variant>

#include "block/node_graph.hpp"
#include "fleece/nodes.hpp"
#include "server/control/qmp.hpp"
#include "server/export_registry.hpp"
#include "server/server.hpp"

namespace fleeced::server {
struct TlsPolicy;
class TlsCredsHandle;
}  // namespace fleeced::server

namespace fleeced::server::control {

struct TlsObjects;

class ControlPlane {
 public:
  ControlPlane(Server& server, ExportRegistry& registry);

  // Registers the commands; `quit` calls on_quit.
  void register_commands(CommandTable& table, std::function<void()> on_quit);

  // Builds "NAME-file" (file) and "NAME" (raw) nodes for a command-line
  // export and returns the raw node's device. Before the server runs.
  block::DevicePtr add_command_line_disk(const std::string& name, const std::string& filename,
                                         bool writable, bool direct, bool discard,
                                         std::error_code& ec);

  // A command-line export: listed by query-block-exports (id = name) and
  // deletable with block-export-del; nbd-server-stop leaves it alone.
  void adopt_command_line_export(ExportPtr e);
  // --listen addresses exist: block-export-add works without nbd-server-start.
  void set_command_line_listeners(bool present) { command_line_listeners_ = present; }

  block::NodeGraph& graph() { return graph_; }

  // Re-reads every server credentials object (SIGHUP); failures keep the
  // old credentials and are logged. Control thread.
  void reload_tls_objects();

 private:
  // A fleecing backup job (blockdev-backup sync=none): its filter sits
  // between `raw` and raw's former file child until the job is cancelled.
  struct Job {
    std::string id;
    std::shared_ptr<block::RawNode> raw;
    block::NodePtr target;
    std::shared_ptr<fleece::CbwNode> filter;
  };
  // Id of the job using `node` as target or filter ("" if none).
  std::string job_using(const block::Node& node) const;
  json::object job_info(const Job& job) const;

  struct QmpExport {
    std::string id;
    std::string name;  // NBD export name
    std::string node;
    std::vector<block::NodeBitmapPtr> bitmaps;  // marked busy while exported
    ExportPtr exported;
    bool from_command_line = false;
  };

  // Handlers (server/control/*_commands.cpp).
  CommandResult cmd_blockdev_add(Args& a);
  CommandResult cmd_blockdev_del(Args& a);
  CommandResult cmd_query_named_block_nodes(Args& a);
  CommandResult cmd_nbd_server_start(Args& a);
  CommandResult cmd_nbd_server_stop(Args& a, EventSink& events);
  CommandResult cmd_block_export_add(Args& a);
  CommandResult cmd_block_export_del(Args& a, EventSink& events);
  CommandResult cmd_query_block_exports(Args& a);
  CommandResult cmd_transaction(Args& a, EventSink& events);
  // Fleecing (server/control/fleece_commands.cpp).
  CommandResult blockdev_add_blkdebug(const std::string& node_name, Args& a);
  CommandResult blockdev_add_cbw(const std::string& node_name, Args& a);
  CommandResult blockdev_add_snapshot_access(const std::string& node_name, Args& a);
  CommandResult cmd_blockdev_reopen(Args& a);
  CommandResult cmd_blockdev_backup(Args& a);
  CommandResult cmd_query_block_jobs(Args& a);
  CommandResult cmd_block_job_cancel(Args& a, EventSink& events);
  // TLS objects (server/control/tls_commands.cpp).
  void register_tls_commands(CommandTable& table);
  CommandResult cmd_object_add(Args& a);
  CommandResult cmd_object_del(Args& a);
  CommandResult cmd_tls_reload(Args& a);
  std::shared_ptr<TlsCredsHandle> server_creds_or_error(const std::string& id, QmpError& err) const;
  // nbd-server-start's tls-creds and tls-authz as a listener policy (null
  // without tls-creds).
  std::optional<QmpError> tls_policy(const std::optional<std::string>& creds_id,
                                     const std::optional<std::string>& authz_id,
                                     std::shared_ptr<const TlsPolicy>& out) const;

  // A bitmap action applied now; `undo` reverts it (transaction rollback).
  struct Applied {
    std::function<void()> undo;    // reverts the in-memory change
    std::function<void()> commit;  // makes it durable once every action succeeded
  };
  using ActionResult = std::variant<Applied, QmpError>;
  ActionResult act_bitmap(std::string_view type, Args& a);
  ActionResult act_bitmap_add(Args& a);
  ActionResult act_bitmap_remove(Args& a);
  ActionResult act_bitmap_clear(Args& a);
  ActionResult act_bitmap_enable(Args& a, bool enable);
  ActionResult act_bitmap_merge(Args& a);
  ActionResult act_blockdev_backup(Args& a);
  CommandResult run_actions(const std::vector<std::function<ActionResult()>>& actions);

  // Lookup helpers producing QEMU's error texts.
  block::NodePtr node_or_error(std::string_view name, QmpError& err) const;
  block::NodeBitmapPtr bitmap_or_error(std::string_view node, std::string_view name,
                                       QmpError& err) const;
  void delete_export(QmpExport& e, EventSink& events);
  // Persistent bitmaps stored beside image_path; nullopt (and error) if one
  // cannot be loaded or does not match disk_size.
  static std::optional<std::vector<block::NodeBitmapPtr>> load_persistent_bitmaps(
      const std::string& image_path, uint64_t disk_size, std::string& error);

  Server& server_;
  ExportRegistry& registry_;
  block::NodeGraph graph_;
  std::map<std::string, QmpExport> exports_;  // by id
  std::map<std::string, Job> jobs_;           // by job id
  std::optional<ListenAddress> nbd_address_;  // the QMP-started NBD server
  unsigned default_max_connections_;          // --max-connections
  bool command_line_listeners_ = false;
  std::shared_ptr<TlsObjects> tls_objects_;  // object-add'ed TLS objects
};

}  // namespace fleeced::server::control
