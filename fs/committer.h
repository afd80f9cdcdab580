// Commits checkpoints written through new/ (DESIGN.md §4).
//
// A checkpoint written to new/NAME lands in EXPERIMENT/.ckptfs-staging/NAME
// (same filesystem, hidden from the index and the mount). It is committed
// once complete: explicitly, when the writer creates new/NAME/.commit (or
// new/NAME.commit for a single file); or, unless explicit-only, when no file
// of it is open for writing and it has been quiet for the quiet period.
// Before committing it must be recognisable as a checkpoint (its layout's
// meta file, or a checkpoint file name), hold no symbolic links or special
// files, and every tensor file must be complete; otherwise it waits in
// staging and the reason is logged once. A commit fsyncs every file and
// directory, then renames NAME into the experiment (one rename: atomic) and
// fsyncs the experiment directory; on_committed then runs (index, retention).
// The rename never replaces (RENAME_NOREPLACE): a name already taken in the
// experiment, even one written there directly a moment before the commit,
// is refused with a warning naming both paths, and the entry stays staged,
// tried again after each quiet period (it commits once the name is free).
//
// Security (DESIGN.md §6): the staging and abandoned directories are opened
// only with core::OpenOwnDir (a symbolic link, a file, or a directory that
// is not the daemon's own, not private, is refused: that experiment's new/
// is skipped with an error logged once naming the path), and every file
// below them is reached through directory descriptors beneath SOURCE, never
// by a path string.
//
// Thread-safe: the FUSE threads report activity; one internal thread commits.
// on_committed runs on that thread. Lock: mu_ only, never held while
// committing or calling back.
#ifndef CKPTFS_FS_COMMITTER_H_
#define CKPTFS_FS_COMMITTER_H_

#include <chrono>
#include <condition_variable>
#include <functional>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "core/beneath.h"
#include "core/status.h"

namespace ckptfs::fs {

inline constexpr char kCommitMarker[] = ".commit";

class Committer {
 public:
  struct Settings {
    std::chrono::milliseconds quiet{1000};
    bool explicit_only = false;
    // --direct-new: writers write the staging area directly (new/NAME is a
    // symbolic link to it), so quiet also means an unchanged tree (names,
    // sizes, mtimes) and no descriptor open for writing in /proc.
    bool direct = false;
  };
  using OnCommitted = std::function<void(const std::string& experiment, const std::string& name)>;

  // source: SOURCE, opened once by the caller; it must outlive the Committer.
  Committer(const core::Beneath* source, Settings settings, OnCommitted on_committed);
  ~Committer();  // stops the thread; what is staged stays staged

  void Start();

  // Activity on a real path inside a staging directory.
  void Touched(const std::string& path);
  void OpenedForWrite(const std::string& path);
  void ClosedForWrite(const std::string& path);

  // Commits every staged checkpoint that is ready now; returns how many.
  int CommitReady();

  // SOURCE, as given to the constructor.
  const core::Beneath& source() const { return *source_; }

  // experiment's staging directory, opened with core::OpenOwnDir (made when
  // create). A refusal is logged once per message, at error level.
  core::Result<core::ScopedFd> OpenStaging(const std::string& experiment, bool create);

  // On start: moves what an earlier run left in EXPERIMENT/.ckptfs-staging to
  // EXPERIMENT/.ckptfs-abandoned/ (never committing it: its writer is gone)
  // and logs each entry. Both directories must pass core::OpenOwnDir;
  // otherwise nothing is moved and the refusal is logged. Returns the
  // entries moved.
  static std::vector<std::string> RecoverStaging(const core::Beneath& source,
                                                 const std::string& experiment);

  // Whether the entry `name` of the staging directory staging_fd (whose path
  // is staging, for messages) is a complete checkpoint; the reason if not.
  static core::Status CheckReady(int staging_fd, const std::string& staging,
                                 const std::string& name);

 private:
  struct Staged {
    int writers = 0;
    std::chrono::steady_clock::time_point last;
    std::string reported;      // the last reason logged for not committing
    uint64_t fingerprint = 0;  // --direct-new: the tree at the last look
    bool writer_seen = false;  // --direct-new: a writer was open at the last look
  };
  static bool Split(const std::string& path, std::string* experiment, std::string* name);
  core::Status Commit(const std::string& experiment, const std::string& name);
  void Loop();

  const core::Beneath* source_;
  const Settings settings_;
  const OnCommitted on_committed_;
  std::mutex mu_;                   // guards staged_, stop_, refusals_
  std::set<std::string> refusals_;  // staging refusals already logged
  std::condition_variable wake_;
  std::map<std::pair<std::string, std::string>, Staged> staged_;  // (experiment, name)
  bool stop_ = false;
  std::thread thread_;
};

}  // namespace ckptfs::fs

#endif  // CKPTFS_FS_COMMITTER_H_
