// Commits checkpoints written through new/ (DESIGN.md §4).
//
// A checkpoint written to new/NAME lands in EXPERIMENT/.ckptfs-staging/NAME
// (same filesystem, hidden from the index and the mount). It is committed
// once complete: explicitly, when the writer creates new/NAME/.commit (or
// new/NAME.commit for a single file); or, unless explicit-only, when no file
// of it is open for writing and it has been quiet for the quiet period.
// Before committing, a directory must be recognisable as a checkpoint (its
// layout's meta file; a file of any name qualifies), hold no symbolic links or special
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
// new/ is the experiment, writable (DESIGN.md §6). Besides new checkpoints:
// - A write into a committed checkpoint makes a new version of it in staging
//   (BeginVersion: its directories recreated, its files hard links to the
//   committed ones; a writer breaks the link of each file before writing it,
//   BreakLink). Readers keep the committed version whole; the commit swaps
//   the two with one renameat2(RENAME_EXCHANGE) (only if the experiment's
//   entry is still the version it started from), then trashes the old one.
// - Deleting a committed checkpoint through new/ (DeleteThroughNew) moves
//   it to the trash in one rename; the rest of an rmtree then empties that
//   trash copy, which new/NAME resolves to (Deleting) until its rmdir.
// - Completeness: an explicit marker; or quiet for `quiet` with no writer
//   and every top-level file that the experiment's previous checkpoint of
//   the same layout holds (previous_files); or quiet for `wait` (a slow
//   save hook between two files waits that long before a partial commit).
// - StopAndCommit (clean unmount, SIGTERM) commits what is complete by
//   that rule, quiet or not; the rest stays for the next start.
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
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "core/beneath.h"
#include "core/status.h"

namespace ckptfs::fs {

using Clock = std::chrono::steady_clock;

inline constexpr char kCommitMarker[] = ".commit";

class Committer {
 public:
  struct Settings {
    std::chrono::milliseconds quiet{300};
    // Quiet period for a checkpoint that lacks a file its predecessor has.
    std::chrono::milliseconds wait{30000};
    bool explicit_only = false;
    // --direct-new: writers write the staging area directly (new/NAME is a
    // symbolic link to it), so quiet also means an unchanged tree (names,
    // sizes, mtimes) and no descriptor open for writing in /proc.
    bool direct = false;
  };
  using OnCommitted = std::function<void(const std::string& experiment, const std::string& name)>;
  // The top-level file names of the newest committed checkpoint of
  // experiment with this meta file ("" for single files) other than name;
  // nullopt when there is none.
  using PreviousFiles = std::function<std::optional<std::vector<std::string>>(
      const std::string& experiment, const std::string& name, const std::string& meta_file)>;

  // source: SOURCE, opened once by the caller; it must outlive the Committer.
  Committer(const core::Beneath* source, Settings settings, OnCommitted on_committed);
  ~Committer();  // stops the thread; what is staged stays staged

  void Start();
  // Set before Start: completeness (above), and what runs after a deletion
  // through new/ (on the calling FUSE thread).
  void set_previous_files(PreviousFiles f) { previous_files_ = std::move(f); }
  void set_on_deleted(OnCommitted f) { on_deleted_ = std::move(f); }

  // Stops the thread, then commits every staged checkpoint that no one has
  // open for writing and that is complete (marker, or every file of its
  // predecessor), however recently written; finishes deletions in flight.
  // Returns how many were committed.
  int StopAndCommit();

  // A new version of the committed entry `name` of experiment, staged (see
  // above), its directories with the committed ones' owners and modes;
  // nothing when one is staged already. A single file is not linked: the
  // writer's open gets a copy of the committed file (empty when
  // truncate_file) to write.
  core::Status BeginVersion(const std::string& experiment, const std::string& name,
                            bool truncate_file = false);
  // The staged file at path (under a staging directory) made a file of its
  // own when it is still a link to a committed version's file: the same
  // mode and owner, its data copied unless truncate.
  core::Status BreakLink(const std::string& path, bool truncate);
  // Deletes experiment/name (a committed entry) for a writer of new/: pinned
  // (a .keep inside) is kPermission EPERM; otherwise one rename to the
  // trash. A file is then removed; a directory stays there for the rest of
  // the rmtree (Deleting) and is removed at its rmdir or after a minute.
  core::Status DeleteThroughNew(const std::string& experiment, const std::string& name,
                                uid_t by);
  // The trash copy new/name of experiment stands for while being deleted.
  std::optional<std::string> Deleting(const std::string& experiment, const std::string& name);
  // The rmdir of that copy happened: forget it.
  void DeleteFinished(const std::string& experiment, const std::string& name);

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
    // A new version of a committed entry: the inode it started from, and
    // its ctime (an inode number can be reused by an entry made meanwhile).
    bool replaces = false;
    dev_t old_dev = 0;
    ino_t old_ino = 0;
    struct timespec old_ctime {};
  };
  struct Deletion {
    std::string trash;  // absolute path of the trash copy
    Clock::time_point since;
  };
  static bool Split(const std::string& path, std::string* experiment, std::string* name);
  core::Status Commit(const std::string& experiment, const std::string& name, const Staged& st);
  // Whether the staged entry holds every top-level file of its predecessor
  // (true when it has none, or for single files).
  bool HoldsPredecessorFiles(int staging_fd, const std::string& experiment,
                             const std::string& name);
  // Removes trash copies whose rmtree never finished (older than a minute,
  // or all when everything).
  void ExpireDeletions(bool everything);
  int CommitCandidates(bool at_exit);
  void Loop();

  const core::Beneath* source_;
  const Settings settings_;
  const OnCommitted on_committed_;
  PreviousFiles previous_files_;
  OnCommitted on_deleted_;
  std::mutex version_mu_;           // one BeginVersion at a time
  std::mutex mu_;                   // guards staged_, deleting_, stop_, refusals_
  std::set<std::string> refusals_;  // staging refusals already logged
  std::condition_variable wake_;
  std::map<std::pair<std::string, std::string>, Staged> staged_;  // (experiment, name)
  std::map<std::pair<std::string, std::string>, Deletion> deleting_;
  bool stop_ = false;
  std::thread thread_;
};

}  // namespace ckptfs::fs

#endif  // CKPTFS_FS_COMMITTER_H_
