// SPDX-License-Identifier: MIT
// fleecectl: a command-line client for fleeced's QMP control socket (it also
// talks to qemu-storage-daemon). It connects, negotiates capabilities, sends
// one command, prints the answer as a table, and exits 0 on success, 1 on a
// QMP or connection error ("fleecectl: CLASS: desc"), 2 on a usage error.
// Events that arrive while it waits are skipped, or printed on stderr with
// --verbose (always with `raw`). Single-threaded, blocking I/O with timeouts.

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include <boost/json.hpp>

#include "common/qmp_client.hpp"

namespace {

namespace json = boost::json;
using fleece::tools::QmpClient;
using fleece::tools::QmpFailure;

constexpr int kExitOk = 0;
constexpr int kExitError = 1;
constexpr int kExitUsage = 2;
constexpr int kDefaultTimeoutSeconds = 60;

constexpr const char* kUsage = R"(Usage: fleecectl [OPTIONS] COMMAND [ARGS...]

Talks to the QMP control socket of fleeced (--qmp unix:PATH).

Options:
  -s, --socket PATH    control socket (default: $FLEECED_QMP); "unix:PATH" works too
      --json           print the raw QMP response instead of a table
  -v, --verbose        print events received while waiting (on stderr)
      --timeout SEC    give up waiting for the server after SEC seconds
                       (default 60; 0 waits forever)
  -h, --help           this text

Commands:
  nodes                                  nodes and their dirty bitmaps
  bitmaps [NODE]                         dirty bitmaps (of one node)
  bitmap add NODE NAME [--granularity N] [--persistent] [--disabled]
  bitmap remove|clear|enable|disable NODE NAME
  bitmap merge NODE TARGET SRC...        SRC is NAME (on NODE) or SRCNODE/NAME
  exports                                NBD exports
  export add ID NODE [--name NAME] [--writable] [--description TEXT]
                     [--bitmap B]...     B is NAME (on NODE) or BNODE/NAME
  export del ID [--hard]
  server start unix:PATH [--tls-creds ID] [--tls-authz ID] [--max-connections N]
  server stop
  tls add psk|x509 ID DIR [--no-verify-peer]
                                         TLS credentials for server start
  tls del ID
  tls reload ID                          re-read DIR (certificate/key rotation)
  jobs                                   block jobs
  job cancel ID [--force]
  raw JSON                               send JSON verbatim, print the response
  quit                                   stop the daemon
)";

// A usage problem: exit 2.
class UsageError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A connection or protocol problem: exit 1.
class Failure : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct Options {
  std::string socket;
  bool json_output = false;
  bool verbose = false;
  int timeout_seconds = kDefaultTimeoutSeconds;
  std::vector<std::string> words;  // COMMAND ARGS...
};

// What to send and how to show the answer.
struct Plan {
  enum class Show { nothing, nodes, bitmaps, exports, jobs, raw };
  std::string execute;
  json::object arguments;
  std::string raw_text;  // Show::raw: sent verbatim
  Show show = Show::nothing;
  std::optional<std::string> node_filter;  // bitmaps NODE
};

// ---- output helpers

std::string text_of(const json::value* v) {
  if (!v || v->is_null()) return "-";
  if (const json::string* s = v->if_string()) return std::string(*s);
  if (const bool* b = v->if_bool()) return *b ? "yes" : "no";
  return json::serialize(*v);
}

void print_table(const std::vector<std::string>& header,
                 const std::vector<std::vector<std::string>>& rows) {
  std::vector<std::size_t> width(header.size());
  for (std::size_t i = 0; i < header.size(); ++i) width[i] = header[i].size();
  for (const auto& row : rows) {
    for (std::size_t i = 0; i < row.size() && i < width.size(); ++i) {
      width[i] = std::max(width[i], row[i].size());
    }
  }
  auto print_row = [&](const std::vector<std::string>& row) {
    std::string line;
    for (std::size_t i = 0; i < row.size(); ++i) {
      line += row[i];
      if (i + 1 < row.size()) line += std::string(width[i] - row[i].size() + 2, ' ');
    }
    std::cout << line << '\n';
  };
  print_row(header);
  for (const auto& row : rows) print_row(row);
}

