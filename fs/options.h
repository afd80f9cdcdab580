// Command-line options of every ckptfs command, and the shared steps that
// turn them into an open, up-to-date index.
#ifndef CKPTFS_FS_OPTIONS_H_
#define CKPTFS_FS_OPTIONS_H_

#include <memory>
#include <string>
#include <vector>

#include "core/average_cache.h"
#include "core/log.h"
#include "core/retention.h"
#include "core/status.h"
#include "index/index.h"

namespace ckptfs::fs {

enum class Command { kHelp, kVersion, kLs, kResolve, kCat, kPrune, kMount, kStatus, kInspect };

// --poll's period when the daemon turns polling on by itself.
inline constexpr double kAutoPollSeconds = 2.0;

// Where --name looks for its mount when no --config is given.
inline constexpr char kDefaultConfigPath[] = "/etc/ckptfs/ckptfs.json";

struct Options {
  Command command = Command::kHelp;
  std::string source;      // realpath of SOURCE
  std::string vpath;       // resolve, cat, inspect SOURCE VPATH
  std::string file;        // inspect PATH (a real file; no SOURCE)
  std::string mountpoint;  // mount, status: realpath of MOUNTPOINT
  std::string name;        // --name: the configured mount these options came from
  std::string index_path;  // --index, else DefaultIndexPath(source)
  std::string avg_cache;   // --avg-cache, else index_path + ".avg"
  int64_t avg_cache_bytes = core::kDefaultAverageCacheBytes;  // --avg-cache-bytes
  bool json = false;                                          // ls --json
  bool foreground = false;                                    // mount -f
  bool debug = false;                                         // mount -d
  core::LogLevel log_level = core::LogLevel::kInfo;           // --log-level
  bool links = false;                                         // mount --links
  bool direct_new = false;                                    // mount --direct-new
  bool dry_run = false;                                       // prune --dry-run
  double commit_quiet = 0.3;                                  // mount --commit-quiet SECONDS
  double commit_wait = 30.0;                                  // mount --commit-wait SECONDS
  bool explicit_commit = false;                               // mount --explicit-commit
  // mount --poll SECONDS: rescan at that period instead of inotify (shared
  // filesystems); 0: inotify even on a network filesystem; < 0 (not given):
  // poll every kAutoPollSeconds if SOURCE is on a network or FUSE filesystem.
  double poll = -1;
  core::RetentionPolicy policy;           // prune and mount: --keep-*, --max-bytes, --policy FILE
  std::vector<std::string> fuse_options;  // mount -o items that are not ckptfs options
};

// Parses argv. kInvalidArgument with a message for the user on bad usage
// (unknown command or option, missing or extra operands, SOURCE not a
// directory, a configuration file that cannot be read).
//
// Settings come from three places, later ones winning: the mount named by
// --name in the configuration file (--config, default kDefaultConfigPath),
// then `-o KEY=VALUE` items, then flags, in command-line order. A policy on
// the command line replaces the configured one as a whole.
//
// `ckptfs SOURCE MOUNTPOINT -o OPTS` (what mount.fuse3 runs for
// `mount -t fuse.ckptfs` and fstab lines) is `ckptfs mount`; so is the
// program run as mount.fuse.ckptfs or mount.ckptfs (mount(8)'s helper form).
core::Result<Options> ParseOptions(int argc, char** argv);

// Opens the index of opt.source and brings it up to date with one scan.
core::Result<std::unique_ptr<index::Index>> OpenIndex(const Options& opt);

// `ckptfs mount`: defined in fs/daemon.cc.
int RunMount(const Options& opt);

}  // namespace ckptfs::fs

#endif  // CKPTFS_FS_OPTIONS_H_
