// `ckptfs mount`: builds the index, mounts, daemonises once the mount is
// ready, then serves until unmounted, keeping views in line with the disk.
#define FUSE_USE_VERSION 314
#include <fuse_lowlevel.h>
#include <pthread.h>
#include <sys/eventfd.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <sys/wait.h>
#include <systemd/sd-daemon.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <functional>
#include <iterator>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include "core/averaging.h"
#include "core/cancel.h"
#include "core/log.h"
#include "core/retention.h"
#include "fs/committer.h"
#include "fs/daemon_threads.h"
#include "fs/fuse_ops.h"
#include "fs/mount_status.h"
#include "fs/node_table.h"
#include "fs/options.h"
#include "fs/source_fs.h"
#include "index/lease.h"
#include "index/pruner.h"
#include "index/resolver.h"
#include "index/watcher.h"

namespace ckptfs::fs {

using core::LogLevel;

namespace {

// On a shared source, staging changed within this many seconds (or
// --commit-wait, if longer) is taken for another node's write in progress.
constexpr int64_t kSharedStagingQuietSeconds = 120;

// How often a standby daemon tries the pruning lease when it does not poll.
constexpr std::chrono::milliseconds kLeaseRetry{2000};

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
    core::Log(LogLevel::kError, "scan of %s: %s", opt.source.c_str(),
              scan.status().message().c_str());
    return 1;
  }
  core::Log(LogLevel::kInfo,
            "indexed %s: %d checkpoint(s) read, %d directories in %.0f ms (index %s)",
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
  averages.set_source(&*source);
  // A source shared with other nodes: their changes reach inotify never, so
  // the watcher polls; an object store's rename copies, so new/ is refused.
  const SourceFilesystem source_fs = DescribeSourceFilesystem(opt.source);
  double poll_seconds = opt.poll > 0 ? opt.poll : 0;
  if (opt.poll < 0 && source_fs.shared) {
    poll_seconds = kAutoPollSeconds;
    core::Log(LogLevel::kInfo,
              "%s is on %s, a shared filesystem: polling for changes every %.1f s instead of "
              "inotify (--poll 0 turns this off)",
              opt.source.c_str(), source_fs.name.c_str(), poll_seconds);
  } else if (poll_seconds > 0) {
    core::Log(LogLevel::kInfo, "polling %s for changes every %.1f s (--poll)", opt.source.c_str(),
              poll_seconds);
  }
  // One pruner per source: only the holder of the lease prunes (index/lease.h).
  std::optional<index::Lease> lease;
  if (!opt.policy.empty()) {
    auto opened = index::Lease::Open(*source);
    if (!opened.ok()) {
      core::Log(LogLevel::kError, "retention needs the pruning lease, refused: %s",
                opened.status().message().c_str());
      return 1;
    }
    lease.emplace(std::move(*opened));
  }
  // What a killed daemon left half-written in new/ is never committed.
  {
    auto all = (*idx)->List(opt.source);
    std::set<std::string> experiments = {opt.source};
    if (all.ok()) {
      for (const core::Checkpoint& c : *all) experiments.insert(c.experiment);
    }
    // On a shared source, staging that changed lately may be another node's
    // write in progress, not a killed run's: it is left for a later start.
    const auto live = std::chrono::seconds(
        std::max<int64_t>(kSharedStagingQuietSeconds, static_cast<int64_t>(opt.commit_wait)));
    const bool shared = source_fs.shared || poll_seconds > 0;
    auto in_use = [&](const std::string& e, const char* name) {
      if (!shared || !OwnDirActive(*source, e, name, live)) return false;
      core::Log(LogLevel::kInfo,
                "%s/%s: changed in the last %lld s, perhaps by another node writing or "
                "deleting through new/; left in place (cleaned up at a later start if it stays "
                "unchanged)",
                e.c_str(), name, static_cast<long long>(live.count()));
      return true;
    };
    for (const std::string& e : experiments) {
      if (!in_use(e, core::kStagingDir)) Committer::RecoverStaging(*source, e);
      if (in_use(e, core::kTrashDir)) continue;
      if (core::Status s = core::RemoveTrash(*source, e); !s.ok()) {
        core::Log(LogLevel::kError, "trash cleanup skipped: %s", s.message().c_str());
      }
    }
  }
  std::unique_ptr<Ticker> lease_retry;  // stopped before what it uses
  // Notifications need the session, made below; threads that send them
  // start only once it exists.
  std::unique_ptr<Notifier> notifier;
  std::unique_ptr<Committer> committer;
  LaterNotifier later;
  NodeTableOptions table_options;
  table_options.links = opt.links;
  table_options.direct_new = opt.direct_new;
  // allow_other: other users reach the mount, so views answer per caller.
  for (const std::string& o : opt.fuse_options) {
    size_t pos = 0;
    while (pos <= o.size()) {
      size_t end = o.find(',', pos);
      if (end == std::string::npos) end = o.size();
      if (o.compare(pos, end - pos, "allow_other") == 0) table_options.multi_user = true;
      pos = end + 1;
    }
  }
  table_options.reinvalidate = [&later](Invalidation inv) { later.Push(std::move(inv)); };
  table_options.status = &status;
  table_options.averages = &averages;
  table_options.is_watched = [&watcher_ptr](const std::string& dir) {
    index::Watcher* w = watcher_ptr.load();
    return w != nullptr && w->IsWatched(dir);
  };
  Committer::Settings commit_settings;
  commit_settings.quiet = std::chrono::milliseconds(static_cast<int64_t>(opt.commit_quiet * 1000));
  commit_settings.wait =
      std::max(commit_settings.quiet,
               std::chrono::milliseconds(static_cast<int64_t>(opt.commit_wait * 1000)));
  commit_settings.explicit_only = opt.explicit_commit;
  commit_settings.direct = opt.direct_new;
  auto send = [&notifier](const std::vector<Invalidation>& invals) {
    if (notifier != nullptr) notifier->Send(invals);
  };
  std::mutex prune_mu;  // one retention run at a time
  NodeTable* table_ptr = nullptr;
  // said_standby: this daemon said it stands by and has not taken over since.
  std::atomic<bool> said_standby{false}, said_lease_error{false};
  // Whether this daemon holds the lease now, taking it if it is free.
  auto holds_lease = [&]() {
    auto got = lease->TryAcquire();
    if (!got.ok()) {
      if (!said_lease_error.exchange(true)) {
        core::Log(LogLevel::kError, "retention paused: %s", got.status().message().c_str());
      }
      return false;
    }
    if (*got && said_standby.exchange(false)) {
      core::Log(LogLevel::kInfo, "retention: took over the pruning lease %s; pruning here",
                lease->path().c_str());
    }
    if (!*got && !said_standby.exchange(true)) {
      const std::string holder = lease->Holder();
      core::Log(LogLevel::kInfo,
                "retention: standby; another ckptfs daemon%s%s holds the pruning lease %s and "
                "prunes; this one serves and takes over if that one stops",
                holder.empty() ? "" : " on ", holder.c_str(), lease->path().c_str());
    }
    return *got;
  };
  auto prune = [&](const std::vector<std::string>& experiments) {
    if (opt.policy.empty() || experiments.empty()) return;
    std::lock_guard<std::mutex> lock(prune_mu);
    if (!holds_lease()) return;
    auto report = index::Prune(idx->get(), *source, opt.policy, experiments, false,
                               [&](const std::string& path) { return table_ptr->IsOpen(path); });
    if (!report.ok()) {
      core::Log(LogLevel::kError, "retention: %s", report.status().message().c_str());
      return;
    }
    for (const index::PruneEntry& e : report->entries) {
      if (e.deleted)
        status.Record(EventKind::kDeletion, e.checkpoint.path + " (" + e.decision.why + ")");
    }
    if (report->deleted > 0) {
      send(table_ptr->ViewsChanged(experiments));
      for (const index::PruneEntry& e : report->entries) {
        if (e.deleted) send(table_ptr->PathChanged(e.checkpoint.experiment, e.checkpoint.name));
      }
    }
  };
  committer = std::make_unique<Committer>(
      &*source, commit_settings, [&](const std::string& experiment, const std::string& name) {
        // Runs on the committer's thread: its wall.
        core::CatchAndLog("after commit", [&] {
          send(table_ptr->PathChanged(index::StagingDir(experiment), name));
          auto stats = (*idx)->ScanChanges({{experiment, name}});
          if (!stats.ok()) {
            core::Log(LogLevel::kError, "indexing %s/%s: %s", experiment.c_str(), name.c_str(),
                      stats.status().message().c_str());
            return;
          }
          status.Record(EventKind::kCommit, experiment + "/" + name);
          send(table_ptr->ViewsChanged({experiment}));
          send(table_ptr->PathChanged(experiment, name));
          prune({experiment});
        });
      });
  committer->set_previous_files(
      [&](const std::string& experiment, const std::string& name,
          const std::string& meta_file) -> std::optional<std::vector<std::string>> {
        auto all = (*idx)->List(experiment);  // newest first
        if (!all.ok()) return std::nullopt;
        for (const core::Checkpoint& c : *all) {
          if (c.experiment != experiment || c.name == name || !c.valid) continue;
          if (core::MetaFileName(c.layout) != meta_file) continue;
          std::vector<std::string> files;
          for (const core::CheckpointFile& f : c.files) files.push_back(f.name);
          return files;
        }
        return std::nullopt;
      });
  committer->set_on_deleted([&](const std::string& experiment, const std::string& name) {
    core::CatchAndLog("after deletion through new/", [&] {
      (void)(*idx)->ScanChanges({{experiment, name}});
      status.Record(EventKind::kDeletion, experiment + "/" + name + " (through new/)");
      send(table_ptr->ViewsChanged({experiment}));
      send(table_ptr->PathChanged(experiment, name));
    });
  });
  if (source_fs.atomic_rename) {
    table_options.committer = committer.get();
  } else {
    core::Log(LogLevel::kWarning,
              "%s is on %s, whose rename copies (not atomic): new/ is read-only here, since a "
              "commit could be seen half-done; write checkpoints elsewhere",
              opt.source.c_str(), source_fs.name.c_str());
  }
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
  fuse_opt_free_args(&args);
  if (se == nullptr) {
    core::Log(LogLevel::kError, "cannot start a FUSE session (options: %s)", mount_opts.c_str());
    return 1;
  }
  // An average in progress stops once the session ends (SIGTERM, an aborted
  // connection): the loop waits for every request before it returns. Reset
  // on return, when no request runs any more.
  core::SetCancelCheck(
      [](void* s) { return fuse_session_exited(static_cast<fuse_session*>(s)) != 0; }, se);
  struct CancelCheckReset {
    ~CancelCheckReset() { core::SetCancelCheck(nullptr, nullptr); }
  } cancel_check_reset;
  StopSignals signals;
  if (!signals.Install()) {
    core::Log(LogLevel::kError, "cannot install signal handlers: %s", std::strerror(errno));
    fuse_session_destroy(se);
    return 1;
  }
  DetachDeadMount(opt.mountpoint);
  if (fuse_session_mount(se, opt.mountpoint.c_str()) != 0) {
    core::Log(LogLevel::kError,
              "cannot mount %s at %s (is /dev/fuse available, fusermount3 "
              "installed, the mountpoint empty and not mounted?)",
              opt.source.c_str(), opt.mountpoint.c_str());
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

  // Threads start after daemonising (a thread started before the fork would
  // not survive it), each with the stop signals blocked.
  core::Result<std::unique_ptr<index::Watcher>> watcher = core::Status::Internal("not started");
  // The first average must not pay for loading the libtorch plugin (about
  // half a second) inside a lookup: it is loaded now, beside the loop.
  std::thread preload;
  WithStopSignalsBlocked([&] {
    try {
      preload = std::thread([] {
        core::CatchAndLog("loading the averaging plugin", [] {
          if (core::Status s = core::PreloadAveraging(); !s.ok()) {
            core::Log(LogLevel::kWarning, "%s", s.message().c_str());
          }
        });
      });
    } catch (const std::system_error&) {
      // No thread: the plugin is loaded by the first average instead.
    }
  });
  const core::Status started = core::CatchAll("start", [&] {
    notifier = std::make_unique<Notifier>(se);
    later.Start(notifier.get());
    index::Watcher::Callbacks callbacks;
    callbacks.on_path_changed = [&](const std::string& dir, const std::string& name) {
      send(table.PathChanged(dir, name));
    };
    callbacks.on_scanned = [&](const index::ScanStats& stats) {
      send(table.ViewsChanged(stats.changed_experiments));
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
    index::Watcher::Settings watch_settings;
    watch_settings.poll = std::chrono::milliseconds(static_cast<int64_t>(poll_seconds * 1000));
    WithStopSignalsBlocked([&] {
      watcher = index::Watcher::Start(idx->get(), callbacks, watch_settings);
      committer->Start();
    });
    if (!watcher.ok()) {
      core::Log(LogLevel::kWarning, "no watcher (%s): views follow the disk only on remount",
                watcher.status().message().c_str());
    } else {
      watcher_ptr = watcher->get();
    }
    // A stop signal (one that came already, or later) closes the
    // notifications while workers still answer, then ends the loop. Work
    // that keeps a worker busy for long is cancelled here too.
    signals.Start(se, [&] { notifier->Close(); });
    if (!opt.policy.empty()) {
      core::Log(LogLevel::kInfo, "retention policy: %s", opt.policy.ToString().c_str());
      auto all = (*idx)->List(opt.source);
      std::set<std::string> experiments;
      if (all.ok()) {
        for (const core::Checkpoint& c : *all) experiments.insert(c.experiment);
      }
      if (!holds_lease()) {
        // A standby tries again every poll period (or kLeaseRetry): the
        // kernel, or the NFS lock manager, frees the lease when its holder
        // dies or unmounts; the new holder then prunes everything once.
        const auto period = poll_seconds > 0 ? watch_settings.poll : kLeaseRetry;
        lease_retry = std::make_unique<Ticker>(period, [&] {
          if (lease->held()) return;
          auto now_all = (*idx)->List(opt.source);
          std::set<std::string> exps;
          if (now_all.ok()) {
            for (const core::Checkpoint& c : *now_all) exps.insert(c.experiment);
          }
          if (exps.empty()) {
            (void)holds_lease();  // nothing to prune yet, but the lease is taken
            return;
          }
          prune(std::vector<std::string>(exps.begin(), exps.end()));
        });
      }
      prune(std::vector<std::string>(experiments.begin(), experiments.end()));
    }
  });

  int rc = 1;
  if (started.ok()) {
    // systemd (Type=notify): the mount answers and the policy has run once.
    sd_notifyf(0, "READY=1\nSTATUS=serving %s at %s\nMAINPID=%d", opt.source.c_str(),
               opt.mountpoint.c_str(), static_cast<int>(::getpid()));
    struct fuse_loop_config* loop = fuse_loop_cfg_create();
    fuse_loop_cfg_set_clone_fd(loop, 0);
    fuse_loop_cfg_set_idle_threads(loop, 8);
    fuse_loop_cfg_set_max_threads(loop, 16);
    signals.LoopEntered();
    rc = fuse_session_loop_mt(se, loop);
    fuse_loop_cfg_destroy(loop);
    sd_notify(0, "STOPPING=1");
  } else {
    core::Log(LogLevel::kError, "%s", started.message().c_str());
  }

  // No worker answers any more: first no notification may start (one could
  // wait forever for a reply), then each thread stops within its current
  // step.
  signals.Finish();
  if (notifier != nullptr) notifier->Close();
  lease_retry.reset();
  // A clean stop commits what is complete (no writer is left); what was
  // really mid-write stays staged, moved aside at the next start.
  if (committer != nullptr) {
    core::CatchAndLog("commit at exit", [&] {
      const int n = committer->StopAndCommit();
      if (n > 0) core::Log(LogLevel::kInfo, "committed %d checkpoint(s) at exit", n);
    });
  }
  committer.reset();
  later.Stop();
  watcher_ptr = nullptr;
  if (watcher.ok()) watcher->reset();
  if (preload.joinable()) preload.join();
  fuse_session_unmount(se);
  fuse_session_destroy(se);
  // A forced unmount that found the mount busy aborts the connection, and
  // fuse_session_unmount skips an aborted one: detach what is left.
  DetachDeadMount(opt.mountpoint);
  core::Log(LogLevel::kInfo, "unmounted %s", opt.mountpoint.c_str());
  // A stop signal ends the loop as an unmount does: a clean stop.
  return started.ok() && rc == 0 ? 0 : 1;
}

}  // namespace ckptfs::fs