void pretty(std::ostream& out, const json::value& v, int indent) {
  const std::string pad(static_cast<std::size_t>(indent) * 2, ' ');
  const std::string inner(static_cast<std::size_t>(indent + 1) * 2, ' ');
  if (const json::object* o = v.if_object()) {
    if (o->empty()) {
      out << "{}";
      return;
    }
    out << "{\n";
    std::size_t i = 0;
    for (const auto& member : *o) {
      out << inner << json::serialize(member.key()) << ": ";
      pretty(out, member.value(), indent + 1);
      out << (++i < o->size() ? ",\n" : "\n");
    }
    out << pad << '}';
  } else if (const json::array* a = v.if_array()) {
    if (a->empty()) {
      out << "[]";
      return;
    }
    out << "[\n";
    for (std::size_t i = 0; i < a->size(); ++i) {
      out << inner;
      pretty(out, (*a)[i], indent + 1);
      out << (i + 1 < a->size() ? ",\n" : "\n");
    }
    out << pad << ']';
  } else {
    out << json::serialize(v);
  }
}

// ---- argument parsing

uint64_t parse_number(const std::string& option, const std::string& text) {
  if (text.empty() || text[0] == '-' || text[0] == '+') {
    throw UsageError(option + " expects a non-negative number, got '" + text + "'");
  }
  errno = 0;
  char* end = nullptr;
  unsigned long long value = std::strtoull(text.c_str(), &end, 10);
  uint64_t scale = 1;
  std::string_view suffix(end);
  if (suffix == "k" || suffix == "K") scale = uint64_t{1} << 10;
  if (suffix == "m" || suffix == "M") scale = uint64_t{1} << 20;
  if (suffix == "g" || suffix == "G") scale = uint64_t{1} << 30;
  if (end == text.c_str() || errno == ERANGE || (scale == 1 && !suffix.empty()) ||
      value > UINT64_MAX / scale) {
    throw UsageError(option + " expects a number (optionally with K, M or G), got '" + text + "'");
  }
  return value * scale;
}

// Splits a command's words into positionals and --options. `with_value`
// names the options that take a value ("--name N" or "--name=N").
struct Parsed {
  std::vector<std::string> positional;
  std::vector<std::pair<std::string, std::string>> options;  // in order; flags have ""

  bool flag(std::string_view name) const {
    for (const auto& [k, v] : options) {
      if (k == name) return true;
    }
    return false;
  }
  std::optional<std::string> value(std::string_view name) const {
    std::optional<std::string> out;
    for (const auto& [k, v] : options) {
      if (k == name) out = v;
    }
    return out;
  }
  std::vector<std::string> values(std::string_view name) const {
    std::vector<std::string> out;
    for (const auto& [k, v] : options) {
      if (k == name) out.push_back(v);
    }
    return out;
  }
};

Parsed parse_words(const std::vector<std::string>& words, std::size_t first,
                   std::initializer_list<std::string_view> flags,
                   std::initializer_list<std::string_view> with_value) {
  Parsed p;
  bool options_done = false;
  for (std::size_t i = first; i < words.size(); ++i) {
    const std::string& w = words[i];
    if (options_done || !w.starts_with("--") || w.size() == 2) {
      if (w == "--" && !options_done) {
        options_done = true;
        continue;
      }
      p.positional.push_back(w);
      continue;
    }
    std::string name = w;
    std::optional<std::string> inline_value;
    if (auto eq = w.find('='); eq != std::string::npos) {
      name = w.substr(0, eq);
      inline_value = w.substr(eq + 1);
    }
    const auto known = [&](std::initializer_list<std::string_view> list) {
      return std::find(list.begin(), list.end(), name) != list.end();
    };
    if (known(flags) && !inline_value) {
      p.options.emplace_back(name, "");
    } else if (known(with_value)) {
      if (!inline_value) {
        if (i + 1 >= words.size()) throw UsageError(name + " needs a value");
        inline_value = words[++i];
      }
      p.options.emplace_back(name, *inline_value);
    } else {
      throw UsageError("unknown option '" + w + "' for '" + words[0] + "'");
    }
  }
  return p;
}

void expect_count(const Parsed& p, std::size_t min, std::size_t max, const std::string& synopsis) {
  if (p.positional.size() < min || p.positional.size() > max) {
    throw UsageError("usage: fleecectl " + synopsis);
  }
}

