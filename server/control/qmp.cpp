// SPDX-License-Identifier: MIT
// Design notes
//
// Input is a stream of JSON values, not lines (control-api.md §1). The
// session walks it in four modes:
//   idle    skips whitespace and looks at the first byte of the next value;
//   value   '{', '[' or '"': bytes go to the stream parser, which stops right
//           after the value, so the rest of the feed starts the next one;
//   scalar  a bare top-level token (5, true, garbage) ends at whitespace or a
//           structural character, as in QEMU's lexer, and is parsed whole;
//   recover after a syntax error inside a value, input is skipped until the
//           value's brackets balance or a newline arrives, whichever comes
//           first. A newline cannot occur inside a JSON string, so a client
//           that sends one command per line resynchronises on its next line,
//           and "{bad}{good}" on one line still runs the second command.
// Each syntax error gets one "JSON parse error, ..." reply, as in QEMU. Only a
// value larger than kMaxValueBytes ends the session (feed() returns false).
// The parser is limited to QEMU's nesting depth (1024).
#include "server/control/qmp.hpp"

#include <algorithm>
#include <cctype>
#include <chrono>
#include <limits>
#include <utility>

#include "server/log.hpp"

namespace fleeced::server::control {

namespace {

constexpr std::size_t kMaxDepth = 1024;      // QEMU json-parser MAX_NESTING
constexpr std::size_t kMaxQuotedToken = 64;  // garbage quoted in an error
constexpr std::string_view kCommandNotFound = "CommandNotFound";

json::parse_options parser_options() {
  json::parse_options options;
  options.max_depth = kMaxDepth;
  return options;
}

std::string type_error(const std::string& key, std::string_view expected) {
  return "Invalid parameter type for '" + key + "', expected: " + std::string(expected);
}

std::string value_error(const std::string& key, std::string_view expected) {
  return "Parameter '" + key + "' expects " + std::string(expected);
}

std::string enum_error(const std::string& key, std::string_view value) {
  return "Parameter '" + key + "' does not accept value '" + std::string(value) + "'";
}

bool is_space(char c) { return c == ' ' || c == '\t' || c == '\r' || c == '\n'; }

// Ends a bare top-level token (QEMU's lexer ends keywords and numbers there).
bool is_delimiter(char c) {
  return is_space(c) || c == '{' || c == '}' || c == '[' || c == ']' || c == ',' || c == ':' ||
         c == '"';
}

void append_json(std::string& out, const json::value& v) {
  if (const json::object* o = v.if_object()) {
    out += '{';
    const char* separator = "";
    for (const auto& member : *o) {
      out += separator;
      out += json::serialize(member.key());
      out += ": ";
      append_json(out, member.value());
      separator = ", ";
    }
    out += '}';
  } else if (const json::array* a = v.if_array()) {
    out += '[';
    const char* separator = "";
    for (const json::value& item : *a) {
      out += separator;
      append_json(out, item);
      separator = ", ";
    }
    out += ']';
  } else {
    out += json::serialize(v);
  }
}

}  // namespace

std::string format_qmp(const json::value& v) {
  std::string out;
  append_json(out, v);
  return out;
}

// ---- Args

Args::Args(const json::object* object, std::string prefix)
    : object_(object), prefix_(std::move(prefix)) {}

void Args::allow(std::string_view key) {
  if (std::find(known_.begin(), known_.end(), key) == known_.end()) known_.emplace_back(key);
}

bool Args::fail(std::string desc, std::string cls) {
  if (!error_) error_ = QmpError{std::move(cls), std::move(desc)};
  return false;
}

const json::value* Args::lookup(std::string_view key, bool required) {
  allow(key);
  if (error_) return nullptr;
  const json::value* v = object_ ? object_->if_contains(key) : nullptr;
  if (!v && required) fail("Parameter '" + qualified(key) + "' is missing");
  return v;
}

const json::value* Args::value(std::string_view key, bool required) {
  return lookup(key, required);
}

std::optional<std::string> Args::string(std::string_view key, bool required) {
  const json::value* v = lookup(key, required);
  if (!v) return std::nullopt;
  if (const json::string* s = v->if_string()) return std::string(*s);
  fail(type_error(qualified(key), "string"));
  return std::nullopt;
}

std::optional<bool> Args::boolean(std::string_view key, bool required) {
  const json::value* v = lookup(key, required);
  if (!v) return std::nullopt;
  if (const bool* b = v->if_bool()) return *b;
  fail(type_error(qualified(key), "boolean"));
  return std::nullopt;
}

std::optional<uint64_t> Args::uint64(std::string_view key, bool required) {
  const json::value* v = lookup(key, required);
  if (!v) return std::nullopt;
  if (const uint64_t* u = v->if_uint64()) return *u;
  if (const int64_t* i = v->if_int64(); i && *i >= 0) return static_cast<uint64_t>(*i);
  fail(value_error(qualified(key), "uint64"));
  return std::nullopt;
}

std::optional<uint32_t> Args::uint32(std::string_view key, bool required) {
  const json::value* v = lookup(key, required);
  if (!v) return std::nullopt;
  // QEMU reads a uint64 first (a negative number wraps to a huge one), then
  // checks the range.
  const int64_t* i = v->if_int64();
  const uint64_t* u = v->if_uint64();
  if (!i && !u) {
    fail(value_error(qualified(key), "uint64"));
    return std::nullopt;
  }
  if ((i && (*i < 0 || *i > std::numeric_limits<uint32_t>::max())) ||
      (u && *u > std::numeric_limits<uint32_t>::max())) {
    fail(value_error(qualified(key), "uint32_t"));
    return std::nullopt;
  }
  return static_cast<uint32_t>(i ? static_cast<uint64_t>(*i) : *u);
}

std::optional<int64_t> Args::int64(std::string_view key, bool required) {
  const json::value* v = lookup(key, required);
  if (!v) return std::nullopt;
  if (const int64_t* i = v->if_int64()) return *i;
  fail(type_error(qualified(key), "integer"));
  return std::nullopt;
}

std::optional<std::string> Args::enumeration(std::string_view key,
                                             std::initializer_list<std::string_view> allowed,
                                             bool required) {
  std::optional<std::string> s = string(key, required);
  if (!s) return std::nullopt;
  if (std::find(allowed.begin(), allowed.end(), *s) != allowed.end()) return s;
  fail(enum_error(qualified(key), *s));
  return std::nullopt;
}

const json::array* Args::array(std::string_view key, bool required) {
  const json::value* v = lookup(key, required);
  if (!v) return nullptr;
  if (const json::array* a = v->if_array()) return a;
  fail(type_error(qualified(key), "array"));
  return nullptr;
}

const json::object* Args::object(std::string_view key, bool required) {
  const json::value* v = lookup(key, required);
  if (!v) return nullptr;
  if (const json::object* o = v->if_object()) return o;
  fail(type_error(qualified(key), "object"));
  return nullptr;
}

bool Args::finish() {
  if (error_) return false;
  if (!object_) return true;
  for (const auto& member : *object_) {
    std::string_view key = member.key();
    if (std::find(known_.begin(), known_.end(), key) == known_.end()) {
      return fail("Parameter '" + qualified(key) + "' is unexpected");
    }
  }
  return true;
}

// ---- CommandTable

void CommandTable::add(std::string name, Handler handler) {
  handlers_.insert_or_assign(std::move(name), std::move(handler));
}

const Handler* CommandTable::find(std::string_view name) const {
  auto it = handlers_.find(name);
  return it == handlers_.end() ? nullptr : &it->second;
}

std::vector<std::string> CommandTable::names() const {
  std::vector<std::string> out;
  out.reserve(handlers_.size());
  for (const auto& [name, handler] : handlers_) out.push_back(name);
  return out;
}

// ---- Session: input framing

Session::Session(const CommandTable& commands, json::object version)
    : commands_(commands), version_(std::move(version)), parser_({}, parser_options()) {}

std::string Session::greeting() const {
  json::object qmp;
  qmp["version"] = version_;
  qmp["capabilities"] = json::array();
  json::object message;
  message["QMP"] = std::move(qmp);
  return format_qmp(message) + "\r\n";
}

std::string Session::take_output() { return std::exchange(output_, {}); }

bool Session::feed(std::string_view bytes) {
  while (!broken_ && !bytes.empty()) {
    std::size_t used = 0;
    switch (mode_) {
      case Mode::idle:
        used = start_value(bytes);
        break;
      case Mode::value:
        used = feed_value(bytes);
        break;
      case Mode::scalar:
        used = feed_scalar(bytes);
        break;
      case Mode::recover:
        used = feed_recover(bytes);
        break;
    }
    bytes.remove_prefix(used);
  }
  return !broken_;
}

// Consumes whitespace and stray punctuation; switches mode at a value.
std::size_t Session::start_value(std::string_view bytes) {
  std::size_t i = 0;
  while (i < bytes.size() && is_space(bytes[i])) ++i;
  if (i == bytes.size()) return i;
  switch (bytes[i]) {
    case '{':
    case '[':
    case '"':
      mode_ = Mode::value;
      parser_.reset();
      nesting_ = {};
      value_bytes_ = 0;
      return i;
    case '}':
    case ']':
    case ',':
    case ':':
      parse_error("expecting value");
      return i + 1;
    default:
      mode_ = Mode::scalar;
      scalar_.clear();
      return i;
  }
}

namespace {

// Follows brackets and strings byte by byte.
template <typename Nesting>
void step(Nesting& n, char c) {
  if (n.in_string) {
    if (n.escape) {
      n.escape = false;
    } else if (c == '\\') {
      n.escape = true;
    } else if (c == '"') {
      n.in_string = false;
    }
    return;
  }
  if (c == '"') {
    n.in_string = true;
  } else if (c == '{' || c == '[') {
    ++n.depth;
  } else if (c == '}' || c == ']') {
    --n.depth;
  }
}

}  // namespace

std::size_t Session::feed_value(std::string_view bytes) {
  json::error_code ec;
  const std::size_t used = parser_.write_some(bytes.data(), bytes.size(), ec);
  for (std::size_t i = 0; i < used; ++i) step(nesting_, bytes[i]);
  value_bytes_ += used;
  if (ec) {
    parse_error(ec.message());
    parser_.reset();
    mode_ = Mode::recover;
    return used;
  }
  if (value_bytes_ > kMaxValueBytes) {
    parse_error("input exceeds " + std::to_string(kMaxValueBytes) + " bytes");
    broken_ = true;
    return used;
  }
  if (parser_.done()) {
    json::value request = parser_.release();
    parser_.reset();
    mode_ = Mode::idle;
    execute(request);
  }
  return used;
}

std::size_t Session::feed_scalar(std::string_view bytes) {
  std::size_t i = 0;
  while (i < bytes.size() && !is_delimiter(bytes[i])) ++i;
  scalar_.append(bytes.data(), i);
  if (scalar_.size() > kMaxValueBytes) {
    parse_error("input exceeds " + std::to_string(kMaxValueBytes) + " bytes");
    broken_ = true;
    return i;
  }
  if (i < bytes.size()) finish_scalar();  // the delimiter starts what follows
  return i;
}

void Session::finish_scalar() {
  std::string token = std::exchange(scalar_, {});
  mode_ = Mode::idle;
  json::error_code ec;
  json::value v = json::parse(token, ec, {}, parser_options());
  if (!ec) {
    execute(v);
    return;
  }
  const bool word =
      std::all_of(token.begin(), token.end(), [](unsigned char c) { return std::isalpha(c) != 0; });
  if (!word) {
    parse_error(ec.message());
    return;
  }
  if (token.size() > kMaxQuotedToken) token = token.substr(0, kMaxQuotedToken) + "...";
  parse_error("invalid keyword '" + token + "'");  // QEMU's words for "garbage"
}

// Skips the rest of a broken value; always consumes at least one byte.
std::size_t Session::feed_recover(std::string_view bytes) {
  for (std::size_t i = 0; i < bytes.size(); ++i) {
    const char c = bytes[i];
    if (c != '\n') step(nesting_, c);
    if (c == '\n' || (nesting_.depth <= 0 && !nesting_.in_string)) {
      mode_ = Mode::idle;
      return i + 1;
    }
  }
  return bytes.size();
}

void Session::parse_error(std::string detail) {
  respond_error(nullptr, QmpError{"GenericError", "JSON parse error, " + detail});
}

// ---- Session: commands

void Session::execute(const json::value& request) {
  const json::object* req = request.if_object();
  if (!req) {
    respond_error(nullptr, QmpError{"GenericError", "QMP input must be a JSON object"});
    return;
  }
  const json::value* id = req->if_contains("id");
  const json::string* name = nullptr;
  const json::object* arguments = nullptr;
  for (const auto& member : *req) {
    const std::string_view key = member.key();
    if (key == "execute") {
      name = member.value().if_string();
      if (!name) {
        respond_error(id, QmpError{"GenericError", "QMP input member 'execute' must be a string"});
        return;
      }
    } else if (key == "arguments") {
      arguments = member.value().if_object();
      if (!arguments) {
        respond_error(id,
                      QmpError{"GenericError", "QMP input member 'arguments' must be an object"});
        return;
      }
    } else if (key != "id") {
      // "exec-oob" lands here too: QEMU rejects it this way when the greeting
      // does not offer "oob".
      respond_error(id, QmpError{"GenericError",
                                 "QMP input member '" + std::string(key) + "' is unexpected"});
      return;
    }
  }
  if (!name) {
    respond_error(id, QmpError{"GenericError", "QMP input lacks member 'execute'"});
    return;
  }
  respond(id, dispatch(*name, arguments));
}

CommandResult Session::dispatch(std::string_view name, const json::object* arguments) {
  if (name == "qmp_capabilities") return capabilities(arguments);
  if (!negotiated_) {
    return CommandResult::fail("Expecting capabilities negotiation with 'qmp_capabilities'",
                               std::string(kCommandNotFound));
  }
  const Handler* handler = commands_.find(name);
  if (!handler) {
    return CommandResult::fail("The command " + std::string(name) + " has not been found",
                               std::string(kCommandNotFound));
  }
  Args args(arguments);
  try {
    CommandResult result = (*handler)(args, *this);
    // An argument problem the handler noticed outranks what it returned.
    if (!args.ok()) return CommandResult{json::object(), args.error()};
    return result;
  } catch (const std::exception& e) {
    log().error("QMP command '{}' threw: {}", name, e.what());
    return CommandResult::fail("Command '" + std::string(name) + "' failed: " + e.what());
  }
}

// qmp_capabilities: arguments first, then the negotiation state (QEMU 7.2
// order: its marshaller validates before the handler runs).
CommandResult Session::capabilities(const json::object* arguments) {
  Args args(arguments);
  bool oob = false;
  if (const json::array* enable = args.array("enable", false)) {
    for (std::size_t i = 0; i < enable->size() && args.ok(); ++i) {
      const std::string key = args.qualified("enable[" + std::to_string(i) + "]");
      const json::string* cap = (*enable)[i].if_string();
      if (!cap) {
        args.fail(type_error(key, "string"));
      } else if (*cap != "oob") {
        args.fail(enum_error(key, *cap));
      } else {
        oob = true;
      }
    }
  }
  if (!args.finish()) return CommandResult{json::object(), args.error()};
  if (negotiated_) {
    return CommandResult::fail("Capabilities negotiation is already complete, command ignored",
                               std::string(kCommandNotFound));
  }
  if (oob) return CommandResult::fail("Capability oob not available");
  negotiated_ = true;
  return CommandResult::ok();
}

// QEMU's member order: {"return": ..., "id": ...} and {"id": ..., "error": ...}.
void Session::respond(const json::value* id, CommandResult result) {
  if (result.error) {
    respond_error(id, *result.error);
    return;
  }
  json::object message;
  message["return"] = std::move(result.value);
  if (id) message["id"] = *id;
  append_line(message);
}

void Session::respond_error(const json::value* id, const QmpError& error) {
  json::object message;
  if (id) message["id"] = *id;
  message["error"] = json::object{{"class", error.error_class}, {"desc", error.desc}};
  append_line(message);
}

void Session::emit(std::string_view name, json::object data) {
  if (!negotiated_) return;
  const auto now = std::chrono::duration_cast<std::chrono::microseconds>(
                       std::chrono::system_clock::now().time_since_epoch())
                       .count();
  json::object message;
  message["timestamp"] =
      json::object{{"seconds", now / 1'000'000}, {"microseconds", now % 1'000'000}};
  message["event"] = name;
  message["data"] = std::move(data);
  append_line(message);
}

void Session::append_line(const json::value& message) {
  append_json(output_, message);
  output_ += "\r\n";
}

}  // namespace fleeced::server::control
