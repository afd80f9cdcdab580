// The daemon's threads and signals (`ckptfs mount`, fs/daemon.cc): the
// kernel notifications it sends, the clean stop on SIGTERM/SIGINT/SIGHUP, a
// periodic ticker, and the detaching of a mount whose daemon died. No FUSE
// header here: the session is an opaque struct.
#ifndef CKPTFS_FS_DAEMON_THREADS_H_
#define CKPTFS_FS_DAEMON_THREADS_H_

#include <pthread.h>

#include <chrono>
#include <condition_variable>
#include <csignal>
#include <functional>
#include <iterator>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "fs/node_table.h"

struct fuse_session;

namespace ckptfs::fs {

// Sends the kernel what NodeTable says it must forget. Called from the
// daemon's own threads, never inside a request handler (libfuse's rule for
// notifications). A notification can wait in the kernel for a directory
// lock that a pending request holds, which only a worker's reply releases:
// so the gate closes while workers still answer. Close() waits for the
// notifications under way, and none starts after it. Thread-safe.
class Notifier {
 public:
  explicit Notifier(struct fuse_session* se) : se_(se) {}
  Notifier(const Notifier&) = delete;
  Notifier& operator=(const Notifier&) = delete;

  void Send(const std::vector<Invalidation>& invals);
  void Close();

 private:
  struct fuse_session* const se_;
  std::mutex mu_;  // guards sending_, closed_
  std::condition_variable idle_;
  int sending_ = 0;
  bool closed_ = false;
};

// Runs fn() with the stop signals blocked, so that the threads it starts
// never take them: they must reach the main thread, whose wait in
// fuse_session_loop_mt only a signal interrupts (libfuse blocks them in its
// workers for the same reason).
void WithStopSignalsBlocked(const std::function<void()>& fn);

// Invalidations that a request handler asks for go out from this thread:
// libfuse forbids notifying from inside a handler.
class LaterNotifier {
 public:
  LaterNotifier() = default;
  LaterNotifier(const LaterNotifier&) = delete;
  LaterNotifier& operator=(const LaterNotifier&) = delete;
  ~LaterNotifier() { Stop(); }

  // After daemonising: a thread started before the fork would not survive it.
  void Start(Notifier* notifier);
  void Push(Invalidation inv);
  // Before the session is destroyed; returns once the thread has.
  void Stop();

 private:
  void Run();

  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<Invalidation> queue_;
  Notifier* notifier_ = nullptr;
  bool stop_ = false;
  std::thread thread_;
};

// SIGTERM (systemctl stop), SIGINT and SIGHUP stop the mount cleanly, even
// while workers are busy. The handler only records the signal and wakes the
// stopper thread; that thread runs on_stop (while workers still answer),
// ends the session, and interrupts the main thread's wait in
// fuse_session_loop_mt until the loop has returned. SIGPIPE is ignored.
// One at a time per process.
class StopSignals {
 public:
  static constexpr int kSignals[] = {SIGTERM, SIGINT, SIGHUP, SIGPIPE};

  StopSignals() = default;
  StopSignals(const StopSignals&) = delete;
  StopSignals& operator=(const StopSignals&) = delete;
  ~StopSignals();

  bool Install();
  // From the main thread, after daemonising. A signal that came earlier is
  // acted on now.
  void Start(struct fuse_session* se, std::function<void()> on_stop);
  // The main thread is about to enter the session loop.
  void LoopEntered();
  // The session loop returned: the stopper thread ends.
  void Finish();

 private:
  void Wake();
  void Run();

  int fd_ = -1;
  bool installed_ = false;
  struct sigaction old_[std::size(kSignals)]{};
  struct fuse_session* se_ = nullptr;
  std::function<void()> on_stop_;
  pthread_t main_{};
  std::thread thread_;
  std::mutex mu_;  // guards loop_entered_, finished_
  std::condition_variable cv_;
  bool loop_entered_ = false;
  bool finished_ = false;
};

// A daemon that died (SIGKILL, OOM) leaves its mount behind, answering
// ENOTCONN; a restart (systemd's Restart=on-failure) must be able to mount
// again, so such a mount is detached first. Anything else is left alone.
void DetachDeadMount(const std::string& mountpoint);

// Runs fn every period on its own thread (stop signals blocked) until
// destroyed; the destructor returns once the call under way, if any, has.
class Ticker {
 public:
  Ticker(std::chrono::milliseconds period, std::function<void()> fn);
  Ticker(const Ticker&) = delete;
  Ticker& operator=(const Ticker&) = delete;
  ~Ticker();

 private:
  void Run();

  const std::chrono::milliseconds period_;
  std::function<void()> fn_;
  std::mutex mu_;  // guards stop_
  std::condition_variable cv_;
  bool stop_ = false;
  std::thread thread_;
};

}  // namespace ckptfs::fs

#endif  // CKPTFS_FS_DAEMON_THREADS_H_
