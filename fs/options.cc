#include "fs/options.h"

#include <limits.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <nlohmann/json.hpp>
#include <optional>

#include "core/file_util.h"

namespace ckptfs::fs {

using core::Result;
using core::Status;

namespace {

unsigned Bit(Command c) { return 1u << static_cast<unsigned>(c); }

const unsigned kIndexed = Bit(Command::kLs) | Bit(Command::kResolve) | Bit(Command::kCat) |
                          Bit(Command::kInspect) | Bit(Command::kPrune) | Bit(Command::kMount);
const unsigned kAveraging = Bit(Command::kCat) | Bit(Command::kInspect) | Bit(Command::kMount);
const unsigned kPolicy = Bit(Command::kPrune) | Bit(Command::kMount);
const unsigned kMount = Bit(Command::kMount);
const unsigned kAll = kIndexed | Bit(Command::kStatus);

struct FlagSpec {
  const char* name;
  bool takes_value;
  unsigned commands;  // where it is accepted
};

// Every option of every command. -o is expanded before this table is used.
const FlagSpec kFlags[] = {
    {"--index", true, kIndexed},
    {"--avg-cache", true, kAveraging},
    {"--avg-cache-bytes", true, kAveraging},
    {"--keep-last", true, kPolicy},
    {"--keep-best", true, kPolicy},
    {"--keep-every", true, kPolicy},
    {"--keep-hourly", true, kPolicy},
    {"--keep-daily", true, kPolicy},
    {"--keep-weekly", true, kPolicy},
    {"--max-bytes", true, kPolicy},
    {"--policy", true, kPolicy},
    {"--commit-quiet", true, kMount},
    {"--commit-wait", true, kMount},
    {"--explicit-commit", false, kMount},
    {"--poll", true, kMount},
    {"--links", false, kMount},
    {"--direct-new", false, kMount},
    {"--log-level", true, kMount | Bit(Command::kPrune)},
    {"-f", false, kMount},
    {"-d", false, kMount},
    {"--dry-run", false, Bit(Command::kPrune)},
    {"--json", false, Bit(Command::kLs) | Bit(Command::kStatus) | Bit(Command::kInspect)},
    {"--config", true, kAll},
    {"--name", true, kAll},
};

const FlagSpec* FindFlag(const std::string& name) {
  for (const FlagSpec& f : kFlags) {
    if (name == f.name) return &f;
  }
  return nullptr;
}

// mount(8) and fstab options that are not FUSE's and mean nothing to ckptfs
// (mount.fuse3 strips most of them; mount.fuse.ckptfs sees them all).
bool IsIgnoredMountOption(const std::string& o) {
  static const char* const kIgnored[] = {"defaults", "auto",  "noauto",  "nofail", "user",
                                         "nouser",   "users", "_netdev", "owner",  "group"};
  for (const char* i : kIgnored) {
    if (o == i) return true;
  }
  return o.rfind("x-", 0) == 0 || o.rfind("comment=", 0) == 0;
}

struct Arg {
  std::string flag;
  std::optional<std::string> value;
  bool from_config = false;
};

Result<std::string> RealDirectory(const std::string& path, const char* what) {
  char buf[PATH_MAX];
  if (::realpath(path.c_str(), buf) == nullptr) {
    return Status::InvalidArgument(std::string(what) + " " + path + ": " + std::strerror(errno));
  }
  struct stat st {};
  if (::stat(buf, &st) != 0 || !S_ISDIR(st.st_mode)) {
    return Status::InvalidArgument(std::string(what) + " " + path + ": not a directory");
  }
  return std::string(buf);
}

// A mount whose daemon died answers ENOTCONN, so realpath fails on it: its
// parent is resolved instead.
Result<std::string> DeadMountPath(const std::string& path) {
  std::string p = path;
  while (p.size() > 1 && p.back() == '/') p.pop_back();
  const size_t slash = p.rfind('/');
  const std::string parent = slash == std::string::npos ? "."
                             : slash == 0               ? "/"
                                                        : p.substr(0, slash);
  Result<std::string> dir = RealDirectory(parent, "MOUNTPOINT's parent");
  if (!dir.ok()) return dir.status();
  return (*dir == "/" ? "" : *dir) + "/" + p.substr(slash + 1);
}

std::vector<std::string> SplitCommas(const std::string& text) {
  std::vector<std::string> out;
  size_t pos = 0;
  while (pos <= text.size()) {
    size_t comma = text.find(',', pos);
    if (comma == std::string::npos) comma = text.size();
    if (comma > pos) out.push_back(text.substr(pos, comma - pos));
    pos = comma + 1;
  }
  return out;
}

// One -o value: KEY=VALUE and KEY items naming a ckptfs option (keep_last=3,
// links; '_' or '-') become that option; the rest are FUSE mount options.
Status ExpandMountOptions(const std::string& text, std::vector<Arg>* args,
                          std::vector<std::string>* fuse_options) {
  for (const std::string& item : SplitCommas(text)) {
    const size_t eq = item.find('=');
    std::string flag = "--" + item.substr(0, eq);
    std::replace(flag.begin(), flag.end(), '_', '-');
    const FlagSpec* spec = flag.size() > 3 ? FindFlag(flag) : nullptr;
    if (spec == nullptr) {
      if (!IsIgnoredMountOption(item)) fuse_options->push_back(item);
      continue;
    }
    if (spec->takes_value != (eq != std::string::npos)) {
      return Status::InvalidArgument("-o " + item + ": " +
                                     (spec->takes_value ? "needs =VALUE" : "takes no value"));
    }
    Arg a{flag, std::nullopt};
    if (eq != std::string::npos) a.value = item.substr(eq + 1);
    args->push_back(std::move(a));
  }
  return Status::Ok();
}

struct ConfiguredMount {
  std::vector<Arg> args;
  std::string source, mountpoint;
  std::optional<core::RetentionPolicy> policy;
};

// The mount `name` of configuration file `path`:
// {"mounts": {"NAME": {"source": ..., "mountpoint": ..., "policy": {...}, ...}}}.
Result<ConfiguredMount> LoadConfiguredMount(const std::string& path, const std::string& name) {
  Result<std::string> text = core::ReadFile(path);
  if (!text.ok()) return Status::InvalidArgument("config " + text.status().message());
  nlohmann::json doc = nlohmann::json::parse(*text, nullptr, /*allow_exceptions=*/false);
  if (doc.is_discarded() || !doc.is_object() || !doc.contains("mounts") ||
      !doc["mounts"].is_object()) {
    return Status::InvalidArgument("config " + path +
                                   ": expected a JSON object with a \"mounts\" object");
  }
  const nlohmann::json& mounts = doc["mounts"];
  if (!mounts.contains(name)) {
    std::string known;
    for (const auto& [k, v] : mounts.items()) known += (known.empty() ? "" : ", ") + k;
    return Status::InvalidArgument("config " + path + ": no mount named '" + name +
                                   "' (configured: " + (known.empty() ? "none" : known) + ")");
  }
  const nlohmann::json& m = mounts[name];
  const std::string where = "config " + path + ": mount '" + name + "'";
  if (!m.is_object()) return Status::InvalidArgument(where + ": expected an object");
  ConfiguredMount out;
  for (const auto& [key, value] : m.items()) {
    if (key == "source" || key == "mountpoint") {
      if (!value.is_string())
        return Status::InvalidArgument(where + ": '" + key + "' must be a string");
      (key == "source" ? out.source : out.mountpoint) = value.get<std::string>();
    } else if (key == "policy") {
      Result<core::RetentionPolicy> p = core::ParsePolicyJson(value.dump(), where + ": policy");
      if (!p.ok()) return p.status();
      out.policy = *p;
    } else if (key == "fuse_options") {
      if (!value.is_array())
        return Status::InvalidArgument(where + ": 'fuse_options' must be a list");
      for (const auto& o : value) {
        if (!o.is_string())
          return Status::InvalidArgument(where + ": 'fuse_options' must hold strings");
        out.args.push_back({"-o", o.get<std::string>(), true});
      }
    } else {
      std::string flag = "--" + key;
      std::replace(flag.begin(), flag.end(), '_', '-');
      const FlagSpec* spec = FindFlag(flag);
      if (core::IsPolicyOption(flag) || flag == "--policy") {
        return Status::InvalidArgument(where + ": '" + key +
                                       "' is a retention rule: put it in \"policy\"");
      }
      if (spec == nullptr || flag == "--config" || flag == "--name") {
        return Status::InvalidArgument(where + ": unknown key '" + key + "'");
      }
      if (!spec->takes_value) {
        if (!value.is_boolean())
          return Status::InvalidArgument(where + ": '" + key + "' must be true or false");
        if (value.get<bool>()) out.args.push_back({flag, std::nullopt, true});
      } else if (value.is_string()) {
        out.args.push_back({flag, value.get<std::string>(), true});
      } else if (value.is_number()) {
        std::string v = value.dump();
        out.args.push_back({flag, v, true});
      } else {
        return Status::InvalidArgument(where + ": '" + key + "' must be a string or number");
      }
    }
  }
  return out;
}

Status ApplyPolicyFile(const std::string& path, core::RetentionPolicy* policy) {
  Result<std::string> text = core::ReadFile(path);
  if (!text.ok()) return Status::InvalidArgument("--policy " + text.status().message());
  Result<core::RetentionPolicy> p = core::ParsePolicyJson(*text, path);
  if (!p.ok()) return p.status();
  // Rules given before --policy add to the file's.
  core::RetentionPolicy merged = *p;
  const core::RetentionPolicy& cli = *policy;
  if (cli.keep_last > 0) merged.keep_last = cli.keep_last;
  merged.keep_best.insert(merged.keep_best.end(), cli.keep_best.begin(), cli.keep_best.end());
  merged.keep_every.insert(merged.keep_every.end(), cli.keep_every.begin(), cli.keep_every.end());
  if (cli.keep_hourly > 0) merged.keep_hourly = cli.keep_hourly;
  if (cli.keep_daily > 0) merged.keep_daily = cli.keep_daily;
  if (cli.keep_weekly > 0) merged.keep_weekly = cli.keep_weekly;
  if (cli.max_bytes >= 0) merged.max_bytes = cli.max_bytes;
  *policy = merged;
  return Status::Ok();
}

Result<core::LogLevel> ParseLogLevel(const std::string& v) {
  if (v == "debug") return core::LogLevel::kDebug;
  if (v == "info") return core::LogLevel::kInfo;
  if (v == "warning") return core::LogLevel::kWarning;
  if (v == "error") return core::LogLevel::kError;
  return Status::InvalidArgument("--log-level: expected error, warning, info or debug, got '" + v +
                                 "'");
}

// A relative path made absolute against the working directory: the daemon
// leaves it (libfuse's daemonising does chdir("/")), and "idx.db" has no
// parent in its text to create.
std::string Absolute(const std::string& path) {
  if (path.empty() || path[0] == '/') return path;
  char cwd[PATH_MAX];
  if (::getcwd(cwd, sizeof(cwd)) == nullptr) return path;
  return std::string(cwd) + "/" + path;
}

// Sets one option; the flag is known and accepted by opt->command.
Status Apply(const Arg& a, Options* opt) {
  const std::string& f = a.flag;
  const std::string v = a.value.value_or("");
  if (f == "--index") {
    opt->index_path = Absolute(v);
  } else if (f == "--avg-cache") {
    opt->avg_cache = Absolute(v);
  } else if (f == "--avg-cache-bytes") {
    Result<int64_t> bytes = core::ParseSize(v);
    if (!bytes.ok()) return bytes.status();
    opt->avg_cache_bytes = *bytes;
  } else if (core::IsPolicyOption(f)) {
    return core::AddPolicyOption(f, v, &opt->policy);
  } else if (f == "--policy") {
    return ApplyPolicyFile(v, &opt->policy);
  } else if (f == "--commit-quiet" || f == "--commit-wait") {
    char* end = nullptr;
    double& seconds = f == "--commit-quiet" ? opt->commit_quiet : opt->commit_wait;
    seconds = std::strtod(v.c_str(), &end);
    if (end == v.c_str() || *end != '\0' || !(seconds >= 0) || seconds > 3600) {
      return Status::InvalidArgument(f + ": expected seconds from 0 to 3600, got '" + v + "'");
    }
  } else if (f == "--poll") {
    char* end = nullptr;
    opt->poll = std::strtod(v.c_str(), &end);
    if (end == v.c_str() || *end != '\0' || !(opt->poll >= 0) || opt->poll > 3600 ||
        (opt->poll > 0 && opt->poll < 0.1)) {
      return Status::InvalidArgument(
          "--poll: expected seconds from 0.1 to 3600 (0: inotify only), got '" + v + "'");
    }
  } else if (f == "--log-level") {
    Result<core::LogLevel> level = ParseLogLevel(v);
    if (!level.ok()) return level.status();
    opt->log_level = *level;
  } else if (f == "--explicit-commit") {
    opt->explicit_commit = true;
  } else if (f == "--links") {
    opt->links = true;
  } else if (f == "--direct-new") {
    opt->direct_new = true;
  } else if (f == "-f") {
    opt->foreground = true;
  } else if (f == "-d") {
    opt->debug = opt->foreground = true;
    opt->log_level = core::LogLevel::kDebug;
  } else if (f == "--dry-run") {
    opt->dry_run = true;
  } else if (f == "--json") {
    opt->json = true;
  }
  return Status::Ok();  // --config and --name were taken before
}

// mount.fuse.ckptfs SOURCE MOUNTPOINT [-sfnv] [-o OPTS] [-t TYPE]: mount(8)'s
// helper form, turned into `ckptfs mount`. Returns false for -f (a fake
// mount: nothing to do).
bool FromHelperForm(int argc, char** argv, std::vector<std::string>* out) {
  out->push_back("mount");
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "-f") return false;
    if (a == "-s" || a == "-n" || a == "-v") continue;
    if ((a == "-t" || a == "-N") && i + 1 < argc) {
      ++i;
      continue;
    }
    out->push_back(a);
  }
  return true;
}

}  // namespace

