// SPDX-License-Identifier: MIT
// Args, Session and format_qmp (server/control/qmp.hpp): QEMU 7.2's argument
// and envelope error texts (control-api.md §1), negotiation, "id" echo, the
// JSON stream framing and error recovery, and event ordering.
#include "server/control/qmp.hpp"

#include <gtest/gtest.h>

#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

namespace fleeced::server::control {
namespace {

json::object obj(std::string_view text) { return json::parse(text).as_object(); }

// ---- Args

TEST(Args, StringPresentMissingAndWrongType) {
  json::object o = obj(R"({"name": "b0", "num": 5, "nul": null})");
  Args a(&o);
  EXPECT_EQ(a.string("name", true), "b0");
  EXPECT_EQ(a.string("absent", false), std::nullopt);
  EXPECT_TRUE(a.ok());
  EXPECT_EQ(a.string("num", true), std::nullopt);
  ASSERT_FALSE(a.ok());
  EXPECT_EQ(a.error().error_class, "GenericError");
  EXPECT_EQ(a.error().desc, "Invalid parameter type for 'num', expected: string");
}

TEST(Args, NullIsAWrongTypeNotAbsent) {
  json::object o = obj(R"({"nul": null})");
  Args a(&o);
  EXPECT_EQ(a.string("nul", false), std::nullopt);
  EXPECT_EQ(a.error().desc, "Invalid parameter type for 'nul', expected: string");
}

TEST(Args, MissingRequired) {
  json::object o;
  Args a(&o);
  EXPECT_EQ(a.string("name", true), std::nullopt);
  EXPECT_EQ(a.error().desc, "Parameter 'name' is missing");
}

TEST(Args, NoArgumentsObjectIsEmpty) {
  Args a(nullptr);
  EXPECT_EQ(a.boolean("flat", false), std::nullopt);
  EXPECT_TRUE(a.finish());
  Args b(nullptr);
  EXPECT_EQ(b.string("node", true), std::nullopt);
  EXPECT_EQ(b.error().desc, "Parameter 'node' is missing");
}

TEST(Args, FirstErrorWinsAndLaterGettersReturnNothing) {
  json::object o = obj(R"({"a": 1, "b": "x"})");
  Args a(&o);
  EXPECT_EQ(a.string("a", true), std::nullopt);
  EXPECT_EQ(a.string("b", true), std::nullopt);  // valid, but an error is already kept
  EXPECT_EQ(a.string("c", true), std::nullopt);
  EXPECT_EQ(a.error().desc, "Invalid parameter type for 'a', expected: string");
  EXPECT_FALSE(a.finish());
  EXPECT_FALSE(a.fail("later"));
  EXPECT_EQ(a.error().desc, "Invalid parameter type for 'a', expected: string");
}

TEST(Args, Boolean) {
  json::object o = obj(R"({"t": true, "f": false, "one": 1})");
  Args a(&o);
  EXPECT_EQ(a.boolean("t", true), true);
  EXPECT_EQ(a.boolean("f", true), false);
  EXPECT_EQ(a.boolean("one", true), std::nullopt);
  EXPECT_EQ(a.error().desc, "Invalid parameter type for 'one', expected: boolean");
}

struct IntCase {
  const char* json;
  std::optional<uint64_t> expected;
  const char* error;
};

TEST(Args, Uint64) {
  const IntCase cases[] = {
      {"0", 0, nullptr},
      {"65536", 65536, nullptr},
      {"9223372036854775807", 9223372036854775807ull, nullptr},
      {"18446744073709551615", std::numeric_limits<uint64_t>::max(), nullptr},
      {"-1", std::nullopt, "Parameter 'granularity' expects uint64"},
      {"1.5", std::nullopt, "Parameter 'granularity' expects uint64"},
      {"2.0", std::nullopt, "Parameter 'granularity' expects uint64"},
      {"18446744073709551616", std::nullopt, "Parameter 'granularity' expects uint64"},
      {"\"abc\"", std::nullopt, "Parameter 'granularity' expects uint64"},
      {"null", std::nullopt, "Parameter 'granularity' expects uint64"},
      {"true", std::nullopt, "Parameter 'granularity' expects uint64"},
  };
  for (const IntCase& c : cases) {
    SCOPED_TRACE(c.json);
    json::object o = obj(std::string(R"({"granularity": )") + c.json + "}");
    Args a(&o);
    EXPECT_EQ(a.uint64("granularity", true), c.expected);
    if (c.error) {
      ASSERT_FALSE(a.ok());
      EXPECT_EQ(a.error().desc, c.error);
    } else {
      EXPECT_TRUE(a.finish());
    }
  }
}

TEST(Args, Uint32) {
  const IntCase cases[] = {
      {"0", 0, nullptr},
      {"512", 512, nullptr},
      {"4294967295", 4294967295u, nullptr},
      {"4294967296", std::nullopt, "Parameter 'granularity' expects uint32_t"},
      {"18446744073709551615", std::nullopt, "Parameter 'granularity' expects uint32_t"},
      {"-1", std::nullopt, "Parameter 'granularity' expects uint32_t"},  // QEMU wraps, then ranges
      {"1.5", std::nullopt, "Parameter 'granularity' expects uint64"},
      {"\"65536\"", std::nullopt, "Parameter 'granularity' expects uint64"},
      {"null", std::nullopt, "Parameter 'granularity' expects uint64"},
  };
  for (const IntCase& c : cases) {
    SCOPED_TRACE(c.json);
    json::object o = obj(std::string(R"({"granularity": )") + c.json + "}");
    Args a(&o);
    std::optional<uint32_t> got = a.uint32("granularity", true);
    EXPECT_EQ(got.has_value(), c.expected.has_value());
    if (got && c.expected) {
      EXPECT_EQ(*got, *c.expected);
    }
    if (c.error) {
      ASSERT_FALSE(a.ok());
      EXPECT_EQ(a.error().desc, c.error);
    }
  }
}

TEST(Args, Int64) {
  struct Case {
    const char* json;
    std::optional<int64_t> expected;
  };
  const Case cases[] = {
      {"0", 0},
      {"-5", -5},
      {"9223372036854775807", std::numeric_limits<int64_t>::max()},
      {"-9223372036854775808", std::numeric_limits<int64_t>::min()},
      {"9223372036854775808", std::nullopt},
      {"1.5", std::nullopt},
      {"\"a\"", std::nullopt},
      {"null", std::nullopt},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.json);
    json::object o = obj(std::string(R"({"speed": )") + c.json + "}");
    Args a(&o);
    EXPECT_EQ(a.int64("speed", true), c.expected);
    if (!c.expected) {
      EXPECT_EQ(a.error().desc, "Invalid parameter type for 'speed', expected: integer");
    }
  }
}

TEST(Args, Enumeration) {
  json::object o = obj(R"({"driver": "raw"})");
  Args a(&o);
  EXPECT_EQ(a.enumeration("driver", {"file", "raw"}, true), "raw");
  EXPECT_TRUE(a.finish());

  json::object bad = obj(R"({"driver": "nonexistent-driver"})");
  Args b(&bad);
  EXPECT_EQ(b.enumeration("driver", {"file", "raw"}, true), std::nullopt);
  EXPECT_EQ(b.error().desc, "Parameter 'driver' does not accept value 'nonexistent-driver'");

  json::object number = obj(R"({"driver": 5})");
  Args c(&number);
  EXPECT_EQ(c.enumeration("driver", {"file"}, true), std::nullopt);
  EXPECT_EQ(c.error().desc, "Invalid parameter type for 'driver', expected: string");

  json::object empty;
  Args d(&empty);
  EXPECT_EQ(d.enumeration("mode", {"safe", "hard"}, false), std::nullopt);
  EXPECT_TRUE(d.finish());
}

TEST(Args, ArrayObjectAndValue) {
  json::object o = obj(R"({"list": [1], "map": {"k": 1}, "any": null, "s": "x"})");
  Args a(&o);
  ASSERT_NE(a.array("list", true), nullptr);
  EXPECT_EQ(a.array("list", true)->size(), 1u);
  ASSERT_NE(a.object("map", true), nullptr);
  const json::value* any = a.value("any", true);
  ASSERT_NE(any, nullptr);
  EXPECT_TRUE(any->is_null());
  EXPECT_EQ(a.value("absent", false), nullptr);
  EXPECT_TRUE(a.ok());
  EXPECT_EQ(a.array("s", true), nullptr);
  EXPECT_EQ(a.error().desc, "Invalid parameter type for 's', expected: array");

  Args b(&o);
  EXPECT_EQ(b.object("list", true), nullptr);
  EXPECT_EQ(b.error().desc, "Invalid parameter type for 'list', expected: object");
  Args c(&o);
  EXPECT_EQ(c.value("absent", true), nullptr);
  EXPECT_EQ(c.error().desc, "Parameter 'absent' is missing");
}

TEST(Args, FinishReportsFirstUnknownKey) {
  json::object o = obj(R"({"node": "d", "bogus": 1, "other": 2})");
  Args a(&o);
  EXPECT_EQ(a.string("node", true), "d");
  EXPECT_FALSE(a.finish());
  EXPECT_EQ(a.error().desc, "Parameter 'bogus' is unexpected");
}

TEST(Args, MissingIsReportedBeforeUnexpected) {
  json::object o = obj(R"({"node": "x", "bogus": 1})");
  Args a(&o);
  a.string("node", true);
  a.string("name", true);
  EXPECT_FALSE(a.finish());
  EXPECT_EQ(a.error().desc, "Parameter 'name' is missing");
}

TEST(Args, AllowAcceptsAKeyWithoutReadingIt) {
  json::object o = obj(R"({"cache": {"direct": true}})");
  Args a(&o);
  a.allow("cache");
  EXPECT_TRUE(a.finish());
}

TEST(Args, PrefixQualifiesEveryMessage) {
  json::object o = obj(R"({"path": 5, "x": 1})");
  Args a(&o, "addr.data.");
  EXPECT_EQ(a.qualified("path"), "addr.data.path");
  a.string("path", true);
  EXPECT_EQ(a.error().desc, "Invalid parameter type for 'addr.data.path', expected: string");
  Args b(&o, "options[0].");
  b.string("driver", true);
  EXPECT_EQ(b.error().desc, "Parameter 'options[0].driver' is missing");
  Args c(&o, "addr.data.");
  c.allow("path");
  EXPECT_FALSE(c.finish());
  EXPECT_EQ(c.error().desc, "Parameter 'addr.data.x' is unexpected");
}

TEST(Args, FailKeepsClass) {
  Args a(nullptr);
  EXPECT_FALSE(a.fail("Block job 'j' not found", "DeviceNotActive"));
  EXPECT_EQ(a.error().error_class, "DeviceNotActive");
  EXPECT_EQ(a.error().desc, "Block job 'j' not found");
}

// ---- CommandTable

TEST(QmpCommandTable, AddFindNames) {
  CommandTable t;
  t.add("b", [](Args&, EventSink&) { return CommandResult::ok(); });
  t.add("a", [](Args&, EventSink&) { return CommandResult::ok(1); });
  ASSERT_NE(t.find("a"), nullptr);
  EXPECT_EQ(t.find("c"), nullptr);
  EXPECT_EQ(t.names(), (std::vector<std::string>{"a", "b"}));
}

// ---- format_qmp

TEST(QmpFormat, SpacesLikeQemu) {
  EXPECT_EQ(format_qmp(json::parse(R"({"a":1,"b":[2,"x",{}],"c":{"d":null,"e":[]}})")),
            R"({"a": 1, "b": [2, "x", {}], "c": {"d": null, "e": []}})");
  EXPECT_EQ(format_qmp(json::parse(R"("q\"\n")")), R"("q\"\n")");
}

// ---- Session

class SessionTest : public ::testing::Test {
 protected:
  SessionTest() : session_(table_, version()) {
    table_.add("echo", [](Args& a, EventSink&) {
      const json::value* v = a.value("value", false);
      if (!a.finish()) return CommandResult{json::object(), a.error()};
      return CommandResult::ok(v ? *v : json::value(json::object()));
    });
    // Shaped like block-dirty-bitmap-add, for the validation table.
    table_.add("bitmap-add", [](Args& a, EventSink&) {
      a.string("node", true);
      a.string("name", true);
      a.uint32("granularity", false);
      a.boolean("persistent", false);
      if (!a.finish()) return CommandResult{json::object(), a.error()};
      return CommandResult::ok();
    });
    table_.add("blockdev-add", [](Args& a, EventSink&) {
      a.enumeration("driver", {"file", "raw"}, true);
      a.allow("node-name");
      if (!a.finish()) return CommandResult{json::object(), a.error()};
      return CommandResult::ok();
    });
    table_.add("export-del", [](Args& a, EventSink& events) {
      auto id = a.string("id", true);
      if (!a.finish()) return CommandResult{json::object(), a.error()};
      events.emit("BLOCK_EXPORT_DELETED", json::object{{"id", *id}});
      return CommandResult::ok();
    });
    table_.add("job-cancel", [](Args& a, EventSink&) {
      auto device = a.string("device", true);
      if (!a.finish()) return CommandResult{json::object(), a.error()};
      return CommandResult::fail("Block job '" + *device + "' not found", "DeviceNotActive");
    });
    table_.add("forgets-to-check", [](Args& a, EventSink&) {
      a.string("name", true);  // the handler ignores the error
      return CommandResult::ok();
    });
    table_.add("throws",
               [](Args&, EventSink&) -> CommandResult { throw std::runtime_error("boom"); });
  }

  static json::object version() {
    return json::object{{"qemu", json::object{{"major", 7}, {"minor", 2}, {"micro", 0}}},
                        {"package", "fleeced test"}};
  }

  // Feeds `input` and returns the output lines parsed; checks the framing.
  std::vector<json::value> send(std::string_view input) {
    EXPECT_TRUE(session_.feed(input));
    return take();
  }

  std::vector<json::value> take() {
    std::string out = session_.take_output();
    std::vector<json::value> lines;
    std::size_t start = 0;
    while (start < out.size()) {
      std::size_t end = out.find("\r\n", start);
      EXPECT_NE(end, std::string::npos) << "unterminated output: " << out.substr(start);
      if (end == std::string::npos) break;
      lines.push_back(json::parse(out.substr(start, end - start)));
      start = end + 2;
    }
    return lines;
  }

  void negotiate() {
    auto r = send(R"({"execute": "qmp_capabilities"})");
    ASSERT_EQ(r.size(), 1u);
    ASSERT_EQ(r[0], json::parse(R"({"return": {}})"));
  }

  // Runs one command after negotiation; returns its only output line.
  json::value one(std::string_view command) {
    auto r = send(command);
    EXPECT_EQ(r.size(), 1u) << command;
    return r.empty() ? json::value() : r[0];
  }

  static json::value error(std::string_view cls, std::string_view desc) {
    return json::object{{"error", json::object{{"class", cls}, {"desc", desc}}}};
  }
  static json::value generic(std::string_view desc) { return error("GenericError", desc); }

  CommandTable table_;
  Session session_;
};

TEST_F(SessionTest, GreetingHasQemuShape) {
  std::string g = session_.greeting();
  ASSERT_TRUE(g.ends_with("\r\n"));
  EXPECT_EQ(g, R"({"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}, )"
               R"("package": "fleeced test"}, "capabilities": []}})"
               "\r\n");
}

TEST_F(SessionTest, CommandBeforeNegotiationIsRefused) {
  EXPECT_EQ(one(R"({"execute": "echo", "id": 1})"),
            json::parse(R"({"id": 1, "error": {"class": "CommandNotFound", "desc":
                 "Expecting capabilities negotiation with 'qmp_capabilities'"}})"));
  // Unknown commands get the same answer before negotiation.
  EXPECT_EQ(one(R"({"execute": "nope"})"),
            error("CommandNotFound", "Expecting capabilities negotiation with 'qmp_capabilities'"));
  EXPECT_FALSE(session_.negotiated());
}

