// SPDX-License-Identifier: MIT
// split_context_name and match_meta_context: the LIST/SET selection rules of
// doc/proto.md "Metadata querying" and QEMU's qemu: namespace.
#include <gtest/gtest.h>

#include <string>
#include <string_view>
#include <vector>

#include "protocol/codec.hpp"

namespace fleeced::protocol {
namespace {

using Names = std::vector<std::string>;

const Names kAvailable = {"base:allocation", "qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:b1"};

Names on_list(std::string_view query) {
  Names out;
  match_meta_context(query, kAvailable, true, out);
  return out;
}

Names on_set(std::string_view query) {
  Names out;
  match_meta_context(query, kAvailable, false, out);
  return out;
}

TEST(SplitContextName, SplitsAtFirstColon) {
  std::string_view ns;
  std::string_view leaf;
  ASSERT_TRUE(split_context_name("qemu:dirty-bitmap:b0", ns, leaf));
  EXPECT_EQ(ns, "qemu");
  EXPECT_EQ(leaf, "dirty-bitmap:b0");
  ASSERT_TRUE(split_context_name("base:", ns, leaf));
  EXPECT_EQ(ns, "base");
  EXPECT_EQ(leaf, "");
}

TEST(SplitContextName, RejectsMissingOrEmptyNamespace) {
  std::string_view ns = "unchanged";
  std::string_view leaf = "unchanged";
  EXPECT_FALSE(split_context_name("nocolon", ns, leaf));
  EXPECT_FALSE(split_context_name(":leaf", ns, leaf));
  EXPECT_FALSE(split_context_name(":", ns, leaf));
  EXPECT_FALSE(split_context_name("", ns, leaf));
  EXPECT_EQ(ns, "unchanged");
  EXPECT_EQ(leaf, "unchanged");
}

TEST(MatchMetaContext, ListBaseWildcardSelectsAllocation) {
  EXPECT_EQ(on_list("base:"), (Names{"base:allocation"}));
}

TEST(MatchMetaContext, ListQemuWildcardSelectsEveryBitmap) {
  EXPECT_EQ(on_list("qemu:"), (Names{"qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:b1"}));
}

TEST(MatchMetaContext, ListDirtyBitmapWildcardSelectsEveryBitmap) {
  EXPECT_EQ(on_list("qemu:dirty-bitmap:"), (Names{"qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:b1"}));
}

TEST(MatchMetaContext, SetIgnoresWildcards) {
  EXPECT_EQ(on_set("base:"), Names{});
  EXPECT_EQ(on_set("qemu:"), Names{});
  EXPECT_EQ(on_set("qemu:dirty-bitmap:"), Names{});
}

TEST(MatchMetaContext, ExactNameSelectsOnListAndSet) {
  EXPECT_EQ(on_list("qemu:dirty-bitmap:b1"), (Names{"qemu:dirty-bitmap:b1"}));
  EXPECT_EQ(on_set("qemu:dirty-bitmap:b1"), (Names{"qemu:dirty-bitmap:b1"}));
  EXPECT_EQ(on_set("base:allocation"), (Names{"base:allocation"}));
}

TEST(MatchMetaContext, UnknownNamesSelectNothing) {
  for (std::string_view q :
       {"qemu:dirty-bitmap:nope", "nocolon", "x-foo:bar", ":", "", ":base:allocation",
        "base:allocation:", "qemu:dirty-bitmap:b", "qemu:dirty", "BASE:allocation",
        "base:allocation ", "qemu:dirty-bitmap:b0:"}) {
    EXPECT_EQ(on_list(q), Names{}) << q;
    EXPECT_EQ(on_set(q), Names{}) << q;
  }
}

TEST(MatchMetaContext, OnlyEmptyLeafOrBitmapPrefixIsAWildcard) {
  const Names available = {"qemu:dirty-bitmap:b0", "qemu:allocation-depth"};
  Names out;
  match_meta_context("qemu:dirty-bitmap:b", available, true, out);
  match_meta_context("qemu:allocation", available, true, out);
  EXPECT_EQ(out, Names{});
  match_meta_context("qemu:", available, true, out);
  EXPECT_EQ(out, available);
}

TEST(MatchMetaContext, FollowsAvailableOrder) {
  const Names available = {"qemu:dirty-bitmap:z", "base:allocation", "qemu:dirty-bitmap:a"};
  Names out;
  match_meta_context("qemu:", available, true, out);
  EXPECT_EQ(out, (Names{"qemu:dirty-bitmap:z", "qemu:dirty-bitmap:a"}));
}

TEST(MatchMetaContext, DoesNotAppendDuplicates) {
  Names out = {"qemu:dirty-bitmap:b1"};
  match_meta_context("qemu:", kAvailable, true, out);
  match_meta_context("qemu:dirty-bitmap:b0", kAvailable, true, out);
  match_meta_context("qemu:dirty-bitmap:b0", kAvailable, false, out);
  EXPECT_EQ(out, (Names{"qemu:dirty-bitmap:b1", "qemu:dirty-bitmap:b0"}));
}

TEST(MatchMetaContext, KeepsEarlierQueriesFirst) {
  Names out;
  match_meta_context("qemu:dirty-bitmap:b1", kAvailable, false, out);
  match_meta_context("base:allocation", kAvailable, false, out);
  EXPECT_EQ(out, (Names{"qemu:dirty-bitmap:b1", "base:allocation"}));
}

TEST(MatchMetaContext, SelectsNothingFromEmptyExport) {
  Names out;
  match_meta_context("base:", {}, true, out);
  match_meta_context("base:allocation", {}, false, out);
  EXPECT_TRUE(out.empty());
}

}  // namespace
}  // namespace fleeced::protocol
