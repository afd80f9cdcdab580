// An on-disk cache of averages, keyed by the identity of their members (path,
// size, mtime, device and inode of every member file): a changed or new member
// is a new key, so a stale average is never served.
//
// A cache is a cache: nothing is fsynced on the reader's path. A result is
// written to a temporary file and renamed, then its completion record KEY.done
// (size and a 64-bit checksum of its bytes) is written beside it. A result is
// served only when its record matches: the size at every use, the checksum
// once per process (the first use after a start, as a crash ends the
// process). A result torn by a crash (short, zeros, no record) is removed and
// computed again, never served.
// The cache keeps under max_bytes by evicting the least recently used
// results; a result open elsewhere stays readable after eviction (unlink).
// A member that changes while it is averaged fails the average (kCorrupt
// naming it) and leaves no result, as does any other failure: no temporary
// file stays behind (one left by a crash is removed an hour later).
//
// Thread-safe: concurrent Get calls for the same members wait for one
// computation; different members compute in parallel.
#ifndef CKPTFS_CORE_AVERAGE_CACHE_H_
#define CKPTFS_CORE_AVERAGE_CACHE_H_

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "core/averaging.h"
#include "core/beneath.h"
#include "core/status.h"

namespace ckptfs::core {

inline constexpr int64_t kDefaultAverageCacheBytes = int64_t{20} << 30;

class AverageCache {
 public:
  AverageCache(std::string dir, int64_t max_bytes);

  // The path of a file holding the average of `members` (one file of each
  // member checkpoint, newest first), computed now if not cached.
  Result<std::string> Get(const std::vector<std::string>& members, const ProgressFn& progress);

  // The path of a safetensors file converting the average of `members` (of
  // the one member itself when there is one; safetensors_convert.h), cached
  // like averages: same directory, keys from the same identities (a kind
  // apart), same bounds. A member that is already safetensors is not
  // converted: callers serve it as it is.
  Result<std::string> GetSafetensors(const std::vector<std::string>& members,
                                     const ProgressFn& progress);

  const std::string& dir() const { return dir_; }

  // Members under source are opened beneath it (no symbolic link at any
  // component) before anything is read, and the average reads those very
  // files through their descriptors: swapping a member's directory for a
  // link while it is averaged changes nothing that is read. The key is made
  // from the opened files. source must outlive the cache; nullptr: by path.
  void set_source(const Beneath* source) { source_ = source; }

 private:
  // The cache file name for members, from their identities; `kind`
  // (nullptr for averages) keys other results apart.
  Result<std::string> KeyOf(const std::vector<std::string>& members,
                            const std::vector<std::string>& identities, const char* kind) const;
  // Computes into `path` from the members as read (read_as: descriptors
  // under the source); returns a line for the log.
  using ComputeFn = std::function<Result<std::string>(const std::vector<std::string>& read_as,
                                                      const std::string& path)>;
  // Get's steps for any kind of result: open the members, key, wait for one
  // computation, serve a complete result or compute, check, record, evict.
  Result<std::string> Cached(const std::vector<std::string>& members, const char* kind,
                             const ComputeFn& compute);
  void Evict(const std::string& keep);
  // Whether the result at path is whole (see the class comment); a torn one
  // is removed, with its record.
  bool Complete(const std::string& path);
  Status RecordComplete(const std::string& path);

  const std::string dir_;
  const int64_t max_bytes_;
  const Beneath* source_ = nullptr;
  std::mutex mu_;  // guards computing_ and verified_; never held while computing
  std::map<std::string, std::shared_ptr<std::mutex>> computing_;
  std::set<std::string> verified_;  // record + path of results checked whole
};

}  // namespace ckptfs::core

#endif  // CKPTFS_CORE_AVERAGE_CACHE_H_