TEST_F(SessionTest, EnvelopeErrorsKeepTheirTextBeforeNegotiation) {
  EXPECT_EQ(one(R"({"exec": "x"})"), generic("QMP input member 'exec' is unexpected"));
}

TEST_F(SessionTest, NegotiationThenCommand) {
  negotiate();
  EXPECT_TRUE(session_.negotiated());
  EXPECT_EQ(one(R"({"execute": "echo", "arguments": {"value": [1, "two"]}})"),
            json::parse(R"({"return": [1, "two"]})"));
}

TEST_F(SessionTest, SecondNegotiationIsRefused) {
  negotiate();
  EXPECT_EQ(one(R"({"execute": "qmp_capabilities", "id": 7})"),
            json::parse(R"({"id": 7, "error": {"class": "CommandNotFound", "desc":
                 "Capabilities negotiation is already complete, command ignored"}})"));
}

TEST_F(SessionTest, NegotiationArguments) {
  EXPECT_EQ(one(R"({"execute": "qmp_capabilities", "arguments": {"bogus": 1}})"),
            generic("Parameter 'bogus' is unexpected"));
  EXPECT_EQ(one(R"({"execute": "qmp_capabilities", "arguments": {"enable": "oob"}})"),
            generic("Invalid parameter type for 'enable', expected: array"));
  EXPECT_EQ(one(R"({"execute": "qmp_capabilities", "arguments": {"enable": [5]}})"),
            generic("Invalid parameter type for 'enable[0]', expected: string"));
  EXPECT_EQ(one(R"({"execute": "qmp_capabilities", "arguments": {"enable": ["foo"]}})"),
            generic("Parameter 'enable[0]' does not accept value 'foo'"));
  // The greeting offers no capability, so "oob" is refused as QEMU words it.
  EXPECT_EQ(one(R"({"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}})"),
            generic("Capability oob not available"));
  EXPECT_FALSE(session_.negotiated());
  EXPECT_EQ(one(R"({"execute": "qmp_capabilities", "arguments": {"enable": []}})"),
            json::parse(R"({"return": {}})"));
  EXPECT_TRUE(session_.negotiated());
  // Arguments are checked before the negotiation state, as in QEMU.
  EXPECT_EQ(one(R"({"execute": "qmp_capabilities", "arguments": {"bogus": 1}})"),
            generic("Parameter 'bogus' is unexpected"));
}

