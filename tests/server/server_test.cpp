// SPDX-License-Identifier: MIT
// Server: which event loop an accepted connection lands on. A connection
// stays on loop 0 (the listeners' loop, so no other thread is woken to start
// it) unless another loop serves fewer connections.
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "server/export_registry.hpp"
#include "server/server.hpp"

namespace fleeced::server {
namespace {

class ServerLoops : public ::testing::Test {
 protected:
  ServerLoops() : server_(options(), registry_) {
    char tmpl[] = "/tmp/fleeced-server-test.XXXXXX";
    dir_ = ::mkdtemp(tmpl);
    address_.kind = ListenAddress::Kind::unix_socket;
    address_.path = dir_ + "/nbd.sock";
  }
  ~ServerLoops() override {
    for (int fd : fds_) ::close(fd);
    if (runner_.joinable()) {
      server_.stop();
      runner_.join();
    }
    std::filesystem::remove_all(dir_);
  }

  static ServerOptions options() {
    ServerOptions o;
    o.threads = 2;
    o.io_threads = 1;
    o.shutdown_grace = std::chrono::milliseconds(200);
    return o;
  }

  void start() {
    ASSERT_FALSE(server_.listen(address_));
    runner_ = std::thread([this] { server_.run(); });
  }

  // A raw client left in the handshake: the server keeps its connection open.
  int connect_client() {
    int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un sa{};
    sa.sun_family = AF_UNIX;
    std::memcpy(sa.sun_path, address_.path.c_str(), address_.path.size() + 1);
    if (::connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof sa) != 0) {
      ::close(fd);
      return -1;
    }
    fds_.push_back(fd);
    return fd;
  }

  void disconnect(int fd) {
    ::close(fd);
    std::erase(fds_, fd);
  }

  // Waits (bounded) until the per-loop counts equal `want`; returns the last seen.
  std::vector<unsigned> wait_counts(const std::vector<unsigned>& want) {
    std::vector<unsigned> seen;
    for (int i = 0; i < 500; ++i) {  // <= 5 s
      seen = server_.loop_connection_counts();
      if (seen == want) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    return seen;
  }

  ExportRegistry registry_;
  Server server_;
  ListenAddress address_;
  std::string dir_;
  std::vector<int> fds_;
  std::thread runner_;
};

using Counts = std::vector<unsigned>;

TEST_F(ServerLoops, ConnectionsGoToTheLeastLoadedLoopPreferringLoopZero) {
  start();
  int a = connect_client();
  ASSERT_GE(a, 0);
  EXPECT_EQ(wait_counts({1, 0}), (Counts{1, 0})) << "the first connection stays on loop 0";
  int b = connect_client();
  ASSERT_GE(b, 0);
  EXPECT_EQ(wait_counts({1, 1}), (Counts{1, 1})) << "the second goes to the idle loop";
  int c = connect_client();
  ASSERT_GE(c, 0);
  EXPECT_EQ(wait_counts({2, 1}), (Counts{2, 1})) << "a tie goes to loop 0";
  disconnect(a);
  disconnect(c);
  EXPECT_EQ(wait_counts({0, 1}), (Counts{0, 1}));
  int d = connect_client();
  ASSERT_GE(d, 0);
  EXPECT_EQ(wait_counts({1, 1}), (Counts{1, 1})) << "loop 0 had fewer";
  int e = connect_client();
  ASSERT_GE(e, 0);
  EXPECT_EQ(wait_counts({2, 1}), (Counts{2, 1}));
  int f = connect_client();
  ASSERT_GE(f, 0);
  EXPECT_EQ(wait_counts({2, 2}), (Counts{2, 2})) << "the moved socket is served on loop 1";
}

TEST_F(ServerLoops, SequentialConnectionsAllStayOnLoopZero) {
  start();
  for (int i = 0; i < 5; ++i) {
    int fd = connect_client();
    ASSERT_GE(fd, 0);
    ASSERT_EQ(wait_counts({1, 0}), (Counts{1, 0})) << "connection " << i;
    disconnect(fd);
    ASSERT_EQ(wait_counts({0, 0}), (Counts{0, 0})) << "connection " << i;
  }
}

TEST_F(ServerLoops, AMovedConnectionIsServed) {
  start();
  int a = connect_client();
  ASSERT_GE(a, 0);
  ASSERT_EQ(wait_counts({1, 0}), (Counts{1, 0}));
  int b = connect_client();  // lands on loop 1 through release() + assign()
  ASSERT_GE(b, 0);
  ASSERT_EQ(wait_counts({1, 1}), (Counts{1, 1}));
  // Its greeting arrives: "NBDMAGIC" "IHAVEOPT" and the handshake flags.
  unsigned char greeting[18] = {};
  std::size_t got = 0;
  for (int i = 0; i < 100 && got < sizeof greeting; ++i) {  // bounded
    ssize_t n = ::recv(b, greeting + got, sizeof greeting - got, 0);
    if (n <= 0) break;
    got += static_cast<std::size_t>(n);
  }
  ASSERT_EQ(got, sizeof greeting);
  EXPECT_EQ(std::string(reinterpret_cast<char*>(greeting), 16), "NBDMAGICIHAVEOPT");
}

}  // namespace
}  // namespace fleeced::server
