#include "index/watcher.h"

#include <poll.h>
#include <sys/eventfd.h>
#include <sys/inotify.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <vector>

#include "core/log.h"

namespace ckptfs::index {

using core::LogLevel;
using core::Result;
using core::Status;
using Clock = std::chrono::steady_clock;

namespace {
constexpr uint32_t kMask = IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO | IN_CLOSE_WRITE |
                           IN_ATTRIB | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR;
}  // namespace

class Watcher::Impl {
 public:
  Impl(Index* index, Callbacks callbacks, Settings settings, int inotify_fd, int stop_fd)
      : index_(index),
        callbacks_(std::move(callbacks)),
        settings_(settings),
        inotify_fd_(inotify_fd),
        stop_fd_(stop_fd) {}

  ~Impl() {
    uint64_t one = 1;
    ssize_t ignored = ::write(stop_fd_, &one, sizeof(one));
    (void)ignored;
    if (thread_.joinable()) thread_.join();
    if (inotify_fd_ >= 0) ::close(inotify_fd_);
    ::close(stop_fd_);
  }

  void Begin() {
    if (polling()) {
      // The caller has just scanned; the first poll comes one period later.
      thread_ = std::thread([this] { core::CatchAndLog("watcher", [this] { Loop(); }); });
      return;
    }
    WatchAll();
    // Whatever changed between the caller's scan and these watches is found
    // by one full scan right away.
    overflowed_ = true;
    MarkPending();
    thread_ = std::thread([this] { core::CatchAndLog("watcher", [this] { Loop(); }); });
  }

  bool IsWatched(const std::string& dir) const {
    std::lock_guard<std::mutex> lock(mu_);
    return by_path_.count(dir) != 0;
  }

 private:
  // Adds a watch for every indexed directory not yet watched.
  void WatchAll() {
    Result<std::vector<std::string>> dirs = index_->Dirs();
    if (!dirs.ok()) {
      core::Log(LogLevel::kError, "watcher: %s", dirs.status().message().c_str());
      return;
    }
    Watch(*dirs);
  }

  // Adds watches for these directories; returns those newly watched: their
  // contents may have changed before the watch existed.
  std::vector<std::string> Watch(const std::vector<std::string>& dirs) {
    std::vector<std::string> added;
    if (polling()) return added;
    std::lock_guard<std::mutex> lock(mu_);
    for (const std::string& dir : dirs) {
      if (by_path_.count(dir) != 0) continue;
      int wd = ::inotify_add_watch(inotify_fd_, dir.c_str(), kMask);
      if (wd < 0) {
        if (errno == ENOSPC && !warned_limit_) {
          warned_limit_ = true;
          core::Log(LogLevel::kWarning,
                    "watcher: inotify watch limit reached at %zu directories; changes below %s "
                    "are seen by the periodic rescan only (raise fs.inotify.max_user_watches)",
                    by_path_.size(), dir.c_str());
        }
        continue;
      }
      by_wd_[wd] = dir;
      by_path_[dir] = wd;
      added.push_back(dir);
    }
    return added;
  }

  // A targeted scan of what events named, or a full one after an overflow
  // or when the periodic fallback is due.
  void Rescan(bool full) {
    std::vector<std::pair<std::string, std::string>> changes;
    changes.swap(changes_);
    if (overflowed_) full = true;
    overflowed_ = false;
    Result<ScanStats> stats = full ? index_->Scan() : index_->ScanChanges(changes);
    if (!stats.ok()) {
      core::Log(LogLevel::kError, "rescan of %s failed: %s", index_->source().c_str(),
                stats.status().message().c_str());
      return;
    }
    if (stats->checkpoints_loaded > 0 || stats->checkpoints_removed > 0) {
      core::Log(LogLevel::kInfo, "rescan: %d checkpoint(s) read, %d removed in %.1f ms",
                stats->checkpoints_loaded, stats->checkpoints_removed, stats->seconds * 1e3);
      if (callbacks_.on_scanned) callbacks_.on_scanned(*stats);
    }
    for (std::string& dir : Watch(stats->new_dirs)) {
      changes_.emplace_back(std::move(dir), "");  // look again inside new dirs
      MarkPending();
    }
  }

  void HandleEvents() {
    alignas(struct inotify_event) char buf[64 * 1024];
    for (;;) {
      ssize_t n = ::read(inotify_fd_, buf, sizeof(buf));
      if (n <= 0) return;  // EAGAIN: drained
      for (char* p = buf; p < buf + n;) {
        auto* ev = reinterpret_cast<struct inotify_event*>(p);
        p += sizeof(struct inotify_event) + ev->len;
        if (ev->mask & IN_Q_OVERFLOW) {
          core::Log(LogLevel::kWarning, "watcher: event queue overflowed; rescanning");
          overflowed_ = true;
          MarkPending();
          continue;
        }
        std::string dir;
        {
          std::lock_guard<std::mutex> lock(mu_);
          auto it = by_wd_.find(ev->wd);
          if (it == by_wd_.end()) continue;
          dir = it->second;
          if (ev->mask & IN_IGNORED) {
            by_path_.erase(dir);
            by_wd_.erase(it);
            continue;
          }
        }
        std::string name = ev->len > 0 ? std::string(ev->name) : std::string();
        if (callbacks_.on_path_changed) callbacks_.on_path_changed(dir, name);
        changes_.emplace_back(dir, std::move(name));
        MarkPending();
      }
    }
  }