TEST_F(SessionTest, UnknownCommand) {
  negotiate();
  EXPECT_EQ(one(R"({"execute": "nope", "id": null})"),
            json::parse(R"({"id": null, "error": {"class": "CommandNotFound",
                 "desc": "The command nope has not been found"}})"));
}

// control-api.md §1, "Argument validation errors", row by row.
TEST_F(SessionTest, ValidationTable) {
  negotiate();
  EXPECT_EQ(one(R"({"execute": "bitmap-add", "arguments": {"node": "d"}})"),
            generic("Parameter 'name' is missing"));
  EXPECT_EQ(
      one(R"({"execute": "bitmap-add", "arguments": {"node": "d", "name": "b", "bogus": 1}})"),
      generic("Parameter 'bogus' is unexpected"));
  EXPECT_EQ(one(R"({"execute": "bitmap-add", "arguments": {"node": "d", "name": 5}})"),
            generic("Invalid parameter type for 'name', expected: string"));
  EXPECT_EQ(one(R"({"execute": "bitmap-add",
                    "arguments": {"node": "d", "name": "b", "granularity": 1.5}})"),
            generic("Parameter 'granularity' expects uint64"));
  EXPECT_EQ(one(R"({"execute": "bitmap-add",
                    "arguments": {"node": "d", "name": "b", "granularity": "abc"}})"),
            generic("Parameter 'granularity' expects uint64"));
  EXPECT_EQ(one(R"({"execute": "bitmap-add",
                    "arguments": {"node": "d", "name": "b", "granularity": 4294967296}})"),
            generic("Parameter 'granularity' expects uint32_t"));
  EXPECT_EQ(one(R"([1, 2])"), generic("QMP input must be a JSON object"));
  EXPECT_EQ(one(R"({"execute": 5})"), generic("QMP input member 'execute' must be a string"));
  EXPECT_EQ(one(R"({"exec": "x"})"), generic("QMP input member 'exec' is unexpected"));
  EXPECT_EQ(one(R"({"execute": "blockdev-add", "arguments": {"driver": "nonexistent-driver"}})"),
            generic("Parameter 'driver' does not accept value 'nonexistent-driver'"));
  EXPECT_EQ(one(R"({"execute": "blockdev-add", "arguments": {"driver": 5}})"),
            generic("Invalid parameter type for 'driver', expected: string"));
  EXPECT_EQ(one(R"({"execute": "bitmap-add",
                    "arguments": {"node": "d", "name": "b", "persistent": null}})"),
            generic("Invalid parameter type for 'persistent', expected: boolean"));
  EXPECT_EQ(one(R"({"execute": "bitmap-add", "arguments": {"node": "d", "name": "b"}})"),
            json::parse(R"({"return": {}})"));
}

