// SPDX-License-Identifier: MIT
#include "block/node_graph.hpp"

#include <algorithm>

namespace fleeced::block {

namespace {

std::error_code would_block() { return std::make_error_code(std::errc::operation_would_block); }

}  // namespace

RawNode::RawNode(std::string name, NodePtr child, bool discard_unmap, std::string image_path,
                 IoGate& gate)
    : Node(std::move(name)),
      child_(std::move(child)),
      child_device_(child_->device()),
      discard_unmap_(discard_unmap),
      image_path_(std::move(image_path)),
      gate_(gate) {}

NodeBitmapPtr RawNode::find_bitmap(std::string_view name) const {
  for (const auto& b : bitmaps_) {
    if (b->name == name) return b;
  }
  return nullptr;
}

void RawNode::add_bitmap(NodeBitmapPtr b) { bitmaps_.push_back(std::move(b)); }

void RawNode::remove_bitmap(std::string_view name) {
  std::erase_if(bitmaps_, [&](const NodeBitmapPtr& b) { return b->name == name; });
}

void RawNode::set_child(NodePtr child) {
  DevicePtr device = child->device();
  std::lock_guard lock(child_device_mutex_);
  child_ = std::move(child);
  child_device_ = std::move(device);
}

DevicePtr RawNode::child_device_ungated() const {
  std::lock_guard lock(child_device_mutex_);
  return child_device_;
}

uint64_t RawNode::size() const { return child_device_ungated()->size(); }

Capabilities RawNode::capabilities() const { return child_device_ungated()->capabilities(); }

std::error_code RawNode::mark(uint64_t offset, uint64_t length) {
  for (const auto& b : bitmaps_) {
    if (!b->recording) continue;
    if (b->persistent) {
      if (std::error_code ec = b->persistent->mark(offset, length)) return ec;
    } else {
      b->bits->set_range(offset, length);
    }
  }
  return {};
}

bool RawNode::try_mark_durable(uint64_t offset, uint64_t length) const {
  for (const auto& b : bitmaps_) {
    if (b->recording && b->persistent && !b->persistent->is_durable(offset, length)) return false;
  }
  return true;
}

void RawNode::mark_memory(uint64_t offset, uint64_t length) {
  for (const auto& b : bitmaps_) {
    if (b->recording && !b->persistent) b->bits->set_range(offset, length);
  }
}

std::error_code RawNode::read(uint64_t offset, std::span<std::byte> out) {
  auto guard = gate_.enter();
  return child_device_->read(offset, out);
}

std::error_code RawNode::try_read(uint64_t offset, std::span<std::byte> out) {
  auto guard = gate_.try_enter();
  if (!guard) return would_block();
  return child_device_->try_read(offset, out);
}

std::error_code RawNode::write(uint64_t offset, std::span<const std::byte> data, bool fua) {
  auto guard = gate_.enter();
  // Dirty tracking marks the range before the write, even if the write fails.
  if (std::error_code ec = mark(offset, data.size())) return ec;
  return child_device_->write(offset, data, fua);
}

std::error_code RawNode::try_write(uint64_t offset, std::span<const std::byte> data) {
  auto guard = gate_.try_enter();
  if (!guard) return would_block();
  // Persistent bits must already be durable; in-memory ones are set only
  // if the write is really attempted now (a would-block retry on the pool
  // may run after a bitmap rotation and must mark the new bitmap, not the
  // frozen one). The gate is held throughout, so no transaction can fall
  // between the write and its mark.
  if (!try_mark_durable(offset, data.size())) return would_block();
  std::error_code ec = child_device_->try_write(offset, data);
  if (ec != std::errc::operation_would_block) mark_memory(offset, data.size());
  return ec;
}

std::error_code RawNode::write_zeroes(uint64_t offset, uint64_t length, ZeroFlags flags) {
  auto guard = gate_.enter();
  if (std::error_code ec = mark(offset, length)) return ec;
  return child_device_->write_zeroes(offset, length, flags);
}

std::error_code RawNode::discard(uint64_t offset, uint64_t length, bool fua) {
  auto guard = gate_.enter();
  // With discard "ignore" (the default) the trim is dropped and dirties nothing.
  if (!discard_unmap_) return {};
  if (std::error_code ec = mark(offset, length)) return ec;
  return child_device_->discard(offset, length, fua);
}

std::error_code RawNode::flush() {
  auto guard = gate_.enter();
  return child_device_->flush();
}

std::error_code RawNode::cache(uint64_t offset, uint64_t length) {
  auto guard = gate_.enter();
  return child_device_->cache(offset, length);
}

std::error_code RawNode::extents(uint64_t offset, uint64_t length, std::vector<Extent>& out) {
  auto guard = gate_.enter();
  return child_device_->extents(offset, length, out);
}

NodePtr NodeGraph::find(std::string_view name) const {
  auto it = nodes_.find(name);
  return it == nodes_.end() ? nullptr : it->second;
}

std::shared_ptr<RawNode> NodeGraph::find_raw(std::string_view name) const {
  return std::dynamic_pointer_cast<RawNode>(find(name));
}

std::error_code NodeGraph::add(NodePtr node) {
  auto [it, inserted] = nodes_.emplace(node->name(), node);
  if (!inserted) return std::make_error_code(std::errc::file_exists);
  return {};
}

void NodeGraph::remove(std::string_view name) {
  auto it = nodes_.find(name);
  if (it != nodes_.end()) nodes_.erase(it);
}

std::vector<NodePtr> NodeGraph::parents_of(const Node& node) const {
  std::vector<NodePtr> out;
  for (const auto& [name, n] : nodes_) {
    for (const auto& c : n->children()) {
      if (c.get() == &node) out.push_back(n);
    }
  }
  return out;
}

std::vector<NodePtr> NodeGraph::list() const {
  std::vector<NodePtr> out;
  for (const auto& [name, n] : nodes_) out.push_back(n);
  return out;
}

}  // namespace fleeced::block