  void MarkPending() {
    if (!pending_) deadline_ = Clock::now() + settings_.debounce;
    pending_ = true;
  }

  bool polling() const { return settings_.poll.count() > 0; }

  void Loop() {
    auto next_periodic = Clock::now() + settings_.periodic;
    next_poll_ = Clock::now() + settings_.poll;
    for (;;) {
      auto now = Clock::now();
      auto until = polling() ? next_poll_ : pending_ ? deadline_ : next_periodic;
      int timeout_ms = static_cast<int>(
          std::max<int64_t>(0, std::chrono::duration_cast<std::chrono::milliseconds>(until - now).count()));
      struct pollfd fds[2] = {{inotify_fd_, POLLIN, 0}, {stop_fd_, POLLIN, 0}};
      int rc = ::poll(fds, 2, timeout_ms);
      if (rc < 0 && errno != EINTR) {
        core::Log(LogLevel::kError, "watcher: poll: %s; views follow the disk only on remount",
                  std::strerror(errno));
        return;
      }
      if (fds[1].revents & POLLIN) return;
      // The wall: one step that throws is logged and the watcher goes on;
      // what it missed, the next periodic scan finds.
      const bool readable = rc > 0 && (fds[0].revents & POLLIN);
      core::CatchAndLog("watcher", [&] { Step(readable, &next_periodic); });
    }
  }

  void Step(bool readable, Clock::time_point* next_periodic) {
    if (polling()) {
      Poll(next_periodic);
      return;
    }
    if (readable) HandleEvents();
    const auto now = Clock::now();
    if (pending_ && now >= deadline_) {
      pending_ = false;
      Rescan(/*full=*/false);
    } else if (!pending_ && now >= *next_periodic) {
      *next_periodic = now + settings_.periodic;  // a scan that throws is not retried at once
      Rescan(/*full=*/true);
      if (callbacks_.on_periodic) callbacks_.on_periodic();
      *next_periodic = Clock::now() + settings_.periodic;
    }
  }

  // Poll mode: an incremental scan of the whole source every poll period
  // (it reads only what changed), and on_periodic at the periodic cadence.
  void Poll(Clock::time_point* next_periodic) {
    const auto now = Clock::now();
    if (now < next_poll_) return;
    next_poll_ = now + settings_.poll;  // a scan that throws is not retried at once
    Rescan(/*full=*/true);
    if (Clock::now() >= *next_periodic) {
      *next_periodic = Clock::now() + settings_.periodic;
      if (callbacks_.on_periodic) callbacks_.on_periodic();
    }
    // The period runs from the end of this scan: a scan slower than the
    // period never piles up.
    next_poll_ = Clock::now() + settings_.poll;
  }

  Index* index_;
  Callbacks callbacks_;
  Settings settings_;
  const int inotify_fd_;
  const int stop_fd_;
  std::thread thread_;
  // Only the watcher thread touches these.
  bool pending_ = false;
  bool overflowed_ = false;
  Clock::time_point deadline_;
  Clock::time_point next_poll_;
  std::vector<std::pair<std::string, std::string>> changes_;

  mutable std::mutex mu_;  // guards the maps and warned_limit_
  std::unordered_map<int, std::string> by_wd_;
  std::unordered_map<std::string, int> by_path_;
  bool warned_limit_ = false;
};

Result<std::unique_ptr<Watcher>> Watcher::Start(Index* index, Callbacks callbacks,
                                                Settings settings) {
  int ifd = -1;  // poll(2) skips a negative descriptor
  if (settings.poll.count() <= 0) {
    ifd = ::inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
    if (ifd < 0) return Status::FromErrno("inotify_init1", errno);
  }
  int sfd = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (sfd < 0) {
    int err = errno;
    if (ifd >= 0) ::close(ifd);
    return Status::FromErrno("eventfd", err);
  }
  auto impl = std::make_unique<Impl>(index, std::move(callbacks), settings, ifd, sfd);
  if (Status s = core::CatchAll("watcher: start", [&] { impl->Begin(); }); !s.ok()) return s;
  return std::unique_ptr<Watcher>(new Watcher(std::move(impl)));
}

Watcher::Watcher(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Watcher::~Watcher() = default;

bool Watcher::IsWatched(const std::string& dir) const { return impl_->IsWatched(dir); }

}  // namespace ckptfs::index