TEST_F(SessionTest, EnvelopeErrors) {
  negotiate();
  EXPECT_EQ(one("5\n"), generic("QMP input must be a JSON object"));
  EXPECT_EQ(one(R"("str")"), generic("QMP input must be a JSON object"));
  EXPECT_EQ(one("null\n"), generic("QMP input must be a JSON object"));
  EXPECT_EQ(one(R"({"id": "x"})"), json::parse(R"({"id": "x", "error": {"class": "GenericError",
                 "desc": "QMP input lacks member 'execute'"}})"));
  EXPECT_EQ(one(R"({"execute": "echo", "arguments": 5})"),
            generic("QMP input member 'arguments' must be an object"));
  EXPECT_EQ(one(R"({"execute": "echo", "arguments": null})"),
            generic("QMP input member 'arguments' must be an object"));
  EXPECT_EQ(one(R"({"exec-oob": "echo"})"), generic("QMP input member 'exec-oob' is unexpected"));
  EXPECT_EQ(one(R"({"execute": "echo", "control": {}})"),
            generic("QMP input member 'control' is unexpected"));
  EXPECT_EQ(one(R"({"execute": "echo", "arguments": {}})"), json::parse(R"({"return": {}})"));
}

TEST_F(SessionTest, IdIsEchoedVerbatim) {
  negotiate();
  for (const char* id :
       {"1", "-7", "\"abc\"", R"({"x": [1, {"y": null}]})", "[]", "null", "true"}) {
    SCOPED_TRACE(id);
    json::value expected_id = json::parse(id);
    json::value ok = one(std::string(R"({"execute": "echo", "id": )") + id + "}");
    EXPECT_EQ(ok, (json::object{{"return", json::object()}, {"id", expected_id}}));
    json::value err = one(std::string(R"({"execute": "nope", "id": )") + id + "}");
    ASSERT_TRUE(err.is_object());
    EXPECT_EQ(err.at("id"), expected_id);
    EXPECT_TRUE(err.as_object().contains("error"));
    json::value envelope = one(std::string(R"({"bad": 1, "id": )") + id + "}");
    EXPECT_EQ(envelope.at("id"), expected_id);
  }
}

