// `ckptfs mount`: builds the index, mounts, daemonises once the mount is
// ready, then serves until unmounted, keeping views in line with the disk.
#define FUSE_USE_VERSION 314
#include <fuse_lowlevel.h>

#include <atomic>
#include <chrono>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "core/log.h"
#include "fs/fuse_ops.h"
#include "fs/node_table.h"
#include "fs/options.h"
#include "index/watcher.h"

namespace ckptfs::fs {

using core::LogLevel;

namespace {

// Sends the kernel what NodeTable says it must forget. Called on the watcher
// thread, never inside a request handler (libfuse's rule for notifications).
void Notify(struct fuse_session* se, const std::vector<Invalidation>& invals) {
  for (const Invalidation& inv : invals) {
    int rc = inv.entry ? fuse_lowlevel_notify_inval_entry(se, inv.parent, inv.name.c_str(),
                                                          inv.name.size())
                       : fuse_lowlevel_notify_inval_inode(se, inv.ino, 0, 0);
    if (rc != 0 && rc != -ENOENT) {
      core::Log(LogLevel::kDebug, "invalidate %s: %s", inv.entry ? inv.name.c_str() : "inode",
                std::strerror(-rc));
    }
  }
}

}  // namespace

int RunMount(const Options& opt) {
  core::SetLogLevel(opt.debug ? LogLevel::kDebug : LogLevel::kInfo);
  auto start = std::chrono::steady_clock::now();
  auto idx = index::Index::Open(opt.source, opt.index_path);
  if (!idx.ok()) {
    core::Log(LogLevel::kError, "%s", idx.status().message().c_str());
    return 1;
  }
  auto scan = (*idx)->Scan();
  if (!scan.ok()) {
    core::Log(LogLevel::kError, "scan of %s: %s", opt.source.c_str(), scan.status().message().c_str());
    return 1;
  }
  core::Log(LogLevel::kInfo, "indexed %s: %d checkpoint(s) read, %d directories in %.0f ms (index %s)",
            opt.source.c_str(), scan->checkpoints_loaded, scan->dirs_visited, scan->seconds * 1e3,
            opt.index_path.c_str());

  // The watcher starts after the fork; until then nothing is watched.
  std::atomic<index::Watcher*> watcher_ptr{nullptr};
  core::AverageCache averages(opt.avg_cache, opt.avg_cache_bytes);
  NodeTableOptions table_options;
  table_options.links = opt.links;
  table_options.averages = &averages;
  table_options.is_watched = [&watcher_ptr](const std::string& dir) {
    index::Watcher* w = watcher_ptr.load();
    return w != nullptr && w->IsWatched(dir);
  };
  NodeTable table(idx->get(), table_options);

  std::vector<std::string> argv_storage = {"ckptfs"};
  std::string mount_opts = "fsname=ckptfs:" + opt.source + ",subtype=ckptfs,default_permissions";
  for (const std::string& o : opt.fuse_options) mount_opts += "," + o;
  argv_storage.push_back("-o");
  argv_storage.push_back(mount_opts);
  if (opt.debug) argv_storage.push_back("-d");
  std::vector<char*> argv;
  for (std::string& s : argv_storage) argv.push_back(s.data());
  struct fuse_args args = FUSE_ARGS_INIT(static_cast<int>(argv.size()), argv.data());

  struct fuse_session* se = fuse_session_new(&args, &FuseOps(), sizeof(FuseOps()), &table);
  fuse_opt_free_args(&args);
  if (se == nullptr) {
    core::Log(LogLevel::kError, "cannot start a FUSE session (options: %s)", mount_opts.c_str());
    return 1;
  }
  int rc = 1;
  if (fuse_set_signal_handlers(se) != 0) {
    fuse_session_destroy(se);
    return 1;
  }
  if (fuse_session_mount(se, opt.mountpoint.c_str()) != 0) {
    core::Log(LogLevel::kError, "cannot mount %s at %s (is /dev/fuse available, fusermount3 "
              "installed, the mountpoint empty and not mounted?)",
              opt.source.c_str(), opt.mountpoint.c_str());
    fuse_remove_signal_handlers(se);
    fuse_session_destroy(se);
    return 1;
  }
  double ready_ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  core::Log(LogLevel::kInfo, "mounted %s at %s in %.0f ms%s", opt.source.c_str(),
            opt.mountpoint.c_str(), ready_ms, opt.links ? " (--links)" : "");
  // The parent returns to the shell only now that the mount exists.
  if (!opt.foreground) core::LogToSyslog(true);
  fuse_daemonize(opt.foreground ? 1 : 0);

  index::Watcher::Callbacks callbacks;
  callbacks.on_path_changed = [se, &table](const std::string& dir, const std::string& name) {
    Notify(se, table.PathChanged(dir, name));
  };
  callbacks.on_scanned = [se, &table](const index::ScanStats& stats) {
    Notify(se, table.ViewsChanged(stats.changed_experiments));
  };
  auto watcher = index::Watcher::Start(idx->get(), callbacks, index::Watcher::Settings{});
  if (!watcher.ok()) {
    core::Log(LogLevel::kWarning, "no watcher (%s): views follow the disk only on remount",
              watcher.status().message().c_str());
  } else {
    watcher_ptr = watcher->get();
  }

  struct fuse_loop_config* loop = fuse_loop_cfg_create();
  fuse_loop_cfg_set_clone_fd(loop, 0);
  fuse_loop_cfg_set_idle_threads(loop, 8);
  fuse_loop_cfg_set_max_threads(loop, 16);
  rc = fuse_session_loop_mt(se, loop);
  fuse_loop_cfg_destroy(loop);

  watcher_ptr = nullptr;
  if (watcher.ok()) watcher->reset();
  fuse_session_unmount(se);
  fuse_remove_signal_handlers(se);
  fuse_session_destroy(se);
  core::Log(LogLevel::kInfo, "unmounted %s", opt.mountpoint.c_str());
  return rc == 0 ? 0 : 1;
}

}  // namespace ckptfs::fs
