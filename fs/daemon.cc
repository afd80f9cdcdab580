// `ckptfs mount`: builds the index, mounts, daemonises once the mount is
// ready, then serves until unmounted, keeping views in line with the disk.
#define FUSE_USE_VERSION 314
#include <fuse_lowlevel.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <sys/wait.h>
#include <systemd/sd-daemon.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "core/log.h"
#include "core/retention.h"
#include "fs/committer.h"
#include "fs/fuse_ops.h"
#include "fs/mount_status.h"
#include "fs/node_table.h"
#include "fs/options.h"
#include "index/pruner.h"
#include "index/resolver.h"
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

// Invalidations that a request handler asks for go out from this thread:
// libfuse forbids notifying from inside a handler.
class LaterNotifier {
 public:
  LaterNotifier() = default;
  LaterNotifier(const LaterNotifier&) = delete;
  LaterNotifier& operator=(const LaterNotifier&) = delete;
  ~LaterNotifier() { Stop(); }

  // After daemonising: a thread started before the fork would not survive it.
  void Start(struct fuse_session* se) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      se_ = se;
    }
    thread_ = std::thread([this] { Run(); });
  }
  void Push(Invalidation inv) {
    std::lock_guard<std::mutex> lock(mu_);
    if (se_ == nullptr) return;
    queue_.push_back(std::move(inv));
    cv_.notify_one();
  }
  // Before the session is destroyed.
  void Stop() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
      cv_.notify_one();
    }
    if (thread_.joinable()) thread_.join();
  }

 private:
  void Run() {
    std::unique_lock<std::mutex> lock(mu_);
    while (true) {
      cv_.wait(lock, [this] { return stop_ || !queue_.empty(); });
      if (stop_) return;
      std::vector<Invalidation> batch;
      batch.swap(queue_);
      struct fuse_session* se = se_;
      lock.unlock();
      Notify(se, batch);
      lock.lock();
    }
  }

  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<Invalidation> queue_;
  struct fuse_session* se_ = nullptr;
  bool stop_ = false;
  std::thread thread_;
};

// A daemon that died (SIGKILL, OOM) leaves its mount behind, answering
// ENOTCONN; a restart (systemd's Restart=on-failure) must be able to mount
// again, so such a mount is detached first. Anything else is left alone.
void DetachDeadMount(const std::string& mountpoint) {
  // statfs always reaches the daemon; stat may be answered from the cache.
  struct statfs st {};
  if (::statfs(mountpoint.c_str(), &st) == 0 || errno != ENOTCONN) return;
  core::Log(LogLevel::kWarning, "%s: a mount whose daemon died is still there; detaching it",
            mountpoint.c_str());
  if (::geteuid() == 0) {
    if (::umount2(mountpoint.c_str(), MNT_DETACH) != 0) {
      core::Log(LogLevel::kError, "%s: cannot detach: %s", mountpoint.c_str(), std::strerror(errno));
    }
    return;
  }
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::execlp("fusermount3", "fusermount3", "-u", "-z", mountpoint.c_str(), static_cast<char*>(nullptr));
    ::_exit(127);
  }
  int status = 0;
  if (pid < 0 || ::waitpid(pid, &status, 0) != pid || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    core::Log(LogLevel::kError, "%s: fusermount3 -u -z failed", mountpoint.c_str());
  }
}

void RecordError(void* status, const char* message) {
  static_cast<MountStatus*>(status)->Record(EventKind::kError, message);
}

}  // namespace