TEST_F(SessionTest, NoIdWhenNoneWasSent) {
  negotiate();
  json::value r = one(R"({"execute": "echo"})");
  EXPECT_FALSE(r.as_object().contains("id"));
  json::value e = one(R"({"execute": "nope"})");
  EXPECT_FALSE(e.as_object().contains("id"));
}

TEST_F(SessionTest, ResponseMemberOrderMatchesQemu) {
  negotiate();
  ASSERT_TRUE(session_.feed(R"({"execute": "echo", "id": "x"})"));
  EXPECT_EQ(session_.take_output(), "{\"return\": {}, \"id\": \"x\"}\r\n");
  ASSERT_TRUE(session_.feed(R"({"execute": "nope", "id": "x"})"));
  EXPECT_EQ(session_.take_output(),
            "{\"id\": \"x\", \"error\": {\"class\": \"CommandNotFound\", "
            "\"desc\": \"The command nope has not been found\"}}\r\n");
}

TEST_F(SessionTest, HandlerErrorClassIsKept) {
  negotiate();
  EXPECT_EQ(one(R"({"execute": "job-cancel", "arguments": {"device": "j"}})"),
            error("DeviceNotActive", "Block job 'j' not found"));
}

TEST_F(SessionTest, ArgumentErrorOutranksHandlerResult) {
  negotiate();
  EXPECT_EQ(one(R"({"execute": "forgets-to-check"})"), generic("Parameter 'name' is missing"));
}

