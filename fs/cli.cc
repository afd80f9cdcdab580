#include "fs/cli.h"

#include <fcntl.h>
#include <limits.h>
#include <sys/sendfile.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <iostream>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "core/average_cache.h"
#include "core/file_util.h"
#include "core/json_text.h"
#include "core/log.h"
#include "core/pickle_audit.h"
#include "fs/mount_status.h"
#include "fs/options.h"
#include "index/index.h"
#include "index/lease.h"
#include "index/pruner.h"
#include "index/resolver.h"

#ifndef CKPTFS_VERSION
#define CKPTFS_VERSION "unknown"
#endif

namespace ckptfs::fs {

using core::Result;
using core::Status;

namespace {

constexpr int kExitFailure = 1;
constexpr int kExitUsage = 2;

const char kUsage[] =
    "usage: ckptfs COMMAND [options] ...\n"
    "\n"
    "Checkpoint directories as queryable paths.\n"
    "\n"
    "commands:\n"
    "  mount [options] SOURCE MOUNTPOINT   mount SOURCE's query filesystem at MOUNTPOINT;\n"
    "                                      daemonises once the mount answers (-f: stay in front)\n"
    "  resolve [options] SOURCE VPATH      print the real path VPATH resolves to (for avg/\n"
    "                                      paths: the member files, newest first)\n"
    "  ls [options] SOURCE                 list checkpoints with their meta (--json: as JSON)\n"
    "  prune [--dry-run] POLICY SOURCE     apply a retention policy once; --dry-run prints, for\n"
    "                                      every checkpoint, keep or delete and the deciding rule\n"
    "  cat [options] SOURCE VPATH          write VPATH's content to stdout, computing an average\n"
    "                                      if needed (for machines without FUSE)\n"
    "  status [--json] MOUNTPOINT          what a running mount holds and did: index size, last\n"
    "                                      commits, deletions, averages and errors\n"
    "  inspect [--json] PATH               every tensor (dtype, shape, bytes), every other value\n"
    "  inspect [--json] [options] SOURCE VPATH  and every global a checkpoint's pickle "
    "references,\n"
    "                                      read without running anything; each global marked\n"
    "                                      allowed or NOT ALLOWED by torch's weights_only\n"
    "                                      allow-list; exit 3 when one is not (gates a pipeline)\n"
    "  help                                show this text\n"
    "\n"
    "VPATH is a path inside the mount, relative to SOURCE, such as /best/min/loss/mdl.ckpt,\n"
    "/latest, /top/3/max/acc/2, /where/epoch>=10/best/min/loss, /exp1/avg/last3/model.ckpt.\n"
    "\n"
    "options:\n"
    "  --index PATH     the SQLite index file (default: $XDG_STATE_HOME/ckptfs/index-HASH.sqlite,\n"
    "                   else ~/.local/state/ckptfs/); it is a cache and is rebuilt when missing\n"
    "  --json           (ls, status, inspect) print JSON instead of a table\n"
    "  --avg-cache DIR  (cat, mount) where averages are cached (default: the index path + .avg)\n"
    "  --avg-cache-bytes SIZE  (cat, mount) bound of that cache, e.g. 20G (default 20G)\n"
    "  --name NAME      take SOURCE, MOUNTPOINT and the options of mount NAME from the\n"
    "                   configuration file; what the command line gives wins, and a policy\n"
    "                   given there replaces the configured one\n"
    "  --config FILE    the configuration file (default /etc/ckptfs/ckptfs.json):\n"
    "                   {\"mounts\": {\"NAME\": {\"source\": DIR, \"mountpoint\": DIR,\n"
    "                   \"policy\": {...}, \"fuse_options\": [...], OPTION: VALUE, ...}}}\n"
    "                   where OPTION is a long option below without --, '-' as '_'\n"
    "  --log-level L    (mount, prune) error, warning, info (default) or debug\n"
    "  -h, --help       show this text\n"
    "  -V, --version    show the version\n"
    "\n"
    "policy (prune, mount; a checkpoint is deleted only if some rule ranks it and none keeps\n"
    "it; the newest, pinned (a .keep file inside it), invalid and open ones are never deleted):\n"
    "  --keep-last N            the N newest\n"
    "  --keep-best min:KEY:N    the N with the lowest (max: highest) numeric KEY; repeatable\n"
    "  --keep-every KEY:N       those whose KEY is a multiple of N (every 10th epoch); repeatable\n"
    "  --keep-hourly N, --keep-daily N, --keep-weekly N\n"
    "                           the newest of each of the last N hours / days / weeks\n"
    "  --max-bytes SIZE         the newest that fit in SIZE (K, M, G, T)\n"
    "  --policy FILE.json       rules from a file: {\"keep_last\": 3, \"keep_best\": "
    "[\"min:loss:2\"]}\n"
    "\n"
    "mount options:\n"
    "  -f               stay in the foreground, logs on stderr\n"
    "  --links          selector entries are symbolic links to the real files\n"
    "  -o OPT[,OPT]     mount options: any long option as KEY or KEY=VALUE (keep_last=3,\n"
    "                   keep_best=min:loss:2, links, commit_quiet=2, config=F, name=N); the\n"
    "                   rest go to FUSE (allow_other, ro, ...)\n"
    "  --commit-quiet S a checkpoint written to new/ is committed once no file of it is open\n"
    "                   for writing, it has been quiet S seconds (default 0.3) and it holds\n"
    "                   every file the experiment's previous checkpoint holds\n"
    "  --commit-wait S  one that lacks some of those files is committed after S seconds\n"
    "                   of quiet instead (default 30: a slow save hook between two files)\n"
    "  --explicit-commit  commit only when the writer creates new/NAME/.commit (or\n"
    "                   new/NAME.commit for a single file)\n"
    "  --direct-new     new/NAME directories become symbolic links into the staging area\n"
    "                   once created: their files are written at disk speed, not through\n"
    "                   the daemon (writers must see the source's path, as with --links)\n"
    "  --poll S         look for changes by rescanning every S seconds instead of inotify,\n"
    "                   which misses what other nodes write; on by itself (every 2 s) when\n"
    "                   SOURCE is on NFS, Lustre, CephFS, SMB or FUSE; --poll 0 turns it off\n"
    "  POLICY           retention rules (above): run after every commit and new checkpoint;\n"
    "                   with several daemons on one SOURCE only the holder of the lease\n"
    "                   (SOURCE/.ckptfs-lease/lease) prunes, the others stand by\n"
    "  -d               FUSE debug output (implies -f)\n"
    "\n"
    "Under systemd (ckptfs@NAME.service runs `ckptfs mount -f --name NAME`), readiness is\n"
    "reported with sd_notify and logs go to the journal with their levels.\n"
    "`mount -t fuse.ckptfs SOURCE MOUNTPOINT -o OPTS` and fstab lines of type fuse.ckptfs\n"
    "run `ckptfs SOURCE MOUNTPOINT -o OPTS`, the same as `ckptfs mount`.\n"
    "\n"
    "Exit status: 0 success, 1 failure (the message names the file and the reason),\n"
    "2 usage error, 3 (inspect) a global outside the weights_only allow-list.\n"
    "Unmount with: fusermount3 -u MOUNTPOINT (or umount as root)\n";

int Usage(const std::string& why) {
  std::fprintf(stderr, "ckptfs: %s\nTry 'ckptfs --help'.\n", why.c_str());
  return kExitUsage;
}

int Fail(const Status& s) {
  std::fprintf(stderr, "ckptfs: %s\n", s.message().c_str());
  return kExitFailure;
}

std::string FormatTime(double unixtime) {
  if (!std::isfinite(unixtime) || unixtime <= 0) return "-";
  std::time_t t = static_cast<std::time_t>(unixtime);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof(buf), "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

std::string Relative(const std::string& source, const std::string& path) {
  if (path == source) return ".";
  if (path.rfind(source + "/", 0) == 0) return path.substr(source.size() + 1);
  return path;
}

int RunLs(const Options& opt) {
  Result<std::unique_ptr<index::Index>> idx = OpenIndex(opt);
  if (!idx.ok()) return Fail(idx.status());
  Result<std::vector<core::Checkpoint>> all = (*idx)->List(opt.source);
  if (!all.ok()) return Fail(all.status());
  if (opt.json) {
    std::fputs(index::CheckpointsToJson(*all).c_str(), stdout);
    return 0;
  }
  std::printf("%-40s %-12s %-7s %-20s %s\n", "CHECKPOINT", "LAYOUT", "STATUS", "TIME", "META");
  for (const core::Checkpoint& c : *all) {
    std::string meta;
    for (const auto& [k, v] : c.meta.entries) meta += (meta.empty() ? "" : " ") + k + "=" + v.text;
    if (!c.valid) meta = c.error;
    std::printf("%-40s %-12s %-7s %-20s %s\n", Relative(opt.source, c.path).c_str(),
                core::LayoutName(c.layout), c.valid ? "ok" : "INVALID",
                FormatTime(c.recency).c_str(), meta.c_str());
  }
  std::printf("%zu checkpoint(s)\n", all->size());
  return 0;
}

// Brings the index up to date and resolves opt.vpath (the index is only
// needed while resolving: a Resolution holds values, not references).
Result<index::Resolution> OpenAndResolve(const Options& opt) {
  Result<std::unique_ptr<index::Index>> idx = OpenIndex(opt);
  if (!idx.ok()) return idx.status();
  return index::Resolver(idx->get()).Resolve(opt.vpath);
}

int RunResolve(const Options& opt) {
  Result<index::Resolution> r = OpenAndResolve(opt);
  if (!r.ok()) return Fail(r.status());
  if (r->convert) {  // safetensors/: the files converted
    for (const std::string& f : index::ConvertMembers(*r)) std::printf("%s\n", f.c_str());
    return 0;
  }
  switch (r->type) {
    case index::NodeType::kRealDir:
    case index::NodeType::kRealFile:
    case index::NodeType::kRealOther:
      std::printf("%s\n", r->real_path.c_str());
      return 0;
    case index::NodeType::kAverageFile:
      for (const std::string& f : index::MemberFiles(*r)) std::printf("%s\n", f.c_str());
      return 0;
    case index::NodeType::kIndexJson:
      return Fail(
          Status::InvalidArgument(opt.vpath + ": index.json is generated; see 'ckptfs ls --json'"));
    case index::NodeType::kVirtualDir:
      if (r->checkpoint) {
        std::printf("%s\n", r->checkpoint->path.c_str());
        return 0;
      }
      if (!r->members.empty()) {
        for (const core::Checkpoint& m : r->members) std::printf("%s\n", m.path.c_str());
        return 0;
      }
      return Fail(Status::InvalidArgument(
          opt.vpath +
          ": a directory of the query namespace, not a checkpoint (complete it, "
          "e.g. best/min/KEY)"));
  }
  return kExitFailure;
}

// Copies a file to stdout: in the kernel when it can (sendfile), else
// through a buffer (pipes to older kernels, terminals).
Status CopyToStdout(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return Status::FromErrno(path, errno);
  for (;;) {
    ssize_t n = ::sendfile(STDOUT_FILENO, fd, nullptr, 1 << 30);
    if (n > 0) continue;
    if (n == 0) {
      ::close(fd);
      return Status::Ok();
    }
    if (errno == EINTR) continue;
    if (errno == EINVAL || errno == ENOSYS) break;  // fall back to read/write
    int err = errno;
    ::close(fd);
    return Status::FromErrno("stdout", err);
  }
  std::vector<char> buf(1 << 20);
  Status status;
  for (;;) {
    ssize_t n = ::read(fd, buf.data(), buf.size());
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      status = Status::FromErrno(path, errno);
      break;
    }
    if (n == 0) break;
    for (ssize_t off = 0; off < n;) {
      ssize_t w = ::write(STDOUT_FILENO, buf.data() + off, static_cast<size_t>(n - off));
      if (w < 0 && errno == EINTR) continue;
      if (w < 0) {
        ::close(fd);
        return Status::FromErrno("stdout", errno);
      }
      off += w;
    }
  }
  ::close(fd);
  return status;
}

// A progress bar on stderr when it is a terminal; otherwise silence.
core::ProgressFn ProgressBar() {
  if (::isatty(STDERR_FILENO) == 0) return nullptr;
  return [](const core::AverageProgress& p) {
    const int width = 40;
    const double frac =
        p.total > 0 ? static_cast<double>(p.done) / static_cast<double>(p.total) : 1;
    const int filled = static_cast<int>(frac * width);
    std::fprintf(stderr, "\r%-9s [%s%s] %5.1f%% %8.1f MB", p.stage,
                 std::string(filled, '#').c_str(), std::string(width - filled, ' ').c_str(),
                 frac * 100, static_cast<double>(p.done) / 1e6);
    if (std::string(p.stage) == "done") std::fputc('\n', stderr);
  };
}

// The file a resolution serves: a real file, or an average or a conversion
// (computed now, or taken from the cache). kInvalidArgument for what is not
// a file (a directory, index.json: cat prints the latter itself).
Result<std::string> ServedFile(const Options& opt, const index::Resolution& r) {
  if (r.convert) {  // safetensors/: converted (and averaged) on demand, cached
    core::AverageCache cache(opt.avg_cache, opt.avg_cache_bytes);
    return cache.GetSafetensors(index::ConvertMembers(r), ProgressBar());
  }
  if (r.type == index::NodeType::kRealFile) return r.real_path;
  if (r.type == index::NodeType::kAverageFile) {
    core::AverageCache cache(opt.avg_cache, opt.avg_cache_bytes);
    return cache.Get(index::MemberFiles(r), ProgressBar());
  }
  return Status::InvalidArgument(opt.vpath + ": not a file");
}

int RunCat(const Options& opt) {
  Result<index::Resolution> r = OpenAndResolve(opt);
  if (!r.ok()) return Fail(r.status());
  if (!r->convert && r->type == index::NodeType::kIndexJson) {
    std::fwrite(r->content.data(), 1, r->content.size(), stdout);
    return std::fflush(stdout) == 0 ? 0 : Fail(Status::FromErrno("stdout", errno));
  }
  Result<std::string> file = ServedFile(opt, *r);
  if (!file.ok()) return Fail(file.status());
  if (Status s = CopyToStdout(*file); !s.ok()) return Fail(s);
  return 0;
}

int RunPrune(const Options& opt) {
  Result<std::unique_ptr<index::Index>> idx = OpenIndex(opt);
  if (!idx.ok()) return Fail(idx.status());
  Result<core::Beneath> source = core::Beneath::Open((*idx)->source());
  if (!source.ok()) return Fail(source.status());
  // One pruner per source: a mount that prunes holds the lease; prune waits
  // for nobody and refuses instead (a dry run changes nothing: no lease).
  std::optional<index::Lease> lease;
  if (!opt.dry_run && !opt.policy.empty()) {
    Result<index::Lease> opened = index::Lease::Open(*source);
    if (!opened.ok()) return Fail(opened.status());
    lease.emplace(std::move(*opened));
    Result<bool> got = lease->TryAcquire();
    if (!got.ok()) return Fail(got.status());
    if (!*got) {
      const std::string holder = lease->Holder();
      return Fail(Status::Exists(
          "another ckptfs process" + (holder.empty() ? "" : " (" + holder + ")") +
          " holds the pruning lease " + lease->path() +
          " and prunes this source with its own policy; nothing deleted (use --dry-run to see "
          "what this policy would delete, or stop that mount's policy)"));
    }
  }
  Result<index::PruneReport> report =
      index::Prune(idx->get(), *source, opt.policy, {}, opt.dry_run, nullptr);
  if (!report.ok()) return Fail(report.status());
  std::printf("%-40s %-8s %s\n", "CHECKPOINT", opt.dry_run ? "WOULD" : "DID", "RULE");
  for (const index::PruneEntry& e : report->entries) {
    const char* what = e.decision.keep ? "keep" : (opt.dry_run || e.deleted ? "delete" : "KEPT");
    std::string why = e.error.empty() ? e.decision.why : e.error;
    std::printf("%-40s %-8s %s\n", Relative(opt.source, e.checkpoint.path).c_str(), what,
                why.c_str());
  }
  std::printf("policy: %s; %zu checkpoint(s), %d deleted%s\n", opt.policy.ToString().c_str(),
              report->entries.size(), report->deleted,
              opt.dry_run ? " (dry run: nothing changed)" : "");
  for (const std::string& why : report->refused) std::fprintf(stderr, "ckptfs: %s\n", why.c_str());
  return report->failed == 0 && report->refused.empty() ? 0 : kExitFailure;
}

std::string HumanBytes(double bytes) {
  const char* units[] = {"B", "KB", "MB", "GB", "TB"};
  int u = 0;
  while (bytes >= 1000 && u < 4) bytes /= 1000, ++u;
  char buf[32];
  std::snprintf(buf, sizeof(buf), u == 0 ? "%.0f %s" : "%.1f %s", bytes, units[u]);
  return buf;
}

int RunStatus(const Options& opt) {
  const std::string path = opt.mountpoint + "/" + kStatusFile;
  Result<std::string> text = core::ReadFile(path);
  if (!text.ok()) {
    const int err = text.status().sys_errno();
    return Fail(Status::FromErrno(
        opt.mountpoint + (err == ENOTCONN ? " (its daemon is gone; unmount with fusermount3 -u)"
                          : err == EACCES ? " (mounted by another user without -o allow_other?)"
                                          : " (not a ckptfs mount?)"),
        err));
  }
  if (opt.json) {
    std::fputs(text->c_str(), stdout);
    return 0;
  }
  nlohmann::json j;  // paths that are not UTF-8 come back as their bytes
  if (!core::ParseJson(*text, &j) || !j.is_object()) {
    return Fail(Status::Corrupt(path + ": not a status object"));
  }
  const nlohmann::json& idx = j.value("index", nlohmann::json::object());
  const nlohmann::json& totals = j.value("totals", nlohmann::json::object());
  const double up = j.value("uptime_s", 0.0);
  std::printf("%s%s -> %s (pid %lld, up %dh%02dm)\n",
              j.contains("name") ? ("mount " + j.value("name", "") + ": ").c_str() : "",
              j.value("source", "?").c_str(), j.value("mountpoint", "?").c_str(),
              static_cast<long long>(j.value("pid", 0)), static_cast<int>(up / 3600),
              static_cast<int>(up / 60) % 60);
  std::printf(
      "index:  %s (%s): %lld checkpoint(s), %lld invalid, %lld experiment(s), %s in %lld file(s)\n",
      idx.value("path", "?").c_str(), HumanBytes(idx.value("file_bytes", 0.0)).c_str(),
      static_cast<long long>(idx.value("checkpoints", 0)),
      static_cast<long long>(idx.value("invalid", 0)),
      static_cast<long long>(idx.value("experiments", 0)),
      HumanBytes(idx.value("checkpoint_bytes", 0.0)).c_str(),
      static_cast<long long>(idx.value("files", 0)));
  const std::string policy = j.value("policy", "");
  std::printf("policy: %s\n", policy.empty() ? "none (nothing is pruned)" : policy.c_str());
  std::printf("totals: %lld commit(s), %lld deletion(s), %lld average(s) served, %lld error(s)\n",
              static_cast<long long>(totals.value("commits", 0)),
              static_cast<long long>(totals.value("deletions", 0)),
              static_cast<long long>(totals.value("averages", 0)),
              static_cast<long long>(totals.value("errors", 0)));
  for (const char* kind : {"commits", "deletions", "averages", "errors"}) {
    const nlohmann::json& list = j.value(std::string("last_") + kind, nlohmann::json::array());
    if (list.empty()) continue;
    std::printf("last %s:\n", kind);
    for (const auto& e : list) {
      std::printf("  %s  %s\n", FormatTime(e.value("time", 0.0)).c_str(),
                  e.value("what", "").c_str());
    }
  }
  return 0;
}

// `ckptfs inspect`: the audit of one tensor file (core/pickle_audit.h),
// given as a real PATH or, as for cat, as SOURCE VPATH (an average is
// computed, or taken from the cache, and inspected).
constexpr int kExitUnsafe = 3;

void PrintAudit(const std::string& path, const core::CheckpointAudit& a, bool json) {
  if (json) {
    nlohmann::ordered_json doc;
    doc["path"] = path;
    doc["format"] = core::TensorFormatName(a.format);
    doc["allow_list"] = a.allow_list;
    doc["safe"] = a.Safe();
    doc["verdict"] = core::GlobalsVerdict(a);
    doc["tensors"] = nlohmann::ordered_json::array();
    for (const core::AuditTensor& t : a.tensors) {
      doc["tensors"].push_back(
          {{"name", t.name}, {"dtype", t.dtype}, {"shape", t.shape}, {"bytes", t.bytes}});
    }
    doc["values"] = nlohmann::ordered_json::array();
    for (const core::AuditValue& v : a.values) {
      doc["values"].push_back({{"name", v.name}, {"value", v.json}, {"opaque", v.opaque}});
    }
    doc["globals"] = nlohmann::ordered_json::array();
    for (const core::AuditGlobal& g : a.globals) {
      doc["globals"].push_back({{"name", g.name}, {"allowed", g.allowed}, {"uses", g.uses}});
    }
    std::printf("%s\n", core::DumpJson(doc, 2).c_str());
    return;
  }
  int64_t bytes = 0;
  for (const core::AuditTensor& t : a.tensors) bytes += t.bytes;
  std::printf("%s: %s, %zu tensor(s) of %lld bytes, %zu value(s), %zu global(s) (%s)\n",
              path.c_str(), core::TensorFormatName(a.format), a.tensors.size(),
              static_cast<long long>(bytes), a.values.size(), a.globals.size(),
              a.allow_list.c_str());
  for (const core::AuditTensor& t : a.tensors) {
    std::string shape = "[";
    for (size_t i = 0; i < t.shape.size(); ++i) {
      shape += (i ? "," : "") + std::to_string(t.shape[i]);
    }
    std::printf("tensor  %s  %s  %s]  %lld bytes\n", core::PrintableName(t.name).c_str(),
                t.dtype.c_str(), shape.c_str(), static_cast<long long>(t.bytes));
  }
  for (const core::AuditValue& v : a.values) {
    std::printf(
        "value   %s  %s%s\n", v.name.empty() ? "(root)" : core::PrintableName(v.name).c_str(),
        core::PrintableName(v.json).c_str(), v.opaque ? "  (object, contents not shown)" : "");
  }
  // uses: objects referring to it; 0 for what the reader consumed (a tensor
  // rebuild, OrderedDict()).
  for (const core::AuditGlobal& g : a.globals) {
    std::printf("global  %s  %s", core::PrintableName(g.name).c_str(),
                g.allowed ? "allowed" : "NOT ALLOWED");
    if (g.uses > 0) std::printf("  (%lld use(s))", static_cast<long long>(g.uses));
    std::printf("\n");
  }
  std::printf("verdict: %s\n", core::GlobalsVerdict(a).c_str());
}

// inspect PATH (opt.file), or SOURCE VPATH resolved as cat resolves it.
int RunInspect(const Options& opt) {
  std::string path = opt.file;
  if (path.empty()) {
    Result<index::Resolution> r = OpenAndResolve(opt);
    if (!r.ok()) return Fail(r.status());
    Result<std::string> file = ServedFile(opt, *r);
    if (!file.ok()) return Fail(file.status());
    path = *file;
  }
  Result<core::CheckpointAudit> audit = core::InspectFile(path);
  if (!audit.ok()) return Fail(audit.status());
  PrintAudit(path, *audit, opt.json);
  if (std::fflush(stdout) != 0) return Fail(Status::FromErrno("stdout", errno));
  return audit->Safe() ? 0 : kExitUnsafe;
}

int RunCommand(const Options& opt) {
  switch (opt.command) {
    case Command::kHelp:
      std::fputs(kUsage, stdout);
      return 0;
    case Command::kVersion:
      std::printf("ckptfs %s\n", CKPTFS_VERSION);
      return 0;
    case Command::kLs:
      return RunLs(opt);
    case Command::kResolve:
      return RunResolve(opt);
    case Command::kCat:
      return RunCat(opt);
    case Command::kPrune:
      return RunPrune(opt);
    case Command::kMount:
      return RunMount(opt);
    case Command::kStatus:
      return RunStatus(opt);
    case Command::kInspect:
      return RunInspect(opt);
  }
  return kExitUsage;
}

}  // namespace

int RunCli(int argc, char** argv) {
  int rc = kExitFailure;
  // The last wall: a command that throws fails with a message, never aborts.
  const Status thrown = core::CatchAll("ckptfs", [&] {
    Result<Options> opt = ParseOptions(argc, argv);
    if (!opt.ok()) {
      rc = Usage(opt.status().message());
      return;
    }
    core::SetLogLevel(opt->log_level);
    rc = RunCommand(*opt);
  });
  return thrown.ok() ? rc : Fail(thrown);
}

}  // namespace ckptfs::fs
