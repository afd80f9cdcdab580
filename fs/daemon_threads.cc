// The daemon's threads and signals: see daemon_threads.h.
#define FUSE_USE_VERSION 314
#include "fs/daemon_threads.h"

#include <fuse_lowlevel.h>
#include <sys/eventfd.h>
#include <sys/mount.h>
#include <sys/vfs.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>

#include "core/log.h"

namespace ckptfs::fs {

using core::LogLevel;

void Notifier::Send(const std::vector<Invalidation>& invals) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (closed_) return;
    ++sending_;
  }
  for (const Invalidation& inv : invals) {
    int rc = inv.entry ? fuse_lowlevel_notify_inval_entry(se_, inv.parent, inv.name.c_str(),
                                                          inv.name.size())
                       : fuse_lowlevel_notify_inval_inode(se_, inv.ino, 0, 0);
    if (rc != 0 && rc != -ENOENT) {
      core::Log(LogLevel::kDebug, "invalidate %s: %s", inv.entry ? inv.name.c_str() : "inode",
                std::strerror(-rc));
    }
  }
  std::lock_guard<std::mutex> lock(mu_);
  if (--sending_ == 0) idle_.notify_all();
}

void Notifier::Close() {
  std::unique_lock<std::mutex> lock(mu_);
  closed_ = true;
  idle_.wait(lock, [this] { return sending_ == 0; });
}

void WithStopSignalsBlocked(const std::function<void()>& fn) {
  sigset_t block, old;
  sigemptyset(&block);
  for (int sig : {SIGTERM, SIGINT, SIGHUP}) sigaddset(&block, sig);
  pthread_sigmask(SIG_BLOCK, &block, &old);
  struct Restore {
    sigset_t old;
    ~Restore() { pthread_sigmask(SIG_SETMASK, &old, nullptr); }
  } restore{old};
  fn();
}

void LaterNotifier::Start(Notifier* notifier) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    notifier_ = notifier;
  }
  WithStopSignalsBlocked([this] {
    thread_ = std::thread([this] { core::CatchAndLog("notifier", [this] { Run(); }); });
  });
}

void LaterNotifier::Push(Invalidation inv) {
  std::lock_guard<std::mutex> lock(mu_);
  if (notifier_ == nullptr || stop_) return;
  queue_.push_back(std::move(inv));
  cv_.notify_one();
}

void LaterNotifier::Stop() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
    cv_.notify_one();
  }
  if (thread_.joinable()) thread_.join();
}

void LaterNotifier::Run() {
  std::unique_lock<std::mutex> lock(mu_);
  while (true) {
    cv_.wait(lock, [this] { return stop_ || !queue_.empty(); });
    if (stop_) return;
    std::vector<Invalidation> batch;
    batch.swap(queue_);
    Notifier* notifier = notifier_;
    lock.unlock();
    core::CatchAndLog("notifier", [&] { notifier->Send(batch); });
    lock.lock();
  }
}

namespace {

std::atomic<int> g_stop_signal{0};
std::atomic<int> g_stop_fd{-1};

void OnStopSignal(int sig) {
  const int saved_errno = errno;
  int none = 0;
  g_stop_signal.compare_exchange_strong(none, sig);
  const uint64_t one = 1;
  ssize_t ignored = ::write(g_stop_fd.load(), &one, sizeof(one));  // eventfd: async-signal-safe
  (void)ignored;
  errno = saved_errno;
}

}  // namespace

StopSignals::~StopSignals() {
  Finish();
  if (installed_) {
    for (size_t i = 0; i < std::size(kSignals); ++i) ::sigaction(kSignals[i], &old_[i], nullptr);
  }
  if (fd_ >= 0) {
    g_stop_fd = -1;
    ::close(fd_);
  }
}