TEST_F(SessionTest, ThrowingHandlerGivesGenericError) {
  negotiate();
  json::value r = one(R"({"execute": "throws", "id": 3})");
  EXPECT_EQ(r.at("id"), 3);
  EXPECT_EQ(r.at("error").at("class"), "GenericError");
  EXPECT_EQ(one(R"({"execute": "echo"})"), json::parse(R"({"return": {}})"));
}

// ---- stream framing

TEST_F(SessionTest, ObjectSplitByteByByte) {
  negotiate();
  std::string cmd = R"({"execute": "echo", "arguments": {"value": "a\"b}"}, "id": 9})";
  for (std::size_t i = 0; i + 1 < cmd.size(); ++i) {
    ASSERT_TRUE(session_.feed(cmd.substr(i, 1)));
    ASSERT_EQ(session_.take_output(), "") << "answered early at byte " << i;
  }
  auto r = send(cmd.substr(cmd.size() - 1));
  ASSERT_EQ(r.size(), 1u);
  EXPECT_EQ(r[0], json::parse(R"({"return": "a\"b}", "id": 9})"));
}

TEST_F(SessionTest, TwoObjectsInOneFeed) {
  negotiate();
  auto r = send(R"({"execute": "echo", "id": 1}{"execute": "echo", "id": 2})");
  ASSERT_EQ(r.size(), 2u);
  EXPECT_EQ(r[0].at("id"), 1);
  EXPECT_EQ(r[1].at("id"), 2);
}

TEST_F(SessionTest, NegotiationAndCommandInOneFeed) {
  auto r = send("{\"execute\": \"qmp_capabilities\"}\n{\"execute\": \"echo\", \"id\": 1}\n");
  ASSERT_EQ(r.size(), 2u);
  EXPECT_EQ(r[0], json::parse(R"({"return": {}})"));
  EXPECT_EQ(r[1], json::parse(R"({"return": {}, "id": 1})"));
}

