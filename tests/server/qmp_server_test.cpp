// SPDX-License-Identifier: MIT
// QmpServer (server/control/qmp_server.hpp) over a real unix socket, driven
// by a blocking client with timeouts: greeting, negotiation, commands,
// events from other threads, one client at a time, reconnects, stop().
#include "server/control/qmp_server.hpp"

#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <future>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>

namespace fleeced::server::control {
namespace {

using namespace std::chrono_literals;

// A blocking QMP client; every wait is bounded so a silent server fails the test.
class LineClient {
 public:
  explicit LineClient(const std::string& path) {
    fd_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd_ < 0) throw std::runtime_error("socket failed");
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    path.copy(addr.sun_path, sizeof(addr.sun_path) - 1);
    if (::connect(fd_, reinterpret_cast<const sockaddr*>(&addr), sizeof(addr)) != 0) {
      ::close(fd_);
      throw std::runtime_error("connect failed: " + std::string(std::strerror(errno)));
    }
  }
  ~LineClient() { close(); }
  LineClient(const LineClient&) = delete;
  LineClient& operator=(const LineClient&) = delete;

  void close() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

  void send(std::string_view bytes) {
    while (!bytes.empty()) {
      ssize_t n = ::send(fd_, bytes.data(), bytes.size(), MSG_NOSIGNAL);
      if (n <= 0) throw std::runtime_error("send failed");
      bytes.remove_prefix(static_cast<std::size_t>(n));
    }
  }

  // The next line without its "\r\n", or nullopt on EOF or timeout.
  std::optional<std::string> line(std::chrono::milliseconds timeout = 5000ms) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    for (;;) {
      auto nl = buffer_.find('\n');
      if (nl != std::string::npos) {
        std::string out = buffer_.substr(0, nl);
        buffer_.erase(0, nl + 1);
        if (!out.empty() && out.back() == '\r') out.pop_back();
        return out;
      }
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
          deadline - std::chrono::steady_clock::now());
      if (left.count() <= 0) return std::nullopt;
      pollfd p{fd_, POLLIN, 0};
      if (::poll(&p, 1, static_cast<int>(left.count())) <= 0) return std::nullopt;
      char chunk[4096];
      ssize_t n = ::recv(fd_, chunk, sizeof(chunk), 0);
      if (n <= 0) return std::nullopt;
      buffer_.append(chunk, static_cast<std::size_t>(n));
    }
  }

  json::value message(std::chrono::milliseconds timeout = 5000ms) {
    auto l = line(timeout);
    if (!l) throw std::runtime_error("no line from the server");
    return json::parse(*l);
  }

  // True when the server closed the connection (EOF) within the timeout.
  bool closed_by_server(std::chrono::milliseconds timeout = 5000ms) {
    return !line(timeout).has_value() && eof();
  }

 private:
  bool eof() {
    char c;
    pollfd p{fd_, POLLIN, 0};
    if (::poll(&p, 1, 0) <= 0) return false;
    return ::recv(fd_, &c, 1, MSG_PEEK) == 0;
  }

  int fd_ = -1;
  std::string buffer_;
};

class QmpServerTest : public ::testing::Test {
 protected:
  QmpServerTest() {
    char tmpl[] = "/tmp/qmp-server-test-XXXXXX";
    dir_ = ::mkdtemp(tmpl);
    path_ = dir_ + "/qmp.sock";
    table_.add("echo", [](Args& a, EventSink&) {
      const json::value* v = a.value("value", false);
      if (!a.finish()) return CommandResult{json::object(), a.error()};
      return CommandResult::ok(v ? *v : json::value(json::object()));
    });
    table_.add("emit", [](Args& a, EventSink& events) {
      if (!a.finish()) return CommandResult{json::object(), a.error()};
      events.emit("BLOCK_EXPORT_DELETED", json::object{{"id", "e0"}});
      return CommandResult::ok();
    });
    // Emits through the server from the control thread, as a handler that
    // only holds the QmpServer would.
    table_.add("emit-via-server", [this](Args& a, EventSink&) {
      if (!a.finish()) return CommandResult{json::object(), a.error()};
      server_->emit_event("VIA_SERVER", json::object{});
      return CommandResult::ok();
    });
    table_.add("quit", [this](Args& a, EventSink&) {
      if (!a.finish()) return CommandResult{json::object(), a.error()};
      quit_requested_.set_value();
      return CommandResult::ok();
    });
    server_.emplace(table_,
                    json::object{{"qemu", json::object{{"major", 7}, {"minor", 2}, {"micro", 0}}},
                                 {"package", "test"}});
  }

