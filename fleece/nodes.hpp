// SPDX-License-Identifier: MIT
// Block-graph nodes for fleecing: "copy-before-write" (a filter over the
// live disk's file node, copying into a scratch target node) and
// "snapshot-access" (the read-only point-in-time view over such a filter).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "block/node_graph.hpp"
#include "fleece/copy_before_write.hpp"

namespace fleeced::fleece {

class CbwNode final : public block::Node {
 public:
  CbwNode(std::string name, block::NodePtr file, block::NodePtr target,
          std::shared_ptr<CopyBeforeWrite> cbw)
      : Node(std::move(name)),
        file_(std::move(file)),
        target_(std::move(target)),
        cbw_(std::move(cbw)) {}
  std::string driver() const override { return "copy-before-write"; }
  block::DevicePtr device() override { return cbw_; }
  std::vector<block::NodePtr> children() const override { return {file_, target_}; }
  const block::NodePtr& file() const { return file_; }
  const block::NodePtr& target() const { return target_; }
  const std::shared_ptr<CopyBeforeWrite>& cbw() const { return cbw_; }

 private:
  block::NodePtr file_;
  block::NodePtr target_;
  std::shared_ptr<CopyBeforeWrite> cbw_;
};

class SnapshotAccessNode final : public block::Node {
 public:
  SnapshotAccessNode(std::string name, std::shared_ptr<CbwNode> file)
      : Node(std::move(name)),
        file_(std::move(file)),
        device_(std::make_shared<SnapshotAccess>(file_->cbw())) {}
  std::string driver() const override { return "snapshot-access"; }
  block::DevicePtr device() override { return device_; }
  std::vector<block::NodePtr> children() const override { return {file_}; }
  const std::shared_ptr<CbwNode>& file() const { return file_; }

 private:
  std::shared_ptr<CbwNode> file_;
  std::shared_ptr<SnapshotAccess> device_;
};

}  // namespace fleeced::fleece