// "NAME" names a bitmap on `node`; "OTHER/NAME" one on node OTHER.
json::value bitmap_ref(const std::string& text) {
  const auto slash = text.find('/');
  if (slash == std::string::npos) return json::value(text);
  return json::object{{"node", text.substr(0, slash)}, {"name", text.substr(slash + 1)}};
}

Plan plan_bitmap(const std::vector<std::string>& w) {
  if (w.size() < 2)
    throw UsageError("usage: fleecectl bitmap add|remove|clear|enable|disable|merge ...");
  const std::string& verb = w[1];
  Plan plan;
  if (verb == "add") {
    Parsed p = parse_words(w, 2, {"--persistent", "--disabled"}, {"--granularity"});
    expect_count(p, 2, 2, "bitmap add NODE NAME [--granularity N] [--persistent] [--disabled]");
    plan.execute = "block-dirty-bitmap-add";
    plan.arguments = {{"node", p.positional[0]}, {"name", p.positional[1]}};
    if (auto g = p.value("--granularity")) {
      plan.arguments["granularity"] = parse_number("--granularity", *g);
    }
    if (p.flag("--persistent")) plan.arguments["persistent"] = true;
    if (p.flag("--disabled")) plan.arguments["disabled"] = true;
  } else if (verb == "remove" || verb == "clear" || verb == "enable" || verb == "disable") {
    Parsed p = parse_words(w, 2, {}, {});
    expect_count(p, 2, 2, "bitmap " + verb + " NODE NAME");
    plan.execute = "block-dirty-bitmap-" + verb;
    plan.arguments = {{"node", p.positional[0]}, {"name", p.positional[1]}};
  } else if (verb == "merge") {
    Parsed p = parse_words(w, 2, {}, {});
    expect_count(p, 3, SIZE_MAX, "bitmap merge NODE TARGET SRC...");
    plan.execute = "block-dirty-bitmap-merge";
    json::array sources;
    for (std::size_t i = 2; i < p.positional.size(); ++i) {
      json::value ref = bitmap_ref(p.positional[i]);
      sources.push_back(std::move(ref));
    }
    plan.arguments = {{"node", p.positional[0]}, {"target", p.positional[1]}, {"bitmaps", sources}};
  } else {
    throw UsageError("unknown bitmap command '" + verb + "'");
  }
  return plan;
}

Plan plan_export(const std::vector<std::string>& w) {
  if (w.size() < 2) throw UsageError("usage: fleecectl export add|del ...");
  Plan plan;
  if (w[1] == "add") {
    Parsed p = parse_words(w, 2, {"--writable"}, {"--name", "--bitmap", "--description"});
    expect_count(p, 2, 2, "export add ID NODE [--name NAME] [--writable] [--bitmap B]...");
    plan.execute = "block-export-add";
    plan.arguments = {{"type", "nbd"}, {"id", p.positional[0]}, {"node-name", p.positional[1]}};
    if (auto name = p.value("--name")) plan.arguments["name"] = *name;
    if (auto d = p.value("--description")) plan.arguments["description"] = *d;
    if (p.flag("--writable")) plan.arguments["writable"] = true;
    json::array bitmaps;
    for (const std::string& b : p.values("--bitmap")) bitmaps.push_back(bitmap_ref(b));
    if (!bitmaps.empty()) plan.arguments["bitmaps"] = std::move(bitmaps);
  } else if (w[1] == "del") {
    Parsed p = parse_words(w, 2, {"--hard"}, {});
    expect_count(p, 1, 1, "export del ID [--hard]");
    plan.execute = "block-export-del";
    plan.arguments = {{"id", p.positional[0]}};
    if (p.flag("--hard")) plan.arguments["mode"] = "hard";
  } else {
    throw UsageError("unknown export command '" + w[1] + "'");
  }
  return plan;
}

