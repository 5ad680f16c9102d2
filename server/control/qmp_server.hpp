// SPDX-License-Identifier: MIT
// QmpServer: the control socket. A unix-socket listener with its own
// io_context and thread (the control thread), so commands, which may block
// briefly, never run on the NBD event loops. It serves one client at a time;
// a second client waits in the listen backlog until the first disconnects.
// Created and started by main(); emit_event() and post() may be called from
// any thread.
#pragma once

#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <system_error>
#include <thread>

#include <boost/asio/awaitable.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/local/stream_protocol.hpp>

#include "server/control/qmp.hpp"

namespace fleeced::server::control {

class QmpServer {
 public:
  // `commands` must outlive the server; `version` goes into each greeting.
  QmpServer(const CommandTable& commands, json::object version);
  ~QmpServer();  // stop()
  QmpServer(const QmpServer&) = delete;
  QmpServer& operator=(const QmpServer&) = delete;

  // Binds and listens at `path`, replacing a stale socket file left by a dead
  // process. Errors: EADDRINUSE when a live server answers there or `path` is
  // not a socket; ENAMETOOLONG; bind/listen errno.
  std::error_code listen(const std::string& path);
  // Starts the control thread and accepts clients.
  void start();
  // Closes the listener, lets the client's pending output go out (at most
  // about a second), closes it, joins the control thread and removes the
  // socket file. Idempotent. Thread: any; on the control thread itself it
  // only begins the shutdown (the destructor joins).
  void stop();

  // Sends an event to the connected, negotiated client, if any; dropped
  // otherwise. Thread: any. On the control thread (inside a command) it is
  // queued at once, so it precedes that command's response.
  void emit_event(std::string name, json::object data);
  // Runs `fn` on the control thread after whatever runs there now.
  void post(std::function<void()> fn);
  bool on_control_thread() const;

 private:
  struct Client;
  boost::asio::awaitable<void> async_accept_loop();
  boost::asio::awaitable<void> async_serve(const std::shared_ptr<Client>& client);
  void queue_output(const std::shared_ptr<Client>& client, std::string text);
  void start_write(const std::shared_ptr<Client>& client);
  void close_when_drained(const std::shared_ptr<Client>& client);
  void close_client(const std::shared_ptr<Client>& client);
  void deliver_event(const std::string& name, json::object data);
  void begin_shutdown();

  // Immutable after construction.
  const CommandTable& commands_;
  const json::object version_;

  mutable boost::asio::io_context io_{1};
  // Control thread only (after start()).
  boost::asio::local::stream_protocol::acceptor acceptor_;
  std::shared_ptr<Client> client_;  // the client being served, if any
  bool stopping_ = false;

  // Owner's thread only.
  std::string path_;  // the socket file we created; removed by stop()
  std::thread thread_;
  std::atomic<bool> stopped_{false};
};

}  // namespace fleeced::server::control
