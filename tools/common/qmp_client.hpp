// SPDX-License-Identifier: MIT
// A small blocking QMP client for the command-line tools (fleecectl,
// fleece-backup): unix socket, one JSON object per line, timeouts, events
// kept for whoever waits on them. It talks to fleeced and to QEMU alike.
#pragma once

#include <chrono>
#include <deque>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>

#include <boost/json/object.hpp>

namespace fleece::tools {

// A connection or protocol problem (not a QMP error response).
class QmpFailure : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A QMP error response: {"error": {"class": ..., "desc": ...}}.
class QmpError : public std::runtime_error {
 public:
  QmpError(std::string command, std::string error_class, std::string desc);
  const std::string& command() const { return command_; }
  const std::string& error_class() const { return class_; }
  const std::string& desc() const { return desc_; }

 private:
  std::string command_, class_, desc_;
};

class QmpClient {
 public:
  // Connects; throws QmpFailure. timeout_seconds <= 0 waits forever.
  QmpClient(const std::string& path, int timeout_seconds, bool show_events);
  ~QmpClient();
  QmpClient(const QmpClient&) = delete;
  QmpClient& operator=(const QmpClient&) = delete;

  // Reads the greeting and negotiates capabilities; returns the error response, if any.
  std::optional<boost::json::object> negotiate();

  // Sends one JSON text and returns the first message that is not an event.
  // Events that arrive meanwhile are queued (and echoed on stderr if show_events).
  boost::json::object call(std::string_view text);

  // execute(): call() that throws QmpError on an error response and returns
  // the "return" member (an empty object when it is not an object).
  boost::json::value execute(const std::string& command, const boost::json::object& arguments = {});

  // Waits until an event named `name` whose "data" contains every member of
  // `match` arrives (queued ones first); returns its data. nullopt on timeout.
  std::optional<boost::json::object> wait_event(const std::string& name,
                                                const boost::json::object& match,
                                                std::chrono::milliseconds timeout);

  // The last line received, as the server sent it (without "\r\n").
  const std::string& last_line() const { return last_line_; }
  const std::string& path() const { return path_; }

 private:
  void send_all(std::string_view bytes);
  // Returns nullopt when the deadline passes (deadline_ms < 0: default timeout, throws).
  std::optional<boost::json::object> read_message(int wait_ms);
  std::optional<std::string> read_line(int wait_ms);

  std::string path_;
  int timeout_seconds_;
  bool show_events_;
  int fd_ = -1;
  std::string buffer_;
  std::string last_line_;
  std::deque<boost::json::object> events_;
};

}  // namespace fleece::tools
