// SPDX-License-Identifier: MIT
// block-dirty-bitmap-* commands and transaction. Every action is applied with
// the graph's I/O gate paused (so a transaction is one instant for writers)
// and returns an undo; a failing action rolls the earlier ones back.
#include <bit>

#include "server/control/control_plane.hpp"
#include "server/log.hpp"

namespace fleeced::server::control {

namespace {

constexpr std::size_t kMaxBitmapName = 1023;
constexpr uint32_t kDefaultGranularity = 65536;

std::string busy_text(std::string_view name) {
  return "Bitmap '" + std::string(name) +
         "' is currently in use by another operation and cannot be used";
}

QmpError generic(std::string desc) { return QmpError{"GenericError", std::move(desc)}; }

}  // namespace

block::NodeBitmapPtr ControlPlane::bitmap_or_error(std::string_view node, std::string_view name,
                                                   QmpError& err) const {
  block::NodePtr n = graph_.find(node);
  if (!n) {
    err = generic("Cannot find device='" + std::string(node) + "' nor node-name='" +
                  std::string(node) + "'");
    return nullptr;
  }
  auto raw = std::dynamic_pointer_cast<block::RawNode>(n);
  block::NodeBitmapPtr b = raw ? raw->find_bitmap(name) : nullptr;
  if (!b) err = generic("Dirty bitmap '" + std::string(name) + "' not found");
  return b;
}

ControlPlane::ActionResult ControlPlane::act_bitmap(std::string_view type, Args& a) {
  if (type == "block-dirty-bitmap-add") return act_bitmap_add(a);
  if (type == "block-dirty-bitmap-remove") return act_bitmap_remove(a);
  if (type == "block-dirty-bitmap-clear") return act_bitmap_clear(a);
  if (type == "block-dirty-bitmap-enable") return act_bitmap_enable(a, true);
  if (type == "block-dirty-bitmap-disable") return act_bitmap_enable(a, false);
  if (type == "block-dirty-bitmap-merge") return act_bitmap_merge(a);
  return generic("Parameter 'type' does not accept value '" + std::string(type) + "'");
}

ControlPlane::ActionResult ControlPlane::act_bitmap_add(Args& a) {
  auto node = a.string("node", true);
  auto name = a.string("name", true);
  auto granularity = a.uint32("granularity", false);
  auto persistent = a.boolean("persistent", false);
  auto disabled = a.boolean("disabled", false);
  if (!a.finish()) return a.error();
  block::NodePtr n = graph_.find(*node);
  if (!n) {
    return generic("Cannot find device='" + *node + "' nor node-name='" + *node + "'");
  }
  auto raw = std::dynamic_pointer_cast<block::RawNode>(n);
  if (!raw) {
    return generic("Dirty bitmaps are supported on raw format nodes only ('" + *node + "' is a " +
                   n->driver() + " node)");
  }
  if (name->empty()) return generic("Bitmap name cannot be empty");
  if (name->size() > kMaxBitmapName) return generic("Bitmap name too long: " + *name);
  if (raw->find_bitmap(*name)) return generic("Bitmap already exists: " + *name);
  const uint32_t g = granularity.value_or(kDefaultGranularity);
  if (g < 512 || !std::has_single_bit(g)) {
    return generic("Granularity must be power of 2 and at least 512");
  }
  const bool recording = !disabled.value_or(false);
  auto b = std::make_shared<block::NodeBitmap>();
  b->name = *name;
  b->recording = recording;
  const uint64_t size = raw->size();
  if (persistent.value_or(false)) {
    if (raw->image_path().empty()) {
      return generic("Can't store persistent bitmaps to " + *node + ": Operation not supported");
    }
    std::error_code ec;
    auto pb = block::PersistentBitmap::create(raw->image_path(), *name, size, g, recording, ec);
    if (!pb) {
      return generic("Can't store persistent bitmap '" + *name + "' beside '" + raw->image_path() +
                     "': " + ec.message());
    }
    b->persistent = std::shared_ptr<block::PersistentBitmap>(std::move(pb));
    b->bits = std::shared_ptr<block::DirtyBitmap>(b->persistent, &b->persistent->bitmap());
  } else {
    b->bits = std::make_shared<block::DirtyBitmap>(size, g);
  }
  raw->add_bitmap(b);
  log().info("bitmap '{}' added on '{}' (granularity {}, {}{})", *name, *node, g,
             b->persistent ? "persistent" : "in memory", recording ? "" : ", disabled");
  Applied done;
  done.undo = [raw, b] {
    raw->remove_bitmap(b->name);
    if (b->persistent) (void)b->persistent->remove_file();
  };
  return done;
}

ControlPlane::ActionResult ControlPlane::act_bitmap_remove(Args& a) {
  auto node = a.string("node", true);
  auto name = a.string("name", true);
  if (!a.finish()) return a.error();
  QmpError err;
  block::NodeBitmapPtr b = bitmap_or_error(*node, *name, err);
  if (!b) return err;
  if (b->busy > 0) return generic(busy_text(*name));
  auto raw = graph_.find_raw(*node);
  raw->remove_bitmap(*name);
  Applied done;
  done.undo = [raw, b] { raw->add_bitmap(b); };
  done.commit = [b, n = *node] {
    if (b->persistent) (void)b->persistent->remove_file();
    log().info("bitmap '{}' removed from '{}'", b->name, n);
  };
  return done;
}

ControlPlane::ActionResult ControlPlane::act_bitmap_clear(Args& a) {
  auto node = a.string("node", true);
  auto name = a.string("name", true);
  if (!a.finish()) return a.error();
  QmpError err;
  block::NodeBitmapPtr b = bitmap_or_error(*node, *name, err);
  if (!b) return err;
  if (b->busy > 0) return generic(busy_text(*name));
  auto saved = std::make_shared<std::vector<uint64_t>>(b->bits->snapshot_words());
  b->bits->clear();
  Applied done;
  done.undo = [b, saved] { b->bits->load_words(*saved); };
  done.commit = [b] {
    if (b->persistent) (void)b->persistent->sync_all();
  };
  return done;
}

ControlPlane::ActionResult ControlPlane::act_bitmap_enable(Args& a, bool enable) {
  auto node = a.string("node", true);
  auto name = a.string("name", true);
  if (!a.finish()) return a.error();
  QmpError err;
  block::NodeBitmapPtr b = bitmap_or_error(*node, *name, err);
  if (!b) return err;
  if (b->busy > 0) return generic(busy_text(*name));
  const bool before = b->recording;
  b->recording = enable;
  Applied done;
  done.undo = [b, before] { b->recording = before; };
  done.commit = [b, enable] {
    if (b->persistent) (void)b->persistent->set_recording(enable);
  };
  return done;
}

ControlPlane::ActionResult ControlPlane::act_bitmap_merge(Args& a) {
  auto node = a.string("node", true);
  auto target = a.string("target", true);
  const json::array* sources = a.array("bitmaps", true);
  if (!a.finish()) return a.error();
  QmpError err;
  block::NodeBitmapPtr dst = bitmap_or_error(*node, *target, err);
  if (!dst) return err;
  if (sources->empty()) return generic("'bitmaps' must name at least one bitmap to merge");
  if (dst->busy > 0) return generic(busy_text(*target));
  std::vector<block::NodeBitmapPtr> srcs;
  for (std::size_t i = 0; i < sources->size(); ++i) {
    const json::value& item = (*sources)[i];
    std::string snode = *node, sname;
    if (item.is_string()) {
      sname = std::string(item.as_string());
    } else if (item.is_object()) {
      Args ref(&item.as_object(), "bitmaps[" + std::to_string(i) + "].");
      auto n = ref.string("node", true);
      auto nm = ref.string("name", true);
      if (!ref.finish()) return ref.error();
      snode = *n;
      sname = *nm;
    } else {
      return generic("Invalid parameter type for 'bitmaps[" + std::to_string(i) +
                     "]', expected: BlockDirtyBitmapOrStr");
    }
    block::NodeBitmapPtr s = bitmap_or_error(snode, sname, err);
    if (!s) return err;
    if (s->busy > 0) return generic(busy_text(sname));
    if (s->bits->disk_size() != dst->bits->disk_size()) {
      return generic("Bitmap '" + sname + "' has a different size than '" + *target + "'");
    }
    srcs.push_back(s);
  }
  auto saved = std::make_shared<std::vector<uint64_t>>(dst->bits->snapshot_words());
  for (const auto& s : srcs) {
    if (s == dst) continue;
    dst->bits->merge_from(*s->bits);
  }
  Applied done;
  done.undo = [dst, saved] { dst->bits->load_words(*saved); };
  done.commit = [dst] {
    if (dst->persistent) (void)dst->persistent->sync_all();
  };
  return done;
}

CommandResult ControlPlane::run_actions(const std::vector<std::function<ActionResult()>>& actions) {
  block::GatePause pause(graph_.gate());
  std::vector<Applied> applied;
  for (const auto& action : actions) {
    ActionResult r = action();
    if (auto* e = std::get_if<QmpError>(&r)) {
      for (auto it = applied.rbegin(); it != applied.rend(); ++it) {
        if (it->undo) it->undo();
      }
      return CommandResult{json::object(), *e};
    }
    applied.push_back(std::move(std::get<Applied>(r)));
  }
  for (auto& a : applied) {
    if (a.commit) a.commit();
  }
  return CommandResult::ok();
}

CommandResult ControlPlane::cmd_transaction(Args& a, EventSink&) {
  const json::array* actions = a.array("actions", true);
  const json::object* properties = a.object("properties", false);
  if (!a.finish()) return {json::object(), a.error()};
  if (properties) {
    Args p(properties, "properties.");
    p.enumeration("completion-mode", {"individual", "grouped"}, false);
    if (!p.finish()) return {json::object(), p.error()};
  }
  // Validate the envelope of every action before applying any.
  std::vector<std::pair<std::string, const json::object*>> parsed;
  for (std::size_t i = 0; i < actions->size(); ++i) {
    const json::value& item = (*actions)[i];
    if (!item.is_object()) {
      return CommandResult::fail("Invalid parameter type for 'actions[" + std::to_string(i) +
                                 "]', expected: object");
    }
    // QEMU 7.2 names the union's discriminator without its path
    // ("Parameter 'type' ...") but the other members with it
    // ("Parameter 'actions[0].data' is missing").
    Args discriminator(&item.as_object());
    auto type = discriminator.enumeration(
        "type",
        {"abort", "block-dirty-bitmap-add", "block-dirty-bitmap-remove", "block-dirty-bitmap-clear",
         "block-dirty-bitmap-enable", "block-dirty-bitmap-disable", "block-dirty-bitmap-merge",
         "blockdev-backup", "blockdev-snapshot", "blockdev-snapshot-internal-sync",
         "blockdev-snapshot-sync", "drive-backup"},
        true);
    if (!discriminator.ok()) return {json::object(), discriminator.error()};
    Args env(&item.as_object(), "actions[" + std::to_string(i) + "].");
    env.allow("type");
    const json::object* data = env.object("data", true);
    if (!env.finish()) return {json::object(), env.error()};
    parsed.emplace_back(*type, data);
  }
  std::vector<std::unique_ptr<Args>> arg_holders;
  std::vector<std::function<ActionResult()>> steps;
  for (std::size_t i = 0; i < parsed.size(); ++i) {
    const auto& [type, data] = parsed[i];
    arg_holders.push_back(std::make_unique<Args>(data, "actions[" + std::to_string(i) + "].data."));
    Args* args = arg_holders.back().get();
    std::string t = type;
    steps.push_back([this, t, args]() -> ActionResult {
      if (t == "abort") {
        if (!args->finish()) return args->error();
        return generic("Transaction aborted using Abort action");
      }
      if (t.starts_with("block-dirty-bitmap-")) return act_bitmap(t, *args);
      if (t == "blockdev-backup") return act_blockdev_backup(*args);
      return generic("Transaction action '" + t + "' is not supported");
    });
  }
  return run_actions(steps);
}

}  // namespace fleeced::server::control