TEST_F(SessionTest, NewlinesInsideAnObject) {
  negotiate();
  auto r = send("{\n  \"execute\":\r\n \"echo\",\n\t\"id\"\n:\n4\n}\n");
  ASSERT_EQ(r.size(), 1u);
  EXPECT_EQ(r[0], json::parse(R"({"return": {}, "id": 4})"));
}

TEST_F(SessionTest, SplitAcrossFeedsWithNewline) {
  negotiate();
  EXPECT_TRUE(send("{\"execute\":\n").empty());
  EXPECT_TRUE(send("  \"echo\", \"arguments\": {\"value\"").empty());
  auto r = send(": 12}}\r\n{\"execute\": \"ec");
  ASSERT_EQ(r.size(), 1u);
  EXPECT_EQ(r[0], json::parse(R"({"return": 12})"));
  r = send("ho\"}");
  ASSERT_EQ(r.size(), 1u);
}

TEST_F(SessionTest, BareNumberWaitsForADelimiter) {
  negotiate();
  EXPECT_TRUE(send("5").empty());  // "55" may follow
  auto r = send("5 ");
  ASSERT_EQ(r.size(), 1u);
  EXPECT_EQ(r[0], generic("QMP input must be a JSON object"));
}

TEST_F(SessionTest, GarbageLineThenValidCommand) {
  negotiate();
  auto r = send("garbage\n{\"execute\": \"echo\", \"id\": 1}\n");
  ASSERT_EQ(r.size(), 2u);
  EXPECT_EQ(r[0], generic("JSON parse error, invalid keyword 'garbage'"));
  EXPECT_EQ(r[1], json::parse(R"({"return": {}, "id": 1})"));
}

TEST_F(SessionTest, EachGarbageWordIsAnError) {
  negotiate();
  // As QEMU 7.2: one error per bare token.
  auto r = send("this is not json\n");
  ASSERT_EQ(r.size(), 4u);
  EXPECT_EQ(r[3], generic("JSON parse error, invalid keyword 'json'"));
}

TEST_F(SessionTest, GarbageGluedToACommand) {
  negotiate();
  // QEMU 7.2 answers both: an error for "xyz", then the command.
  auto r = send(R"(xyz{"execute": "echo", "id": 3})");
  ASSERT_EQ(r.size(), 2u);
  EXPECT_EQ(r[0], generic("JSON parse error, invalid keyword 'xyz'"));
  EXPECT_EQ(r[1].at("id"), 3);
}

TEST_F(SessionTest, SyntaxErrorInsideAnObjectSkipsThatObjectOnly) {
  negotiate();
  auto r = send(R"({"execute": bad, "arguments": {"x": [1]}}{"execute": "echo", "id": 2})");
  ASSERT_EQ(r.size(), 2u);
  EXPECT_EQ(r[0].at("error").at("class"), "GenericError");
  EXPECT_TRUE(
      std::string_view(r[0].at("error").at("desc").as_string()).starts_with("JSON parse error, "));
  EXPECT_EQ(r[1], json::parse(R"({"return": {}, "id": 2})"));
}

TEST_F(SessionTest, UnbalancedBrokenLineRecoversAtNewline) {
  negotiate();
  auto r = send("{\"execute\": bad, \"arguments\": {\n{\"execute\": \"echo\", \"id\": 2}\n");
  ASSERT_EQ(r.size(), 2u);
  EXPECT_TRUE(r[0].as_object().contains("error"));
  EXPECT_EQ(r[1], json::parse(R"({"return": {}, "id": 2})"));
}

TEST_F(SessionTest, RecoverySpansFeeds) {
  negotiate();
  auto r = send("{\"execute\": bad, \"arguments\": {\"value\": \"}");
  ASSERT_EQ(r.size(), 1u);  // reported at once
  EXPECT_TRUE(send("still the broken line\"}}").empty());
  r = send("\n{\"execute\": \"echo\", \"id\": 5}");
  ASSERT_EQ(r.size(), 1u);
  EXPECT_EQ(r[0].at("id"), 5);
}

TEST_F(SessionTest, StrayClosersAndBadEscapes) {
  negotiate();
  auto r = send("}\n");
  ASSERT_EQ(r.size(), 1u);
  EXPECT_EQ(r[0], generic("JSON parse error, expecting value"));
  r = send("\"\\q\" {\"execute\": \"echo\", \"id\": 1}\n");
  ASSERT_EQ(r.size(), 2u);
  EXPECT_TRUE(r[0].as_object().contains("error"));
  EXPECT_EQ(r[1].at("id"), 1);
}

