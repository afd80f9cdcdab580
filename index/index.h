// The SQLite index of a source tree: every checkpoint's meta, validity and
// files, kept as a cache of what is on disk (deleting it loses nothing).
//
// Ownership: an Index owns two connections to its database: one for scans
// (the only writer) and one for queries, so that lookups are answered from
// the last committed state while a scan runs (WAL). Thread-safety: every
// public method may be called from any thread. Lock order: scan_mu_ before
// mu_ (never the reverse); nothing is called back while either is held.
// Errors: kCorrupt for database trouble, kIoError for the disk, kNotFound
// when a query matches nothing. Meta keys, values and path segments reach
// SQL only as bound parameters.
#ifndef CKPTFS_INDEX_INDEX_H_
#define CKPTFS_INDEX_INDEX_H_

#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "core/checkpoint.h"
#include "core/query_path.h"
#include "core/status.h"

namespace ckptfs::index {

class Db;

struct ScanStats {
  int dirs_visited = 0;        // stat'ed
  int dirs_read = 0;           // listed because new or changed
  int checkpoints_loaded = 0;  // (re)parsed
  int checkpoints_removed = 0;
  double seconds = 0;
  // Experiments whose checkpoint set or meta changed during this scan.
  std::vector<std::string> changed_experiments;
  // Directories indexed for the first time (a watcher starts watching them).
  std::vector<std::string> new_dirs;
};

// What the index holds, for status reports.
struct IndexCounts {
  int64_t checkpoints = 0;
  int64_t invalid = 0;
  int64_t experiments = 0;
  int64_t files = 0;
  int64_t bytes = 0;  // sum of the checkpoints' file sizes
};

class Index {
 public:
  // Opens the index of `source` (an absolute, resolved directory) stored at
  // db_path, creating it if missing. An index that is corrupt, from another
  // schema version or for another source is rebuilt from scratch. The caller
  // runs Scan() to bring it up to date.
  static core::Result<std::unique_ptr<Index>> Open(const std::string& source,
                                                   const std::string& db_path);
  ~Index();

  const std::string& source() const { return source_; }

  // Incremental scan of the whole source: directories whose mtime did not
  // change are not listed again, and unchanged checkpoints are not re-read.
  core::Result<ScanStats> Scan();

  // A scan of only what changed: `changes` are (directory, entry name) pairs
  // as a watcher reports them. A change inside a checkpoint directory
  // re-reads that checkpoint; any other names one entry, which is walked (or
  // removed) on its own. Cost grows with the changes, not with the tree.
  core::Result<ScanStats> ScanChanges(
      const std::vector<std::pair<std::string, std::string>>& changes);

  // Checkpoints directly in `experiment` or anywhere below `scope` (an
  // absolute directory), valid and invalid, newest first.
  core::Result<std::vector<core::Checkpoint>> List(const std::string& scope);

  // The valid checkpoints of `scope` that satisfy every predicate, in the
  // query's order (newest first for latest/avg-last; by key then newest for
  // ranked queries, where only checkpoints holding the key as a number
  // compete). Returns at most `limit` starting at `offset`.
  core::Result<std::vector<core::Checkpoint>> Select(const std::string& scope,
                                                     const std::vector<core::Predicate>& where,
                                                     bool ranked, core::Order order,
                                                     const std::string& key, int limit,
                                                     int offset = 0);

  // Numeric meta keys held by valid checkpoints of scope matching `where`,
  // by at least `min_count` of them (not NaN), in byte order.
  core::Result<std::vector<std::string>> NumericKeys(const std::string& scope,
                                                     const std::vector<core::Predicate>& where,
                                                     int min_count = 1);

  // Every directory the last scan walked (plain and checkpoint directories):
  // what a watcher must watch.
  core::Result<std::vector<std::string>> Dirs();

  // Whether `dir` directly holds at least one checkpoint (valid or not).
  bool IsExperiment(const std::string& dir);

  // The checkpoint whose real path is `path`, if indexed.
  core::Result<core::Checkpoint> Find(const std::string& path);

  // Counts over the whole index (aggregates, no rows loaded).
  core::Result<IndexCounts> Counts();

 private:
  Index(std::string source, std::unique_ptr<Db> db, std::unique_ptr<Db> scan_db);
  core::Result<core::Checkpoint> LoadRow(int64_t id);

  const std::string source_;
  std::mutex scan_mu_;  // guards scan_db_
  std::unique_ptr<Db> scan_db_;
  std::mutex mu_;  // guards db_
  std::unique_ptr<Db> db_;
};

// Where the index of `source` lives by default:
// $XDG_STATE_HOME/ckptfs (else ~/.local/state/ckptfs) /index-<hash>.sqlite.
std::string DefaultIndexPath(const std::string& source);

}  // namespace ckptfs::index

#endif  // CKPTFS_INDEX_INDEX_H_