Plan plan_tls(const std::vector<std::string>& w) {
  const char* usage =
      "usage: fleecectl tls add psk|x509 ID DIR [--no-verify-peer] | del ID | reload ID";
  if (w.size() < 2) throw UsageError(usage);
  Plan plan;
  if (w[1] == "add") {
    Parsed p = parse_words(w, 2, {"--no-verify-peer"}, {});
    expect_count(p, 3, 3, "tls add psk|x509 ID DIR [--no-verify-peer]");
    const std::string& kind = p.positional[0];
    if (kind != "psk" && kind != "x509") throw UsageError("tls add: expected psk or x509");
    plan.execute = "object-add";
    plan.arguments = {{"qom-type", "tls-creds-" + kind},
                      {"id", p.positional[1]},
                      {"endpoint", "server"},
                      {"dir", p.positional[2]}};
    if (kind == "x509") plan.arguments["verify-peer"] = !p.flag("--no-verify-peer");
  } else if (w[1] == "del" || w[1] == "reload") {
    expect_count(parse_words(w, 2, {}, {}), 1, 1, "tls " + w[1] + " ID");
    plan.execute = w[1] == "del" ? "object-del" : "x-fleeced-tls-reload";
    plan.arguments = {{"id", w[2]}};
  } else {
    throw UsageError(usage);
  }
  return plan;
}

Plan plan_server(const std::vector<std::string>& w) {
  if (w.size() < 2) throw UsageError("usage: fleecectl server start unix:PATH | server stop");
  Plan plan;
  if (w[1] == "start") {
    Parsed p = parse_words(w, 2, {}, {"--tls-creds", "--tls-authz", "--max-connections"});
    expect_count(p, 1, 1,
                 "server start unix:PATH [--tls-creds ID] [--tls-authz ID] [--max-connections N]");
    const std::string& address = p.positional[0];
    if (!address.starts_with("unix:") || address.size() == 5) {
      throw UsageError("server start expects unix:PATH, got '" + address + "'");
    }
    plan.execute = "nbd-server-start";
    plan.arguments = {{"addr", json::object{{"type", "unix"},
                                            {"data", json::object{{"path", address.substr(5)}}}}}};
    if (auto t = p.value("--tls-creds")) plan.arguments["tls-creds"] = *t;
    if (auto t = p.value("--tls-authz")) plan.arguments["tls-authz"] = *t;
    if (auto m = p.value("--max-connections")) {
      plan.arguments["max-connections"] = parse_number("--max-connections", *m);
    }
  } else if (w[1] == "stop") {
    expect_count(parse_words(w, 2, {}, {}), 0, 0, "server stop");
    plan.execute = "nbd-server-stop";
  } else {
    throw UsageError("unknown server command '" + w[1] + "'");
  }
  return plan;
}

Plan make_plan(const std::vector<std::string>& w) {
  const std::string& command = w[0];
  Plan plan;
  if (command == "nodes") {
    expect_count(parse_words(w, 1, {}, {}), 0, 0, "nodes");
    plan.execute = "query-named-block-nodes";
    plan.arguments = {{"flat", true}};
    plan.show = Plan::Show::nodes;
  } else if (command == "bitmaps") {
    Parsed p = parse_words(w, 1, {}, {});
    expect_count(p, 0, 1, "bitmaps [NODE]");
    plan.execute = "query-named-block-nodes";
    plan.arguments = {{"flat", true}};
    plan.show = Plan::Show::bitmaps;
    if (!p.positional.empty()) plan.node_filter = p.positional[0];
  } else if (command == "bitmap") {
    plan = plan_bitmap(w);
  } else if (command == "exports") {
    expect_count(parse_words(w, 1, {}, {}), 0, 0, "exports");
    plan.execute = "query-block-exports";
    plan.show = Plan::Show::exports;
  } else if (command == "export") {
    plan = plan_export(w);
  } else if (command == "server") {
    plan = plan_server(w);
  } else if (command == "tls") {
    plan = plan_tls(w);
  } else if (command == "jobs") {
    expect_count(parse_words(w, 1, {}, {}), 0, 0, "jobs");
    plan.execute = "query-block-jobs";
    plan.show = Plan::Show::jobs;
  } else if (command == "job") {
    if (w.size() < 2 || w[1] != "cancel")
      throw UsageError("usage: fleecectl job cancel ID [--force]");
    Parsed p = parse_words(w, 2, {"--force"}, {});
    expect_count(p, 1, 1, "job cancel ID [--force]");
    plan.execute = "block-job-cancel";
    plan.arguments = {{"device", p.positional[0]}};
    if (p.flag("--force")) plan.arguments["force"] = true;
  } else if (command == "raw") {
    if (w.size() < 2) throw UsageError("usage: fleecectl raw JSON");
    for (std::size_t i = 1; i < w.size(); ++i) {
      if (i > 1) plan.raw_text += ' ';
      plan.raw_text += w[i];
    }
    json::error_code ec;
    json::parse(plan.raw_text, ec);
    if (ec) throw UsageError("raw: not valid JSON (" + ec.message() + "): " + plan.raw_text);
    plan.show = Plan::Show::raw;
  } else if (command == "quit") {
    expect_count(parse_words(w, 1, {}, {}), 0, 0, "quit");
    plan.execute = "quit";
  } else {
    throw UsageError("unknown command '" + command + "' (see --help)");
  }
  return plan;
}