TEST_F(SessionTest, ParseErrorBeforeNegotiation) {
  auto r = send("{,}\n");
  ASSERT_EQ(r.size(), 1u);
  EXPECT_EQ(r[0].at("error").at("class"), "GenericError");
  negotiate();
}

TEST_F(SessionTest, DeepNestingIsAParseErrorNotAClose) {
  negotiate();
  std::string deep(2000, '[');
  deep += std::string(2000, ']');
  auto r = send(deep + "\n{\"execute\": \"echo\", \"id\": 1}\n");
  ASSERT_EQ(r.size(), 2u);
  EXPECT_TRUE(r[0].as_object().contains("error"));
  EXPECT_EQ(r[1].at("id"), 1);
}

TEST_F(SessionTest, OversizedValueIsHopeless) {
  negotiate();
  std::string big = R"({"execute": "echo", "arguments": {"value": ")";
  big += std::string(Session::kMaxValueBytes, 'x');
  bool ok = true;
  for (std::size_t i = 0; i < big.size() && ok; i += 65536)
    ok = session_.feed(big.substr(i, 65536));
  EXPECT_FALSE(ok);
  auto r = take();
  ASSERT_EQ(r.size(), 1u);
  EXPECT_EQ(r[0].at("error").at("class"), "GenericError");
  EXPECT_FALSE(session_.feed("{\"execute\": \"echo\"}"));
}

TEST_F(SessionTest, LargeValueUnderTheLimitIsServed) {
  negotiate();
  std::string payload(512 * 1024, 'y');
  auto r = send(R"({"execute": "echo", "arguments": {"value": ")" + payload + "\"}}");
  ASSERT_EQ(r.size(), 1u);
  EXPECT_EQ(r[0].at("return").as_string().size(), payload.size());
}

TEST_F(SessionTest, OversizedGarbageTokenIsHopeless) {
  negotiate();
  EXPECT_FALSE(session_.feed(std::string(Session::kMaxValueBytes + 1, 'z')));
}

// ---- events

TEST_F(SessionTest, EventDuringCommandPrecedesItsReturn) {
  negotiate();
  auto r = send(R"({"execute": "export-del", "arguments": {"id": "fleece"}, "id": 1})");
  ASSERT_EQ(r.size(), 2u);
  EXPECT_EQ(r[0].at("event"), "BLOCK_EXPORT_DELETED");
  EXPECT_EQ(r[0].at("data"), json::parse(R"({"id": "fleece"})"));
  const json::object& ts = r[0].at("timestamp").as_object();
  EXPECT_GT(ts.at("seconds").as_int64(), 1600000000);
  EXPECT_GE(ts.at("microseconds").as_int64(), 0);
  EXPECT_LT(ts.at("microseconds").as_int64(), 1000000);
  EXPECT_EQ(r[1], json::parse(R"({"return": {}, "id": 1})"));
}

TEST_F(SessionTest, EventsAndResponsesKeepTheirOrder) {
  negotiate();
  session_.emit("A", {});
  ASSERT_TRUE(session_.feed(R"({"execute": "echo", "id": 1})"));
  session_.emit("B", json::object{{"n", 2}});
  auto r = take();
  ASSERT_EQ(r.size(), 3u);
  EXPECT_EQ(r[0].at("event"), "A");
  EXPECT_EQ(r[0].at("data"), json::object());
  EXPECT_EQ(r[1].at("id"), 1);
  EXPECT_EQ(r[2].at("event"), "B");
  EXPECT_EQ(r[2].at("data").at("n"), 2);
}

TEST_F(SessionTest, EventMemberOrderMatchesQemu) {
  negotiate();
  session_.emit("X", json::object{{"id", "e"}});
  std::string out = session_.take_output();
  EXPECT_TRUE(out.starts_with("{\"timestamp\": {\"seconds\": ")) << out;
  EXPECT_NE(out.find("}, \"event\": \"X\", \"data\": {\"id\": \"e\"}}\r\n"), std::string::npos)
      << out;
}

TEST_F(SessionTest, EventsBeforeNegotiationAreDropped) {
  session_.emit("EARLY", {});
  EXPECT_EQ(session_.take_output(), "");
}

}  // namespace
}  // namespace fleeced::server::control