int RunMount(const Options& opt) {
  core::SetLogLevel(opt.log_level);
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

  MountStatus status({opt.name, opt.source, opt.mountpoint, opt.index_path,
                      opt.policy.empty() ? "" : opt.policy.ToString()});
  core::SetErrorObserver(RecordError, &status);
  struct ObserverReset {  // on every return: status dies with this frame
    ~ObserverReset() { core::SetErrorObserver(nullptr, nullptr); }
  } observer_reset;
  // The watcher starts after the fork; until then nothing is watched.
  std::atomic<index::Watcher*> watcher_ptr{nullptr};
  core::AverageCache averages(opt.avg_cache, opt.avg_cache_bytes);
  // Everything under SOURCE that retention, new/ and cleanup touch is reached
  // beneath this descriptor (core/beneath.h).
  auto source = core::Beneath::Open((*idx)->source());
  if (!source.ok()) {
    core::Log(LogLevel::kError, "%s", source.status().message().c_str());
    return 1;
  }
  // What a killed daemon left half-written in new/ is never committed.
  {
    auto all = (*idx)->List(opt.source);
    std::set<std::string> experiments = {opt.source};
    if (all.ok()) {
      for (const core::Checkpoint& c : *all) experiments.insert(c.experiment);
    }
    for (const std::string& e : experiments) {
      Committer::RecoverStaging(*source, e);
      if (core::Status s = core::RemoveTrash(*source, e); !s.ok()) {
        core::Log(LogLevel::kError, "trash cleanup skipped: %s", s.message().c_str());
      }
    }
  }
  std::unique_ptr<Committer> committer;
  LaterNotifier later;
  NodeTableOptions table_options;
  table_options.links = opt.links;
  table_options.direct_new = opt.direct_new;
  table_options.reinvalidate = [&later](Invalidation inv) { later.Push(std::move(inv)); };
  table_options.status = &status;
  table_options.averages = &averages;
  table_options.is_watched = [&watcher_ptr](const std::string& dir) {
    index::Watcher* w = watcher_ptr.load();
    return w != nullptr && w->IsWatched(dir);
  };
  Committer::Settings commit_settings;
  commit_settings.quiet = std::chrono::milliseconds(static_cast<int64_t>(opt.commit_quiet * 1000));
  commit_settings.explicit_only = opt.explicit_commit;
  commit_settings.direct = opt.direct_new;
  // The committer's callback needs the session, made below.
  struct fuse_session* session = nullptr;
  std::mutex prune_mu;  // one retention run at a time
  NodeTable* table_ptr = nullptr;
  auto prune = [&](const std::vector<std::string>& experiments) {
    if (opt.policy.empty() || experiments.empty()) return;
    std::lock_guard<std::mutex> lock(prune_mu);
    auto report = index::Prune(idx->get(), *source, opt.policy, experiments, false,
                               [&](const std::string& path) { return table_ptr->IsOpen(path); });
    if (!report.ok()) {
      core::Log(LogLevel::kError, "retention: %s", report.status().message().c_str());
      return;
    }
    for (const index::PruneEntry& e : report->entries) {
      if (e.deleted) status.Record(EventKind::kDeletion, e.checkpoint.path + " (" + e.decision.why + ")");
    }
    if (report->deleted > 0 && session != nullptr) {
      Notify(session, table_ptr->ViewsChanged(experiments));
      for (const index::PruneEntry& e : report->entries) {
        if (e.deleted) Notify(session, table_ptr->PathChanged(e.checkpoint.experiment, e.checkpoint.name));
      }
    }
  };
  committer = std::make_unique<Committer>(
      &*source, commit_settings, [&](const std::string& experiment, const std::string& name) {
        if (session != nullptr) {
          Notify(session, table_ptr->PathChanged(index::StagingDir(experiment), name));
        }
        auto stats = (*idx)->ScanChanges({{experiment, name}});
        if (!stats.ok()) {
          core::Log(LogLevel::kError, "indexing %s/%s: %s", experiment.c_str(), name.c_str(),
                    stats.status().message().c_str());
          return;
        }
        status.Record(EventKind::kCommit, experiment + "/" + name);
        if (session != nullptr) {
          Notify(session, table_ptr->ViewsChanged({experiment}));
          Notify(session, table_ptr->PathChanged(experiment, name));
        }
        prune({experiment});
      });
  table_options.committer = committer.get();
  NodeTable table(idx->get(), table_options);
  table_ptr = &table;

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
  session = se;
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
  DetachDeadMount(opt.mountpoint);
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
  later.Start(se);

  index::Watcher::Callbacks callbacks;
  callbacks.on_path_changed = [se, &table](const std::string& dir, const std::string& name) {
    Notify(se, table.PathChanged(dir, name));
  };
  callbacks.on_scanned = [se, &table, &prune](const index::ScanStats& stats) {
    Notify(se, table.ViewsChanged(stats.changed_experiments));
    prune(stats.changed_experiments);  // checkpoints written straight into the source
  };
  callbacks.on_periodic = [&]() {
    // Deletions deferred because a file was open are retried here.
    if (opt.policy.empty()) return;
    auto all = (*idx)->List(opt.source);
    if (!all.ok()) return;
    std::set<std::string> experiments;
    for (const core::Checkpoint& c : *all) experiments.insert(c.experiment);
    prune(std::vector<std::string>(experiments.begin(), experiments.end()));
  };
  auto watcher = index::Watcher::Start(idx->get(), callbacks, index::Watcher::Settings{});
  if (!watcher.ok()) {
    core::Log(LogLevel::kWarning, "no watcher (%s): views follow the disk only on remount",
              watcher.status().message().c_str());
  } else {
    watcher_ptr = watcher->get();
  }

  committer->Start();
  if (!opt.policy.empty()) {
    core::Log(LogLevel::kInfo, "retention policy: %s", opt.policy.ToString().c_str());
    auto all = (*idx)->List(opt.source);
    std::set<std::string> experiments;
    if (all.ok()) {
      for (const core::Checkpoint& c : *all) experiments.insert(c.experiment);
    }
    prune(std::vector<std::string>(experiments.begin(), experiments.end()));
  }

  // systemd (Type=notify): the mount answers and the policy has run once.
  sd_notifyf(0, "READY=1\nSTATUS=serving %s at %s\nMAINPID=%d", opt.source.c_str(),
             opt.mountpoint.c_str(), static_cast<int>(::getpid()));
  struct fuse_loop_config* loop = fuse_loop_cfg_create();
  fuse_loop_cfg_set_clone_fd(loop, 0);
  fuse_loop_cfg_set_idle_threads(loop, 8);
  fuse_loop_cfg_set_max_threads(loop, 16);
  rc = fuse_session_loop_mt(se, loop);
  fuse_loop_cfg_destroy(loop);
  sd_notify(0, "STOPPING=1");

  committer.reset();  // what is still staged stays staged, reported at the next start
  later.Stop();
  watcher_ptr = nullptr;
  if (watcher.ok()) watcher->reset();
  fuse_session_unmount(se);
  fuse_remove_signal_handlers(se);
  fuse_session_destroy(se);
  core::Log(LogLevel::kInfo, "unmounted %s", opt.mountpoint.c_str());
  // SIGTERM (systemctl stop), SIGINT and SIGHUP end the loop with the signal
  // number: a clean stop, like an unmount.
  return rc == 0 || rc == SIGTERM || rc == SIGINT || rc == SIGHUP ? 0 : 1;
}

}  // namespace ckptfs::fs