  ~QmpServerTest() override {
    server_.reset();
    std::filesystem::remove_all(dir_);
  }

  void start() {
    ASSERT_FALSE(server_->listen(path_));
    server_->start();
  }

  static void expect_greeting(LineClient& c) {
    json::value g = c.message();
    ASSERT_TRUE(g.is_object());
    EXPECT_EQ(g.at("QMP").at("version").at("qemu").at("major"), 7);
    EXPECT_TRUE(g.at("QMP").at("capabilities").is_array());
  }

  static void negotiate(LineClient& c) {
    expect_greeting(c);
    c.send("{\"execute\": \"qmp_capabilities\"}\n");
    EXPECT_EQ(c.message(), json::parse(R"({"return": {}})"));
  }

  std::string dir_;
  std::string path_;
  CommandTable table_;
  std::promise<void> quit_requested_;
  std::optional<QmpServer> server_;
};

TEST_F(QmpServerTest, GreetingNegotiationAndCommand) {
  start();
  LineClient c(path_);
  expect_greeting(c);
  c.send("{\"execute\": \"echo\"}\n");
  EXPECT_EQ(c.message().at("error").at("class"), "CommandNotFound");
  c.send("{\"execute\": \"qmp_capabilities\"}\n");
  EXPECT_EQ(c.message(), json::parse(R"({"return": {}})"));
  c.send("{\"execute\": \"echo\", \"arguments\": {\"value\": 42}, \"id\": \"a\"}\n");
  EXPECT_EQ(c.message(), json::parse(R"({"return": 42, "id": "a"})"));
}

TEST_F(QmpServerTest, LinesEndWithCrLf) {
  start();
  LineClient c(path_);
  auto l = c.line();
  ASSERT_TRUE(l);  // line() strips one '\r'; a second would remain
  EXPECT_NE(l->back(), '\r');
  EXPECT_EQ(l->front(), '{');
}

TEST_F(QmpServerTest, CommandSplitAcrossWrites) {
  start();
  LineClient c(path_);
  negotiate(c);
  c.send("{\"execute\":");
  c.send(" \"echo\",\n \"id\": 1}");
  EXPECT_EQ(c.message(), json::parse(R"({"return": {}, "id": 1})"));
}

TEST_F(QmpServerTest, EventDuringCommandPrecedesReturn) {
  start();
  LineClient c(path_);
  negotiate(c);
  c.send("{\"execute\": \"emit\", \"id\": 1}\n");
  json::value first = c.message();
  EXPECT_EQ(first.at("event"), "BLOCK_EXPORT_DELETED");
  EXPECT_EQ(c.message(), json::parse(R"({"return": {}, "id": 1})"));
  c.send("{\"execute\": \"emit-via-server\", \"id\": 2}\n");
  EXPECT_EQ(c.message().at("event"), "VIA_SERVER");
  EXPECT_EQ(c.message(), json::parse(R"({"return": {}, "id": 2})"));
}

TEST_F(QmpServerTest, EventFromAnotherThreadReachesTheClient) {
  start();
  LineClient c(path_);
  negotiate(c);
  std::thread other([this] { server_->emit_event("JOB_STATUS_CHANGE", {{"id", "j"}}); });
  other.join();
  json::value e = c.message();
  EXPECT_EQ(e.at("event"), "JOB_STATUS_CHANGE");
  EXPECT_EQ(e.at("data").at("id"), "j");
}

TEST_F(QmpServerTest, EventWithoutClientIsDropped) {
  start();
  server_->emit_event("NOBODY", {});
  LineClient c(path_);
  negotiate(c);
  c.send("{\"execute\": \"echo\", \"id\": 1}\n");
  EXPECT_EQ(c.message().at("id"), 1);  // not the event
}

TEST_F(QmpServerTest, PostRunsOnTheControlThread) {
  start();
  std::promise<bool> on_thread;
  server_->post([&] { on_thread.set_value(server_->on_control_thread()); });
  auto f = on_thread.get_future();
  ASSERT_EQ(f.wait_for(5s), std::future_status::ready);
  EXPECT_TRUE(f.get());
  EXPECT_FALSE(server_->on_control_thread());
}

