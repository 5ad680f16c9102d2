// SPDX-License-Identifier: MIT
// The QMP subset of the control socket (docs: shared control-api.md §1):
// argument validation with QEMU 7.2's error texts, the command table, and a
// session that turns a byte stream of JSON objects into responses and events.
// Pure: no sockets here (server/control/qmp_server.cpp carries the bytes).
// A Session and its CommandTable are used from the control thread only.
#pragma once

#include <cstdint>
#include <functional>
#include <initializer_list>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <boost/json.hpp>

namespace fleeced::server::control {

namespace json = boost::json;

struct QmpError {
  std::string error_class = "GenericError";  // GenericError, CommandNotFound, DeviceNotActive
  std::string desc;
};

// What a command returns: a value ({} when it has none) or an error.
struct CommandResult {
  json::value value = json::object();
  std::optional<QmpError> error;
  static CommandResult ok(json::value v = json::object()) { return {std::move(v), std::nullopt}; }
  static CommandResult fail(std::string desc, std::string cls = "GenericError") {
    return {json::object(), QmpError{std::move(cls), std::move(desc)}};
  }
};

// Validating reader over one arguments object. Every getter marks its key as
// known; the first problem is kept (error()) and later getters return
// nullopt. finish() reports unknown keys. Key names in messages carry the
// prefix, e.g. "options[0].driver".
class Args {
 public:
  explicit Args(const json::object* object, std::string prefix = "");

  std::optional<std::string> string(std::string_view key, bool required);
  std::optional<bool> boolean(std::string_view key, bool required);
  // Unsigned integers, worded as QEMU 7.2's input visitor: anything but a
  // non-negative integer is "Parameter 'KEY' expects uint64" (QEMU would wrap
  // a negative number; we refuse it), and a uint32 above UINT32_MAX, or
  // negative, is "Parameter 'KEY' expects uint32_t".
  std::optional<uint64_t> uint64(std::string_view key, bool required);
  std::optional<uint32_t> uint32(std::string_view key, bool required);
  // Anything but an integer in int64 range is "Invalid parameter type for
  // 'KEY', expected: integer" (QEMU 7.2's wording for int64).
  std::optional<int64_t> int64(std::string_view key, bool required);
  // One of `allowed`, else "Parameter 'KEY' does not accept value 'V'".
  std::optional<std::string> enumeration(std::string_view key,
                                         std::initializer_list<std::string_view> allowed,
                                         bool required);
  const json::array* array(std::string_view key, bool required);
  const json::object* object(std::string_view key, bool required);
  // Any JSON value (for alternates such as "bitmaps" items).
  const json::value* value(std::string_view key, bool required);
  // Marks a key as known without reading it.
  void allow(std::string_view key);

  // Fails with "Parameter 'K' is unexpected" for the first unknown key.
  bool finish();
  bool ok() const { return !error_; }
  const QmpError& error() const { return *error_; }
  // Sets an error (first one wins); returns false for convenience.
  bool fail(std::string desc, std::string cls = "GenericError");
  std::string qualified(std::string_view key) const { return prefix_ + std::string(key); }

 private:
  const json::value* lookup(std::string_view key, bool required);
  const json::object* object_;
  std::string prefix_;
  std::vector<std::string> known_;
  std::optional<QmpError> error_;
};

// Receives asynchronous events (BLOCK_EXPORT_DELETED, ...).
class EventSink {
 public:
  virtual ~EventSink() = default;
  virtual void emit(std::string_view name, json::object data) = 0;
};

using Handler = std::function<CommandResult(Args& args, EventSink& events)>;

class CommandTable {
 public:
  void add(std::string name, Handler handler);
  const Handler* find(std::string_view name) const;
  std::vector<std::string> names() const;

 private:
  std::map<std::string, Handler, std::less<>> handlers_;
};

// Serializes `v` on one line as QEMU does ("{"a": 1, "b": [2, 3]}").
std::string format_qmp(const json::value& v);

// One client session: feed it bytes, collect output lines. Handles the
// greeting, qmp_capabilities negotiation, envelope validation, "id" echo,
// and dispatch. "quit" is an ordinary command registered by the owner.
// qmp_capabilities is built in (a table entry of that name is ignored); it
// accepts "enable": [] and refuses "oob", which the greeting does not offer.
class Session : public EventSink {
 public:
  Session(const CommandTable& commands, json::object version);
  // The greeting line (with trailing "\r\n").
  std::string greeting() const;
  // Parses as many complete JSON values as `bytes` completes and executes
  // them in order; returns false if the stream is broken beyond recovery
  // (the caller closes the connection). Output accumulates in take_output().
  bool feed(std::string_view bytes);
  std::string take_output();
  // EventSink: events are queued to the output in order. Like QEMU, events
  // are dropped until capabilities negotiation is complete.
  void emit(std::string_view name, json::object data) override;
  bool negotiated() const { return negotiated_; }

  // Largest JSON value accepted; a larger one makes feed() return false.
  static constexpr std::size_t kMaxValueBytes = std::size_t{1} << 20;

 private:
  // Where the input stream is: between values, inside an object, array or
  // string (the parser has it), inside a bare top-level token (numbers,
  // keywords, garbage), or skipping input after a syntax error.
  enum class Mode { idle, value, scalar, recover };
  // Nesting of the bytes given to the parser, kept to skip the rest of a
  // broken value.
  struct Nesting {
    int depth = 0;
    bool in_string = false;
    bool escape = false;
  };

  std::size_t start_value(std::string_view bytes);
  std::size_t feed_value(std::string_view bytes);
  std::size_t feed_scalar(std::string_view bytes);
  std::size_t feed_recover(std::string_view bytes);
  void finish_scalar();
  void parse_error(std::string detail);
  void execute(const json::value& request);
  CommandResult dispatch(std::string_view name, const json::object* arguments);
  CommandResult capabilities(const json::object* arguments);
  void respond(const json::value* id, CommandResult result);
  void respond_error(const json::value* id, const QmpError& error);
  void append_line(const json::value& message);

  const CommandTable& commands_;
  json::object version_;
  bool negotiated_ = false;
  json::stream_parser parser_;
  std::string output_;
  Mode mode_ = Mode::idle;
  Nesting nesting_;
  std::string scalar_;           // the bare token read so far (Mode::scalar)
  std::size_t value_bytes_ = 0;  // bytes of the current value (Mode::value)
  bool broken_ = false;          // feed() returned false; the caller closes
};

}  // namespace fleeced::server::control
