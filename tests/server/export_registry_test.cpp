// SPDX-License-Identifier: MIT
// ExportRegistry (add/find/remove/list) and the per-export answers that
// negotiation sends: transmission flags and context names.
#include "server/export_registry.hpp"

#include <gtest/gtest.h>

#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "block/memory_device.hpp"
#include "protocol/nbd.hpp"

namespace fleeced::server {
namespace {

namespace p = fleeced::protocol;

ExportPtr make_export(std::string name, bool writable = true, bool device_read_only = false) {
  auto e = std::make_shared<Export>();
  e->name = std::move(name);
  e->device = std::make_shared<block::MemoryDevice>(1 << 20, device_read_only);
  e->writable = writable;
  return e;
}

std::vector<std::string> names(const std::vector<ExportPtr>& list) {
  std::vector<std::string> out;
  for (const auto& e : list) out.push_back(e->name);
  return out;
}

// A device that reports chosen capabilities (and nothing else works).
class CapsDevice final : public block::Device {
 public:
  explicit CapsDevice(block::Capabilities caps) : caps_(caps) {}
  uint64_t size() const override { return 4096; }
  block::Capabilities capabilities() const override { return caps_; }
  std::error_code read(uint64_t, std::span<std::byte>) override {
    return std::make_error_code(std::errc::io_error);
  }
  std::error_code write(uint64_t, std::span<const std::byte>, bool) override {
    return std::make_error_code(std::errc::io_error);
  }
  std::error_code write_zeroes(uint64_t, uint64_t, block::ZeroFlags) override {
    return std::make_error_code(std::errc::io_error);
  }
  std::error_code discard(uint64_t, uint64_t, bool) override {
    return std::make_error_code(std::errc::io_error);
  }
  std::error_code flush() override { return {}; }

