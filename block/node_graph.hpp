// SPDX-License-Identifier: MIT
// The block graph the control plane builds (QMP blockdev-add): protocol nodes
// ("file": an image file) and format nodes ("raw": a pass-through over a
// child that owns the node's dirty bitmaps and marks them on every change).
// The graph is owned by the control plane and changed from its thread only;
// devices of nodes are used by any I/O thread. Structural changes that I/O
// can observe (bitmap list, recording state, child switch) happen while the
// graph's IoGate is paused.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <system_error>
#include <vector>

#include "block/device.hpp"
#include "block/dirty_bitmap.hpp"
#include "block/io_gate.hpp"
#include "block/persistent_bitmap.hpp"

namespace fleeced::block {

// A named dirty bitmap on a node.
struct NodeBitmap {
  std::string name;
  std::shared_ptr<DirtyBitmap> bits;             // the live bits (persistent's, if any)
  std::shared_ptr<PersistentBitmap> persistent;  // null for in-memory bitmaps
  bool recording = true;                         // written while the gate is paused, read inside it
  int busy = 0;                                  // exports using it; control thread only
};
using NodeBitmapPtr = std::shared_ptr<NodeBitmap>;

class Node {
 public:
  virtual ~Node() = default;
  const std::string& name() const { return name_; }
  virtual std::string driver() const = 0;
  // The device reads and writes of this node go through.
  virtual DevicePtr device() = 0;
  // Child nodes (for "in use" checks).
  virtual std::vector<std::shared_ptr<Node>> children() const { return {}; }

 protected:
  explicit Node(std::string name) : name_(std::move(name)) {}

 private:
  std::string name_;
};
using NodePtr = std::shared_ptr<Node>;

class FileNode final : public Node {
 public:
  FileNode(std::string name, std::string filename, DevicePtr device)
      : Node(std::move(name)), filename_(std::move(filename)), device_(std::move(device)) {}
  std::string driver() const override { return "file"; }
  DevicePtr device() override { return device_; }
  const std::string& filename() const { return filename_; }

 private:
  std::string filename_;
  DevicePtr device_;
};

// A raw format node: forwards to its child, marking recording bitmaps before
// every write, write-zeroes and (with discard unmap) trim reaches the child.
class RawNode final : public Node, public Device, public std::enable_shared_from_this<RawNode> {
 public:
  RawNode(std::string name, NodePtr child, bool discard_unmap, std::string image_path,
          IoGate& gate);

  std::string driver() const override { return "raw"; }
  DevicePtr device() override { return shared_from_this(); }
  std::vector<NodePtr> children() const override { return {child_}; }
  NodePtr child() const { return child_; }
  bool discard_unmap() const { return discard_unmap_; }
  // The image file persistent bitmaps are stored beside ("" if none).
  const std::string& image_path() const { return image_path_; }

  // Bitmaps. Call with the gate paused (or before the node is in use).
  const std::vector<NodeBitmapPtr>& bitmaps() const { return bitmaps_; }
  NodeBitmapPtr find_bitmap(std::string_view name) const;
  void add_bitmap(NodeBitmapPtr b);
  void remove_bitmap(std::string_view name);
  // Switches the child (blockdev-reopen). Call with the gate paused.
  void set_child(NodePtr child);
  // blockdev-reopen may change discard too. Call with the gate paused.
  void set_discard_unmap(bool unmap) { discard_unmap_ = unmap; }

  // Device.
  uint64_t size() const override;
  Capabilities capabilities() const override;
  std::error_code read(uint64_t offset, std::span<std::byte> out) override;
  std::error_code try_read(uint64_t offset, std::span<std::byte> out) override;
  std::error_code write(uint64_t offset, std::span<const std::byte> data, bool fua) override;
  std::error_code try_write(uint64_t offset, std::span<const std::byte> data) override;
  std::error_code write_zeroes(uint64_t offset, uint64_t length, ZeroFlags flags) override;
  std::error_code discard(uint64_t offset, uint64_t length, bool fua) override;
  std::error_code flush() override;
  std::error_code cache(uint64_t offset, uint64_t length) override;
  std::error_code extents(uint64_t offset, uint64_t length, std::vector<Extent>& out) override;

 private:
  // Marks recording bitmaps; persistent ones durably. Inside the gate.
  std::error_code mark(uint64_t offset, uint64_t length);
  // True if every recording persistent bitmap already has the range durable.
  bool try_mark_durable(uint64_t offset, uint64_t length) const;
  // Marks the recording in-memory bitmaps.
  void mark_memory(uint64_t offset, uint64_t length);

  // child_device_ for callers outside the gate (under child_device_mutex_).
  DevicePtr child_device_ungated() const;

  // Changed only while the gate is paused; read inside the gate.
  NodePtr child_;
  // Also read outside the gate by size() and capabilities() (asked per
  // request): they and set_child() take child_device_mutex_.
  DevicePtr child_device_;
  mutable std::mutex child_device_mutex_;
  std::vector<NodeBitmapPtr> bitmaps_;
  bool discard_unmap_;
  // Immutable.
  std::string image_path_;
  IoGate& gate_;
};

// The node table. Control thread only.
class NodeGraph {
 public:
  IoGate& gate() { return gate_; }
  NodePtr find(std::string_view name) const;
  std::shared_ptr<RawNode> find_raw(std::string_view name) const;
  // Errors: EEXIST.
  std::error_code add(NodePtr node);
  void remove(std::string_view name);
  // Nodes that have `node` as a child.
  std::vector<NodePtr> parents_of(const Node& node) const;
  std::vector<NodePtr> list() const;

 private:
  IoGate gate_;
  std::map<std::string, NodePtr, std::less<>> nodes_;
};

}  // namespace fleeced::block