Options parse_options(int argc, char** argv) {
  Options o;
  if (const char* env = std::getenv("FLEECED_QMP")) o.socket = env;
  std::vector<std::string> args(argv + 1, argv + argc);
  for (std::size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    // Global options come before the command.
    if (!o.words.empty()) {
      if (a == "--json") {
        o.json_output = true;
      } else if (a == "-v" || a == "--verbose") {
        o.verbose = true;
      } else {
        o.words.push_back(a);
      }
      continue;
    }
    auto value = [&](const std::string& name) {
      if (i + 1 >= args.size()) throw UsageError(name + " needs a value");
      return args[++i];
    };
    if (a == "-h" || a == "--help") {
      std::cout << kUsage;
      std::exit(kExitOk);
    } else if (a == "-s" || a == "--socket") {
      o.socket = value(a);
    } else if (a.starts_with("--socket=")) {
      o.socket = a.substr(9);
    } else if (a == "--json") {
      o.json_output = true;
    } else if (a == "-v" || a == "--verbose") {
      o.verbose = true;
    } else if (a == "--timeout" || a.starts_with("--timeout=")) {
      std::string v = a == "--timeout" ? value(a) : a.substr(10);
      uint64_t seconds = parse_number("--timeout", v);
      if (seconds > 86400) throw UsageError("--timeout is at most 86400 seconds");
      o.timeout_seconds = static_cast<int>(seconds);
    } else if (a.starts_with("-") && a != "-") {
      throw UsageError("unknown option '" + a + "' (see --help)");
    } else {
      o.words.push_back(a);
    }
  }
  if (o.words.empty()) throw UsageError("no command given (see --help)");
  if (o.socket.starts_with("unix:")) o.socket = o.socket.substr(5);
  if (o.socket.empty()) throw UsageError("no control socket: give -s PATH or set FLEECED_QMP");
  return o;
}

// ---- showing results

void show_nodes(const json::array& nodes, bool bitmaps_only,
                const std::optional<std::string>& filter) {
  std::vector<std::vector<std::string>> rows;
  bool found = !filter;
  for (const json::value& n : nodes) {
    const json::object* node = n.if_object();
    if (!node) continue;
    const std::string name = text_of(node->if_contains("node-name"));
    if (filter && name != *filter) continue;
    found = true;
    const std::string driver = text_of(node->if_contains("drv"));
    const json::value* list = node->if_contains("dirty-bitmaps");
    bool any = false;
    if (list && list->is_array()) {
      for (const json::value& b : list->get_array()) {
        const json::object* bitmap = b.if_object();
        if (!bitmap || !bitmap->contains("name")) continue;  // anonymous (filter nodes)
        any = true;
        std::string bname = text_of(bitmap->if_contains("name"));
        if (const json::value* inc = bitmap->if_contains("inconsistent");
            inc && inc->is_bool() && inc->get_bool()) {
          bname += " (inconsistent)";
        }
        std::vector<std::string> row;
        row.push_back(name);
        if (!bitmaps_only) row.push_back(driver);
        for (std::string cell :
             {bname, text_of(bitmap->if_contains("granularity")),
              text_of(bitmap->if_contains("count")), text_of(bitmap->if_contains("recording")),
              text_of(bitmap->if_contains("busy")), text_of(bitmap->if_contains("persistent"))}) {
          row.push_back(std::move(cell));
        }
        rows.push_back(std::move(row));
      }
    }
    if (!any && !bitmaps_only) rows.push_back({name, driver, "-", "-", "-", "-", "-", "-"});
  }
  if (!found) throw Failure("no node named '" + *filter + "'");
  std::vector<std::string> header = {"NODE",      "BITMAP", "GRANULARITY", "COUNT",
                                     "RECORDING", "BUSY",   "PERSISTENT"};
  if (!bitmaps_only) header.insert(header.begin() + 1, "DRIVER");
  print_table(header, rows);
}