TEST_F(QmpServerTest, ReconnectGetsAFreshGreeting) {
  start();
  {
    LineClient c(path_);
    negotiate(c);
  }
  LineClient c(path_);
  expect_greeting(c);
  c.send("{\"execute\": \"echo\"}\n");  // must negotiate again
  EXPECT_EQ(c.message().at("error").at("class"), "CommandNotFound");
  c.send("{\"execute\": \"qmp_capabilities\"}\n");
  EXPECT_EQ(c.message(), json::parse(R"({"return": {}})"));
}

TEST_F(QmpServerTest, SecondClientWaitsForTheFirst) {
  start();
  auto first = std::make_unique<LineClient>(path_);
  negotiate(*first);
  LineClient second(path_);  // connects (backlog) but is not served yet
  EXPECT_FALSE(second.line(200ms).has_value());
  first.reset();
  expect_greeting(second);
}

TEST_F(QmpServerTest, GarbageDoesNotCloseTheConnection) {
  start();
  LineClient c(path_);
  negotiate(c);
  c.send("not-json\n");
  EXPECT_EQ(c.message(), json::parse(R"({"error": {"class": "GenericError",
                 "desc": "JSON parse error, syntax error"}})"));
  c.send("{\"execute\": \"echo\", \"id\": 1}\n");
  EXPECT_EQ(c.message().at("id"), 1);
}

TEST_F(QmpServerTest, OversizedInputClosesAfterTheError) {
  start();
  LineClient c(path_);
  negotiate(c);
  std::string big = "{\"execute\": \"echo\", \"arguments\": {\"value\": \"";
  big += std::string(Session::kMaxValueBytes + 1, 'x');
  std::thread writer([&] {
    try {
      c.send(big);
    } catch (const std::exception&) {  // the server may close first
    }
  });
  json::value e = c.message();
  EXPECT_EQ(e.at("error").at("class"), "GenericError");
  EXPECT_TRUE(c.closed_by_server());
  writer.join();
  LineClient next(path_);  // the server goes on
  expect_greeting(next);
}

TEST_F(QmpServerTest, QuitResponseArrivesBeforeStopCloses) {
  start();
  LineClient c(path_);
  negotiate(c);
  c.send("{\"execute\": \"quit\", \"id\": \"q\"}\n");
  ASSERT_EQ(quit_requested_.get_future().wait_for(5s), std::future_status::ready);
  server_->stop();  // as main() does once the quit handler returned
  EXPECT_EQ(c.message(), json::parse(R"({"return": {}, "id": "q"})"));
  EXPECT_TRUE(c.closed_by_server());
}

TEST_F(QmpServerTest, StopClosesClientAndRemovesSocket) {
  start();
  LineClient c(path_);
  negotiate(c);
  struct stat st {};
  ASSERT_EQ(::lstat(path_.c_str(), &st), 0);
  EXPECT_TRUE(S_ISSOCK(st.st_mode));
  server_->stop();
  EXPECT_TRUE(c.closed_by_server());
  EXPECT_NE(::lstat(path_.c_str(), &st), 0);
  server_->stop();  // idempotent
}

TEST_F(QmpServerTest, StopWithoutStart) {
  ASSERT_FALSE(server_->listen(path_));
  server_->stop();
  EXPECT_FALSE(std::filesystem::exists(path_));
}

TEST_F(QmpServerTest, ReplacesAStaleSocket) {
  // What a crashed server leaves: a socket file nobody listens on.
  int fd = ::socket(AF_UNIX, SOCK_STREAM, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  path_.copy(addr.sun_path, sizeof(addr.sun_path) - 1);
  ASSERT_EQ(::bind(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof(addr)), 0);
  ::close(fd);
  start();
  LineClient c(path_);
  expect_greeting(c);
}

TEST_F(QmpServerTest, RefusesALiveSocketAndAFile) {
  start();
  QmpServer other(table_, {});
  EXPECT_EQ(other.listen(path_), std::make_error_code(std::errc::address_in_use));
  LineClient c(path_);  // the first server still owns it
  expect_greeting(c);

  std::string file = dir_ + "/plain-file";
  std::ofstream(file) << "keep me";
  QmpServer third(table_, {});
  EXPECT_EQ(third.listen(file), std::make_error_code(std::errc::address_in_use));
  EXPECT_TRUE(std::filesystem::exists(file));
}

TEST_F(QmpServerTest, PathTooLong) {
  EXPECT_EQ(server_->listen(dir_ + "/" + std::string(200, 'p')),
            std::make_error_code(std::errc::filename_too_long));
}

}  // namespace
}  // namespace fleeced::server::control