Result<Options> ParseOptions(int argc, char** argv) {
  Options opt;
  std::vector<std::string> words;
  std::string program = argc > 0 ? argv[0] : "ckptfs";
  program = program.substr(program.rfind('/') + 1);
  if (program == "mount.fuse.ckptfs" || program == "mount.ckptfs") {
    if (!FromHelperForm(argc, argv, &words)) {
      opt.command = Command::kVersion;  // a fake mount (-f) only reports
      return opt;
    }
  } else {
    for (int i = 1; i < argc; ++i) words.push_back(argv[i]);
  }
  if (words.empty()) return Status::InvalidArgument("no command given");
  std::string cmd = words[0];
  if (cmd == "help" || cmd == "-h" || cmd == "--help") return opt;
  if (cmd == "-V" || cmd == "--version") {
    opt.command = Command::kVersion;
    return opt;
  }
  static const std::pair<const char*, Command> kCommands[] = {
      {"ls", Command::kLs},          {"resolve", Command::kResolve}, {"prune", Command::kPrune},
      {"cat", Command::kCat},        {"mount", Command::kMount},     {"status", Command::kStatus},
      {"inspect", Command::kInspect}};
  bool known = false;
  for (const auto& [name, command] : kCommands) {
    if (cmd == name) opt.command = command, known = true;
  }
  struct stat source_st {};
  if (!known && !cmd.empty() && cmd[0] != '-' && words.size() >= 3 &&
      ::stat(cmd.c_str(), &source_st) == 0 && S_ISDIR(source_st.st_mode)) {
    // mount.fuse3 runs `ckptfs SOURCE MOUNTPOINT -o OPTS`.
    words.insert(words.begin(), "mount");
    opt.command = Command::kMount, known = true;
    cmd = "mount";
  }
  if (!known) return Status::InvalidArgument("unknown command '" + cmd + "'");
  size_t want = opt.command == Command::kResolve || opt.command == Command::kCat ||
                        opt.command == Command::kMount || opt.command == Command::kInspect
                    ? 2
                    : 1;

  // Words into options and operands; -o expands into options and FUSE options.
  std::vector<Arg> args;
  std::vector<std::string> operands;
  bool options_done = false;
  for (size_t i = 1; i < words.size(); ++i) {
    const std::string& w = words[i];
    if (options_done || w.empty() || w[0] != '-' || w == "-") {
      operands.push_back(w);
      continue;
    }
    if (w == "--") {
      options_done = true;
      continue;
    }
    if (w == "-h" || w == "--help") {
      opt.command = Command::kHelp;
      return opt;
    }
    if (w.rfind("-o", 0) == 0 && opt.command == Command::kMount) {
      std::string items = w.substr(2);
      if (items.empty()) {
        if (i + 1 >= words.size()) return Status::InvalidArgument("-o needs a value");
        items = words[++i];
      }
      if (Status s = ExpandMountOptions(items, &args, &opt.fuse_options); !s.ok()) return s;
      continue;
    }
    const FlagSpec* spec = FindFlag(w);
    if (spec == nullptr || (spec->commands & Bit(opt.command)) == 0) {
      return Status::InvalidArgument("unknown option '" + w + "' for " + cmd);
    }
    Arg a{w, std::nullopt};
    if (spec->takes_value) {
      if (i + 1 >= words.size()) return Status::InvalidArgument(w + " needs a value");
      a.value = words[++i];
    }
    args.push_back(std::move(a));
  }

  // The configured mount, when one is named, comes first: what follows wins.
  std::string config_path = kDefaultConfigPath;
  for (const Arg& a : args) {
    if (a.flag == "--config") config_path = *a.value;
    if (a.flag == "--name") opt.name = *a.value;
  }
  const bool has_config =
      std::any_of(args.begin(), args.end(), [](const Arg& a) { return a.flag == "--config"; });
  if (has_config && opt.name.empty())
    return Status::InvalidArgument("--config needs --name: which mount of it");
  std::optional<core::RetentionPolicy> configured_policy;
  if (!opt.name.empty()) {
    Result<ConfiguredMount> m = LoadConfiguredMount(config_path, opt.name);
    if (!m.ok()) return m.status();
    std::vector<Arg> merged;
    std::vector<std::string> fuse_options;
    for (const Arg& a : m->args) {
      if (a.flag == "-o") {
        fuse_options.push_back(*a.value);
      } else if ((FindFlag(a.flag)->commands & Bit(opt.command)) != 0) {
        merged.push_back(a);  // what this command does not take is left out
      }
    }
    if (opt.command == Command::kMount) {
      opt.fuse_options.insert(opt.fuse_options.begin(), fuse_options.begin(), fuse_options.end());
    }
    merged.insert(merged.end(), args.begin(), args.end());
    args = std::move(merged);
    configured_policy = m->policy;
    if (operands.empty()) {
      if (opt.command == Command::kStatus) {
        if (!m->mountpoint.empty()) operands.push_back(m->mountpoint);
      } else if (!m->source.empty()) {
        operands.push_back(m->source);
        if (opt.command == Command::kMount && !m->mountpoint.empty())
          operands.push_back(m->mountpoint);
      }
    }
  }
  for (const Arg& a : args) {
    if (Status s = Apply(a, &opt); !s.ok()) return s;
  }
  if (opt.policy.empty() && configured_policy) opt.policy = *configured_policy;

  if (opt.command == Command::kPrune && opt.policy.empty()) {
    return Status::InvalidArgument(
        "prune needs a policy (--keep-last, --keep-best, ..., or --policy FILE); "
        "with none it would have nothing to decide by");
  }
  if (opt.command == Command::kInspect && operands.size() == 1) {
    opt.file = operands[0];  // inspect PATH: a real file, no SOURCE
    return opt;
  }
  if (operands.size() != want) {
    return Status::InvalidArgument(cmd + " takes " +
                                   (opt.command == Command::kInspect
                                        ? "PATH, or SOURCE VPATH"
                                        : std::to_string(want) + " operand(s)") +
                                   ", got " + std::to_string(operands.size()) + " operand(s)");
  }
  if (opt.command == Command::kStatus) {
    Result<std::string> mp = RealDirectory(operands[0], "MOUNTPOINT");
    if (!mp.ok()) return mp.status();
    opt.mountpoint = *mp;
    return opt;
  }
  Result<std::string> source = RealDirectory(operands[0], "SOURCE");
  if (!source.ok()) return source.status();
  opt.source = *source;
  if (opt.command == Command::kResolve || opt.command == Command::kCat ||
      opt.command == Command::kInspect) {
    opt.vpath = operands[1];
  }
  if (opt.command == Command::kMount) {
    struct statfs st {};  // statfs always reaches a FUSE daemon, stat may not
    const bool dead =
        ::statfs(operands[1].c_str(), &st) != 0 && errno == ENOTCONN;  // detached later
    Result<std::string> mp =
        dead ? DeadMountPath(operands[1]) : RealDirectory(operands[1], "MOUNTPOINT");
    if (!mp.ok()) return mp.status();
    opt.mountpoint = *mp;
    if (opt.mountpoint == opt.source || opt.mountpoint.rfind(opt.source + "/", 0) == 0) {
      return Status::InvalidArgument("MOUNTPOINT " + opt.mountpoint + " lies inside SOURCE");
    }
  }
  if (opt.index_path.empty()) opt.index_path = index::DefaultIndexPath(opt.source);
  if (opt.avg_cache.empty()) opt.avg_cache = opt.index_path + ".avg";
  return opt;
}

Result<std::unique_ptr<index::Index>> OpenIndex(const Options& opt) {
  Result<std::unique_ptr<index::Index>> idx = index::Index::Open(opt.source, opt.index_path);
  if (!idx.ok()) return idx.status();
  Result<index::ScanStats> scan = (*idx)->Scan();
  if (!scan.ok()) return scan.status();
  return idx;
}

}  // namespace ckptfs::fs