void show_exports(const json::array& exports) {
  std::vector<std::vector<std::string>> rows;
  for (const json::value& e : exports) {
    const json::object* x = e.if_object();
    if (!x) continue;
    rows.push_back({text_of(x->if_contains("id")), text_of(x->if_contains("type")),
                    text_of(x->if_contains("node-name")),
                    text_of(x->if_contains("shutting-down"))});
  }
  print_table({"ID", "TYPE", "NODE", "SHUTTING-DOWN"}, rows);
}

void show_jobs(const json::array& jobs) {
  std::vector<std::vector<std::string>> rows;
  for (const json::value& j : jobs) {
    const json::object* x = j.if_object();
    if (!x) continue;
    rows.push_back({text_of(x->if_contains("device")), text_of(x->if_contains("type")),
                    text_of(x->if_contains("status")), text_of(x->if_contains("offset")),
                    text_of(x->if_contains("len"))});
  }
  print_table({"ID", "TYPE", "STATUS", "OFFSET", "LEN"}, rows);
}

// Prints "fleecectl: CLASS: desc" for an error response; returns the exit status.
int report_error(const json::object& response) {
  const json::value* error = response.if_contains("error");
  if (!error || !error->is_object()) return kExitOk;
  std::cerr << "fleecectl: " << text_of(error->as_object().if_contains("class")) << ": "
            << text_of(error->as_object().if_contains("desc")) << '\n';
  return kExitError;
}

int show(const Plan& plan, const Options& o, const json::object& response,
         const std::string& line) {
  if (plan.show == Plan::Show::raw) {
    if (o.json_output) {
      std::cout << line << '\n';
    } else {
      pretty(std::cout, response, 0);
      std::cout << '\n';
    }
    return response.contains("error") ? kExitError : kExitOk;
  }
  if (o.json_output) {
    std::cout << line << '\n';
    return report_error(response);
  }
  if (int status = report_error(response)) return status;
  const json::value* ret = response.if_contains("return");
  if (!ret) throw Failure("response without 'return': " + line);
  const json::array empty;
  const json::array& list = ret->is_array() ? ret->get_array() : empty;
  switch (plan.show) {
    case Plan::Show::nodes:
      show_nodes(list, false, std::nullopt);
      break;
    case Plan::Show::bitmaps:
      show_nodes(list, true, plan.node_filter);
      break;
    case Plan::Show::exports:
      show_exports(list);
      break;
    case Plan::Show::jobs:
      show_jobs(list);
      break;
    case Plan::Show::nothing:
    case Plan::Show::raw:
      break;
  }
  return kExitOk;
}

int run(int argc, char** argv) {
  Options o = parse_options(argc, argv);
  Plan plan = make_plan(o.words);
  QmpClient client(o.socket, o.timeout_seconds, o.verbose || plan.show == Plan::Show::raw);
  if (auto refused = client.negotiate()) return report_error(*refused);
  std::string request = plan.raw_text;
  if (request.empty()) {
    json::object message{{"execute", plan.execute}};
    if (!plan.arguments.empty()) message["arguments"] = plan.arguments;
    message["id"] = "fleecectl";
    request = json::serialize(message);
  }
  json::object response = client.call(request);
  return show(plan, o, response, client.last_line());
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const UsageError& e) {
    std::cerr << "fleecectl: error: " << e.what() << '\n';
    return kExitUsage;
  } catch (const Failure& e) {
    std::cerr << "fleecectl: " << e.what() << '\n';
    return kExitError;
  } catch (const QmpFailure& e) {
    std::cerr << "fleecectl: " << e.what() << '\n';
    return kExitError;
  } catch (const std::exception& e) {
    std::cerr << "fleecectl: " << e.what() << '\n';
    return kExitError;
  }
}
