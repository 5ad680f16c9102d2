// SPDX-License-Identifier: MIT
// Server: which event loop an accepted connection lands on. A connection
// stays on loop 0 (the listeners' loop, so no other thread is woken to start
// it) unless another loop serves fewer connections. SocketStream's socket
// options.
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "server/export_registry.hpp"
#include "server/server.hpp"
#include "server/stream.hpp"

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

// The kernel grants 2 x min(asked, net.core.wmem_max) bytes.
TEST(SocketStream, UnixSocketsAskForALargerSendBuffer) {
  long wmem_max = 0;
  std::ifstream("/proc/sys/net/core/wmem_max") >> wmem_max;
  ASSERT_GT(wmem_max, 0);
  int fds[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds), 0);
  int before = 0;
  socklen_t len = sizeof before;
  ASSERT_EQ(::getsockopt(fds[0], SOL_SOCKET, SO_SNDBUF, &before, &len), 0);
  boost::asio::io_context io;
  boost::asio::generic::stream_protocol::socket socket(
      io, boost::asio::generic::stream_protocol(AF_UNIX, 0), fds[0]);
  SocketStream stream(std::move(socket));
  int after = 0;
  len = sizeof after;
  ASSERT_EQ(::getsockopt(stream.socket().native_handle(), SOL_SOCKET, SO_SNDBUF, &after, &len), 0);
  const long want = 2 * std::min<long>(SocketStream::kUnixSendBufferBytes, wmem_max);
  EXPECT_EQ(after, want) << "default was " << before;
  ::close(fds[1]);
}

}  // namespace
}  // namespace fleeced::server