 private:
  block::Capabilities caps_;
};

// Flags every export advertises, as documented in Export::transmission_flags.
constexpr uint16_t kAlways = p::kFlagHasFlags | p::kFlagSendFlush | p::kFlagSendFua |
                             p::kFlagSendCache | p::kFlagCanMultiConn;
constexpr uint16_t kWritable = p::kFlagSendTrim | p::kFlagSendWriteZeroes | p::kFlagSendFastZero;

TEST(ExportRegistry, EmptyRegistryFindsNothing) {
  ExportRegistry r;
  EXPECT_EQ(r.find("a"), nullptr);
  EXPECT_EQ(r.find(""), nullptr);
  EXPECT_TRUE(r.list().empty());
  EXPECT_EQ(r.remove("a"), nullptr);
}

TEST(ExportRegistry, AddThenFindByExactName) {
  ExportRegistry r;
  ExportPtr a = make_export("a");
  ExportPtr empty = make_export("");
  ASSERT_FALSE(r.add(a));
  ASSERT_FALSE(r.add(empty));
  EXPECT_EQ(r.find("a"), a);
  EXPECT_EQ(r.find(""), empty);
  EXPECT_EQ(r.find("A"), nullptr);
  EXPECT_EQ(r.find("a "), nullptr);
}

TEST(ExportRegistry, ListKeepsInsertionOrder) {
  ExportRegistry r;
  for (const char* n : {"zeta", "alpha", "mid", ""}) ASSERT_FALSE(r.add(make_export(n)));
  EXPECT_EQ(names(r.list()), (std::vector<std::string>{"zeta", "alpha", "mid", ""}));
}

TEST(ExportRegistry, DuplicateNameIsEexistAndKeepsFirst) {
  ExportRegistry r;
  ExportPtr first = make_export("a");
  ASSERT_FALSE(r.add(first));
  std::error_code ec = r.add(make_export("a", false));
  EXPECT_EQ(ec, std::make_error_code(std::errc::file_exists));
  EXPECT_EQ(ec.value(), EEXIST);
  EXPECT_EQ(r.find("a"), first);
  EXPECT_EQ(r.list().size(), 1u);
}

TEST(ExportRegistry, RemoveReturnsExportAndKeepsOrderOfOthers) {
  ExportRegistry r;
  ExportPtr b = make_export("b");
  ASSERT_FALSE(r.add(make_export("a")));
  ASSERT_FALSE(r.add(b));
  ASSERT_FALSE(r.add(make_export("c")));
  EXPECT_EQ(r.remove("b"), b);
  EXPECT_EQ(r.find("b"), nullptr);
  EXPECT_EQ(r.remove("b"), nullptr);
  EXPECT_EQ(names(r.list()), (std::vector<std::string>{"a", "c"}));
}

TEST(ExportRegistry, NameIsFreeAgainAfterRemove) {
  ExportRegistry r;
  ASSERT_FALSE(r.add(make_export("a")));
  ASSERT_NE(r.remove("a"), nullptr);
  ExportPtr again = make_export("a");
  EXPECT_FALSE(r.add(again));
  EXPECT_EQ(r.find("a"), again);
  EXPECT_EQ(names(r.list()), (std::vector<std::string>{"a"}));
}

TEST(ExportRegistry, ListIsASnapshot) {
  ExportRegistry r;
  ASSERT_FALSE(r.add(make_export("a")));
  std::vector<ExportPtr> snapshot = r.list();
  ASSERT_FALSE(r.add(make_export("b")));
  ASSERT_NE(r.remove("a"), nullptr);
  EXPECT_EQ(names(snapshot), (std::vector<std::string>{"a"}));
}

TEST(ExportRegistry, ConcurrentAddFindRemove) {
  ExportRegistry r;
  constexpr int kPerThread = 200;
  std::vector<std::thread> threads;
  for (int t = 0; t < 2; ++t) {
    threads.emplace_back([&r, t] {
      for (int i = 0; i < kPerThread; ++i) {
        std::string n = std::to_string(t) + "-" + std::to_string(i);
        EXPECT_FALSE(r.add(make_export(n)));
        EXPECT_NE(r.find(n), nullptr);
        (void)r.list();
        if (i % 2) {
          EXPECT_NE(r.remove(n), nullptr);
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(r.list().size(), 2u * kPerThread / 2);
}

TEST(ExportTransmissionFlags, WritableWithoutStructuredReplies) {
  ExportPtr e = make_export("a", true);
  EXPECT_EQ(e->transmission_flags(false), kAlways | kWritable);
  EXPECT_EQ(e->transmission_flags(false), 0x0d6d);
}

TEST(ExportTransmissionFlags, WritableWithStructuredRepliesAddsDf) {
  ExportPtr e = make_export("a", true);
  EXPECT_EQ(e->transmission_flags(true), kAlways | kWritable | p::kFlagSendDf);
  EXPECT_EQ(e->transmission_flags(true), 0x0ded);
}

TEST(ExportTransmissionFlags, ReadOnlyExport) {
  ExportPtr e = make_export("a", false);
  EXPECT_EQ(e->transmission_flags(false), kAlways | p::kFlagReadOnly);
  EXPECT_EQ(e->transmission_flags(false), 0x050f);
  EXPECT_EQ(e->transmission_flags(true), kAlways | p::kFlagReadOnly | p::kFlagSendDf);
  EXPECT_EQ(e->transmission_flags(true), 0x058f);
}

TEST(ExportTransmissionFlags, ReadOnlyDeviceWinsOverWritableExport) {
  ExportPtr e = make_export("a", /*writable=*/true, /*device_read_only=*/true);
  EXPECT_EQ(e->transmission_flags(false), 0x050f);
  EXPECT_EQ(e->transmission_flags(true), 0x058f);
}

TEST(ExportTransmissionFlags, FastZeroOnlyWhenDeviceCanFastZero) {
  auto e = std::make_shared<Export>();
  e->name = "slow";
  e->writable = true;
  block::Capabilities caps;
  caps.can_fast_zero = false;
  e->device = std::make_shared<CapsDevice>(caps);
  EXPECT_EQ(e->transmission_flags(false), kAlways | p::kFlagSendTrim | p::kFlagSendWriteZeroes);
  EXPECT_EQ(e->transmission_flags(false) & p::kFlagSendFastZero, 0);
}

TEST(ExportTransmissionFlags, NeverAdvertisesUnsupportedFeatures) {
  // No resize, no rotational, and read-only never comes with write commands.
  for (bool writable : {false, true}) {
    for (bool structured : {false, true}) {
      uint16_t f = make_export("a", writable)->transmission_flags(structured);
      EXPECT_EQ(f & (p::kFlagSendResize | p::kFlagRotational), 0);
      if (f & p::kFlagReadOnly) {
        EXPECT_EQ(f & kWritable, 0);
      }
    }
  }
}

TEST(ExportContextNames, BaseAllocationFirst) {
  auto e = std::make_shared<Export>();
  e->name = "a";
  e->device = std::make_shared<block::MemoryDevice>(4096);
  EXPECT_EQ(e->context_names(), (std::vector<std::string>{"base:allocation"}));
  for (const char* name : {"qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:b1"}) {
    MetaContextSource source;
    source.name = name;
    e->meta_contexts.push_back(std::move(source));
  }
  EXPECT_EQ(e->context_names(), (std::vector<std::string>{"base:allocation", "qemu:dirty-bitmap:b0",
                                                          "qemu:dirty-bitmap:b1"}));
}

TEST(ExportSize, IsTheDeviceSize) { EXPECT_EQ(make_export("a")->size(), 1u << 20); }

}  // namespace
}  // namespace fleeced::server
