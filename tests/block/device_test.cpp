// SPDX-License-Identifier: MIT
// The defaults Device provides for its optional operations.
#include "block/device.hpp"

#include <gtest/gtest.h>

namespace fleeced::block {
namespace {

// Implements only what Device requires.
class MinimalDevice final : public Device {
 public:
  uint64_t size() const override { return 8192; }
  Capabilities capabilities() const override { return {}; }
  std::error_code read(uint64_t, std::span<std::byte>) override { return {}; }
  std::error_code write(uint64_t, std::span<const std::byte>, bool) override { return {}; }
  std::error_code write_zeroes(uint64_t, uint64_t, ZeroFlags) override { return {}; }
  std::error_code discard(uint64_t, uint64_t, bool) override { return {}; }
  std::error_code flush() override { return {}; }
};

TEST(Device, TryReadAndTryWriteWouldBlockByDefault) {
  MinimalDevice dev;
  std::vector<std::byte> buf(16);
  const auto would_block = std::make_error_code(std::errc::operation_would_block);
  EXPECT_EQ(dev.try_read(0, buf), would_block);
  EXPECT_EQ(dev.try_write(0, buf), would_block);
  EXPECT_EQ(dev.try_read(0, buf).category(), std::generic_category());
}

TEST(Device, CacheSucceedsByDefault) {
  MinimalDevice dev;
  EXPECT_EQ(dev.cache(0, 8192), std::error_code());
}

TEST(Device, ExtentsDefaultToOneDataExtent) {
  MinimalDevice dev;
  std::vector<Extent> out = {{1, 2, 3}};
  ASSERT_EQ(dev.extents(100, 4000, out), std::error_code());
  ASSERT_EQ(out.size(), 2u);
  EXPECT_EQ(out[0].offset, 1u);
  EXPECT_EQ(out[1].offset, 100u);
  EXPECT_EQ(out[1].length, 4000u);
  EXPECT_EQ(out[1].flags, 0u);
}

}  // namespace
}  // namespace fleeced::block