bool StopSignals::Install() {
  fd_ = ::eventfd(0, EFD_CLOEXEC);
  if (fd_ < 0) return false;
  g_stop_signal = 0;
  g_stop_fd = fd_;
  for (size_t i = 0; i < std::size(kSignals); ++i) {
    struct sigaction sa {};
    sa.sa_handler = kSignals[i] == SIGPIPE ? SIG_IGN : OnStopSignal;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0;  // no SA_RESTART: the signal must interrupt sem_wait in the loop
    if (::sigaction(kSignals[i], &sa, &old_[i]) != 0) return false;
    installed_ = true;
  }
  return true;
}

void StopSignals::Start(struct fuse_session* se, std::function<void()> on_stop) {
  se_ = se;
  on_stop_ = std::move(on_stop);
  main_ = ::pthread_self();
  WithStopSignalsBlocked([this] {
    thread_ = std::thread([this] { core::CatchAndLog("stopper", [this] { Run(); }); });
  });
}

void StopSignals::LoopEntered() {
  std::lock_guard<std::mutex> lock(mu_);
  loop_entered_ = true;
}

void StopSignals::Finish() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    finished_ = true;
    cv_.notify_all();
  }
  if (fd_ >= 0) Wake();
  if (thread_.joinable()) thread_.join();
}

void StopSignals::Wake() {
  const uint64_t one = 1;
  ssize_t ignored = ::write(fd_, &one, sizeof(one));
  (void)ignored;
}

void StopSignals::Run() {
  for (;;) {
    uint64_t count = 0;
    if (::read(fd_, &count, sizeof(count)) < 0 && errno == EINTR) continue;
    std::unique_lock<std::mutex> lock(mu_);
    if (finished_) return;
    const int sig = g_stop_signal.load();
    if (sig == 0) continue;
    lock.unlock();
    core::Log(LogLevel::kInfo, "%s: stopping", ::strsignal(sig));
    core::CatchAndLog("stop", on_stop_);
    fuse_session_exit(se_);
    lock.lock();
    // The loop sees the exit only once its wait is interrupted; a signal
    // that lands between its check and its wait is lost, hence again
    // until it returns.
    while (!finished_) {
      if (loop_entered_) ::pthread_kill(main_, sig);
      cv_.wait_for(lock, std::chrono::milliseconds(100));
    }
    return;
  }
}

void DetachDeadMount(const std::string& mountpoint) {
  // statfs always reaches the daemon; stat may be answered from the cache.
  struct statfs st {};
  if (::statfs(mountpoint.c_str(), &st) == 0 || errno != ENOTCONN) return;
  core::Log(LogLevel::kWarning, "%s: a mount whose daemon died is still there; detaching it",
            mountpoint.c_str());
  if (::geteuid() == 0) {
    if (::umount2(mountpoint.c_str(), MNT_DETACH) != 0) {
      core::Log(LogLevel::kError, "%s: cannot detach: %s", mountpoint.c_str(),
                std::strerror(errno));
    }
    return;
  }
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::execlp("fusermount3", "fusermount3", "-u", "-z", mountpoint.c_str(),
             static_cast<char*>(nullptr));
    ::_exit(127);
  }
  int status = 0;
  if (pid < 0 || ::waitpid(pid, &status, 0) != pid || !WIFEXITED(status) ||
      WEXITSTATUS(status) != 0) {
    core::Log(LogLevel::kError, "%s: fusermount3 -u -z failed", mountpoint.c_str());
  }
}

Ticker::Ticker(std::chrono::milliseconds period, std::function<void()> fn)
    : period_(period), fn_(std::move(fn)) {
  WithStopSignalsBlocked([this] {
    thread_ = std::thread([this] { core::CatchAndLog("ticker", [this] { Run(); }); });
  });
}

Ticker::~Ticker() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void Ticker::Run() {
  std::unique_lock<std::mutex> lock(mu_);
  while (!cv_.wait_for(lock, period_, [this] { return stop_; })) {
    lock.unlock();
    core::CatchAndLog("ticker", fn_);
    lock.lock();
  }
}

}  // namespace ckptfs::fs
