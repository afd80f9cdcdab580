// Keeps an Index current while a mount runs: inotify watches on every
// directory the index knows, a debounced incremental scan after changes, and
// a periodic rescan as a fallback (queue overflow, watch limit reached).
// Poll mode (Settings::poll > 0, for sources on a shared filesystem, where
// inotify reports only this node's changes): no inotify at all, an
// incremental Index::Scan every poll period instead, with the same
// callbacks (on_path_changed is then never called; IsWatched is false).
//
// Ownership: a Watcher owns its inotify descriptor and one thread; the Index
// must outlive it. Callbacks run on the watcher thread, never concurrently
// with each other, and must not call back into the Watcher. What a scan or
// a callback throws is logged and the watcher goes on (core::CatchAndLog);
// the destructor returns as soon as the scan or callback under way, if any,
// returns.
#ifndef CKPTFS_INDEX_WATCHER_H_
#define CKPTFS_INDEX_WATCHER_H_

#include <chrono>
#include <functional>
#include <memory>
#include <string>

#include "core/status.h"
#include "index/index.h"

namespace ckptfs::index {

class Watcher {
 public:
  struct Callbacks {
    // An entry `name` of watched directory `dir` was created, removed,
    // renamed, written or changed attributes (name empty: dir itself).
    std::function<void(const std::string& dir, const std::string& name)> on_path_changed;
    // A scan changed the index; stats.changed_experiments says where.
    std::function<void(const ScanStats& stats)> on_scanned;
    // After each periodic full scan, changed or not.
    std::function<void()> on_periodic;
  };

  struct Settings {
    std::chrono::milliseconds debounce{50};
    std::chrono::milliseconds periodic{30000};
    // > 0: poll mode, a scan every period; on_periodic still runs every
    // `periodic` (after that period's scan).
    std::chrono::milliseconds poll{0};
  };

  static core::Result<std::unique_ptr<Watcher>> Start(Index* index, Callbacks callbacks,
                                                      Settings settings);
  ~Watcher();  // stops the thread and closes the descriptor

  // Whether `dir` is watched now (its entries' changes are reported).
  bool IsWatched(const std::string& dir) const;

  class Impl;

 private:
  explicit Watcher(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace ckptfs::index

#endif  // CKPTFS_INDEX_WATCHER_H_
