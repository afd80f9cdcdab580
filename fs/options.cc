#include "fs/options.h"

#include <limits.h>
#include <stdlib.h>
#include <sys/stat.h>

#include <cctype>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>

namespace ckptfs::fs {

using core::Result;
using core::Status;

namespace {

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

void SplitCommas(const std::string& text, std::vector<std::string>* out) {
  size_t pos = 0;
  while (pos <= text.size()) {
    size_t comma = text.find(',', pos);
    if (comma == std::string::npos) comma = text.size();
    if (comma > pos) out->push_back(text.substr(pos, comma - pos));
    pos = comma + 1;
  }
}

}  // namespace

Result<Options> ParseOptions(int argc, char** argv) {
  Options opt;
  if (argc < 2) return Status::InvalidArgument("no command given");
  std::string cmd = argv[1];
  if (cmd == "help" || cmd == "-h" || cmd == "--help") return opt;
  if (cmd == "-V" || cmd == "--version") {
    opt.command = Command::kVersion;
    return opt;
  }
  size_t want;
  if (cmd == "ls") {
    opt.command = Command::kLs, want = 1;
  } else if (cmd == "resolve") {
    opt.command = Command::kResolve, want = 2;
  } else if (cmd == "prune") {
    opt.command = Command::kPrune, want = 1;
  } else if (cmd == "cat") {
    opt.command = Command::kCat, want = 2;
  } else if (cmd == "mount") {
    opt.command = Command::kMount, want = 2;
  } else {
    return Status::InvalidArgument("unknown command '" + cmd + "'");
  }
  std::vector<std::string> operands;
  bool options_done = false;
  for (int i = 2; i < argc; ++i) {
    std::string a = argv[i];
    auto value = [&](const char* name) -> Result<std::string> {
      if (i + 1 >= argc) return Status::InvalidArgument(std::string(name) + " needs a value");
      return std::string(argv[++i]);
    };
    if (options_done || a.empty() || a[0] != '-' || a == "-") {
      operands.push_back(a);
    } else if (a == "--") {
      options_done = true;
    } else if (a == "-h" || a == "--help") {
      opt.command = Command::kHelp;
      return opt;
    } else if (a == "--index") {
      Result<std::string> v = value("--index");
      if (!v.ok()) return v.status();
      opt.index_path = *v;
    } else if (a == "--avg-cache" && (opt.command == Command::kCat || opt.command == Command::kMount)) {
      Result<std::string> v = value("--avg-cache");
      if (!v.ok()) return v.status();
      opt.avg_cache = *v;
    } else if (a == "--avg-cache-bytes" &&
               (opt.command == Command::kCat || opt.command == Command::kMount)) {
      Result<std::string> v = value("--avg-cache-bytes");
      if (!v.ok()) return v.status();
      Result<int64_t> bytes = core::ParseSize(*v);
      if (!bytes.ok()) return bytes.status();
      opt.avg_cache_bytes = *bytes;
    } else if (core::IsPolicyOption(a) &&
               (opt.command == Command::kPrune || opt.command == Command::kMount)) {
      Result<std::string> v = value(a.c_str());
      if (!v.ok()) return v.status();
      if (Status s = core::AddPolicyOption(a, *v, &opt.policy); !s.ok()) return s;
    } else if (a == "--policy" && (opt.command == Command::kPrune || opt.command == Command::kMount)) {
      Result<std::string> v = value("--policy");
      if (!v.ok()) return v.status();
      std::ifstream in(*v);
      if (!in) return Status::InvalidArgument("--policy " + *v + ": " + std::strerror(errno));
      std::stringstream text;
      text << in.rdbuf();
      Result<core::RetentionPolicy> p = core::ParsePolicyJson(text.str(), *v);
      if (!p.ok()) return p.status();
      // Command-line rules add to the file's.
      core::RetentionPolicy merged = *p;
      const core::RetentionPolicy& cli = opt.policy;
      if (cli.keep_last > 0) merged.keep_last = cli.keep_last;
      merged.keep_best.insert(merged.keep_best.end(), cli.keep_best.begin(), cli.keep_best.end());
      merged.keep_every.insert(merged.keep_every.end(), cli.keep_every.begin(), cli.keep_every.end());
      if (cli.keep_hourly > 0) merged.keep_hourly = cli.keep_hourly;
      if (cli.keep_daily > 0) merged.keep_daily = cli.keep_daily;
      if (cli.keep_weekly > 0) merged.keep_weekly = cli.keep_weekly;
      if (cli.max_bytes >= 0) merged.max_bytes = cli.max_bytes;
      opt.policy = merged;
    } else if (a == "--commit-quiet" && opt.command == Command::kMount) {
      Result<std::string> v = value("--commit-quiet");
      if (!v.ok()) return v.status();
      char* end = nullptr;
      opt.commit_quiet = std::strtod(v->c_str(), &end);
      if (end == v->c_str() || *end != '\0' || !(opt.commit_quiet >= 0) || opt.commit_quiet > 3600) {
        return Status::InvalidArgument("--commit-quiet: expected seconds from 0 to 3600, got '" + *v + "'");
      }
    } else if (a == "--explicit-commit" && opt.command == Command::kMount) {
      opt.explicit_commit = true;
    } else if (a == "--dry-run" && opt.command == Command::kPrune) {
      opt.dry_run = true;
    } else if (a == "--json" && opt.command == Command::kLs) {
      opt.json = true;
    } else if (a == "-f" && opt.command == Command::kMount) {
      opt.foreground = true;
    } else if (a == "-d" && opt.command == Command::kMount) {
      opt.debug = opt.foreground = true;
    } else if (a == "--links" && opt.command == Command::kMount) {
      opt.links = true;
    } else if (a == "-o" && opt.command == Command::kMount) {
      Result<std::string> v = value("-o");
      if (!v.ok()) return v.status();
      SplitCommas(*v, &opt.fuse_options);
    } else if (a.rfind("-o", 0) == 0 && a.size() > 2 && opt.command == Command::kMount) {
      SplitCommas(a.substr(2), &opt.fuse_options);
    } else {
      return Status::InvalidArgument("unknown option '" + a + "' for " + cmd);
    }
  }
  if (opt.command == Command::kPrune && opt.policy.empty()) {
    return Status::InvalidArgument(
        "prune needs a policy (--keep-last, --keep-best, ..., or --policy FILE); "
        "with none it would have nothing to decide by");
  }
  if (operands.size() != want) {
    return Status::InvalidArgument(cmd + " takes " + std::to_string(want) + " operand(s), got " +
                                   std::to_string(operands.size()));
  }
  Result<std::string> source = RealDirectory(operands[0], "SOURCE");
  if (!source.ok()) return source.status();
  opt.source = *source;
  if (opt.command == Command::kResolve || opt.command == Command::kCat) opt.vpath = operands[1];
  if (opt.command == Command::kMount) {
    Result<std::string> mp = RealDirectory(operands[1], "MOUNTPOINT");
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
