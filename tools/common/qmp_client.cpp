// SPDX-License-Identifier: MIT
#include "common/qmp_client.hpp"

#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <iostream>

#include <boost/json.hpp>

namespace fleece::tools {

namespace json = boost::json;

QmpError::QmpError(std::string command, std::string error_class, std::string desc)
    : std::runtime_error(command + ": " + error_class + ": " + desc),
      command_(std::move(command)),
      class_(std::move(error_class)),
      desc_(std::move(desc)) {}

QmpClient::QmpClient(const std::string& path, int timeout_seconds, bool show_events)
    : path_(path), timeout_seconds_(timeout_seconds), show_events_(show_events) {
  sockaddr_un addr{};
  if (path.size() >= sizeof(addr.sun_path)) throw QmpFailure("socket path too long: " + path);
  fd_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd_ < 0) throw QmpFailure(std::string("socket: ") + std::strerror(errno));
  addr.sun_family = AF_UNIX;
  path.copy(addr.sun_path, sizeof(addr.sun_path) - 1);
  if (::connect(fd_, reinterpret_cast<const sockaddr*>(&addr), sizeof(addr)) != 0) {
    const int err = errno;
    ::close(fd_);
    throw QmpFailure("cannot connect to " + path + ": " + std::strerror(err));
  }
}

QmpClient::~QmpClient() { ::close(fd_); }

std::optional<json::object> QmpClient::negotiate() {
  std::optional<json::object> greeting = read_message(-1);
  if (!greeting || !greeting->contains("QMP")) {
    throw QmpFailure(path_ + " does not speak QMP (no greeting)");
  }
  json::object response = call(R"({"execute": "qmp_capabilities"})");
  if (response.contains("error")) return response;
  return std::nullopt;
}

json::object QmpClient::call(std::string_view text) {
  std::string line(text);
  line += '\n';
  send_all(line);
  for (;;) {
    std::optional<json::object> message = read_message(-1);
    if (!message->contains("event")) return std::move(*message);
    if (show_events_) std::cerr << last_line_ << '\n';
    events_.push_back(std::move(*message));
  }
}

json::value QmpClient::execute(const std::string& command, const json::object& arguments) {
  json::object request{{"execute", command}};
  if (!arguments.empty()) request["arguments"] = arguments;
  json::object response = call(json::serialize(request));
  if (const json::value* err = response.if_contains("error")) {
    std::string cls = "GenericError", desc = json::serialize(*err);
    if (err->is_object()) {
      const json::object& e = err->as_object();
      if (const json::value* c = e.if_contains("class"); c && c->is_string()) {
        cls = std::string(c->as_string());
      }
      if (const json::value* d = e.if_contains("desc"); d && d->is_string()) {
        desc = std::string(d->as_string());
      }
    }
    throw QmpError(command, cls, desc);
  }
  json::value* ret = response.if_contains("return");
  if (!ret) throw QmpFailure(command + ": response without 'return': " + last_line_);
  return std::move(*ret);
}

namespace {
bool matches(const json::object& event, const std::string& name, const json::object& match) {
  const json::value* ev = event.if_contains("event");
  if (!ev || !ev->is_string() || ev->as_string() != name) return false;
  const json::value* data = event.if_contains("data");
  for (const auto& [key, want] : match) {
    if (!data || !data->is_object()) return false;
    const json::value* got = data->as_object().if_contains(key);
    if (!got || *got != want) return false;
  }
  return true;
}

json::object data_of(const json::object& event) {
  const json::value* data = event.if_contains("data");
  return data && data->is_object() ? data->as_object() : json::object{};
}
}  // namespace

std::optional<json::object> QmpClient::wait_event(const std::string& name,
                                                  const json::object& match,
                                                  std::chrono::milliseconds timeout) {
  for (auto it = events_.begin(); it != events_.end(); ++it) {
    if (matches(*it, name, match)) {
      json::object data = data_of(*it);
      events_.erase(it);
      return data;
    }
  }
  using Clock = std::chrono::steady_clock;
  const auto deadline = Clock::now() + timeout;
  for (;;) {
    const auto left =
        std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
    if (left.count() <= 0) return std::nullopt;
    std::optional<json::object> message = read_message(static_cast<int>(left.count()));
    if (!message) return std::nullopt;
    if (!message->contains("event")) continue;  // a stray response: nobody asked
    if (show_events_) std::cerr << last_line_ << '\n';
    if (matches(*message, name, match)) return data_of(*message);
    events_.push_back(std::move(*message));
  }
}

void QmpClient::send_all(std::string_view bytes) {
  while (!bytes.empty()) {
    const ssize_t n = ::send(fd_, bytes.data(), bytes.size(), MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) throw QmpFailure(std::string("send to ") + path_ + ": " + std::strerror(errno));
    bytes.remove_prefix(static_cast<std::size_t>(n));
  }
}

std::optional<json::object> QmpClient::read_message(int wait_ms) {
  for (;;) {
    std::optional<std::string> line = read_line(wait_ms);
    if (!line) return std::nullopt;
    if (line->find_first_not_of(" \t\r") == std::string::npos) continue;
    json::error_code ec;
    json::value v = json::parse(*line, ec);
    if (ec || !v.is_object()) throw QmpFailure("unexpected output from the server: " + *line);
    last_line_ = std::move(*line);
    return std::move(v.as_object());
  }
}

std::optional<std::string> QmpClient::read_line(int wait_ms) {
  using Clock = std::chrono::steady_clock;
  const bool default_timeout = wait_ms < 0;
  if (default_timeout) wait_ms = timeout_seconds_ > 0 ? timeout_seconds_ * 1000 : -1;
  const auto deadline = Clock::now() + std::chrono::milliseconds(wait_ms < 0 ? 0 : wait_ms);
  for (;;) {
    const std::size_t nl = buffer_.find('\n');
    if (nl != std::string::npos) {
      std::string line = buffer_.substr(0, nl);
      buffer_.erase(0, nl + 1);
      if (!line.empty() && line.back() == '\r') line.pop_back();
      return line;
    }
    int left_ms = -1;
    if (wait_ms >= 0) {
      const auto left =
          std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
      if (left.count() <= 0) {
        if (!default_timeout) return std::nullopt;
        throw QmpFailure("no answer from " + path_ + " within " + std::to_string(timeout_seconds_) +
                         " s");
      }
      left_ms = static_cast<int>(left.count());
    }
    pollfd p{fd_, POLLIN, 0};
    const int r = ::poll(&p, 1, left_ms);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) throw QmpFailure(std::string("poll: ") + std::strerror(errno));
    if (r == 0) continue;  // the deadline check above reports it
    char chunk[65536];
    const ssize_t n = ::recv(fd_, chunk, sizeof(chunk), 0);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) throw QmpFailure(std::string("recv: ") + std::strerror(errno));
    if (n == 0) throw QmpFailure("connection closed by " + path_);
    buffer_.append(chunk, static_cast<std::size_t>(n));
  }
}

}  // namespace fleece::tools
