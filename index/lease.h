// The pruning lease: at most one process prunes a source at a time, however
// many daemons (one per node) serve it (DESIGN.md §12).
//
// The lease is a write lock on SOURCE/.ckptfs-lease/lease taken with
// fcntl(F_OFD_SETLK): an open file description lock, so that two Lease
// objects conflict even within one process (classic POSIX locks are per
// process and would not), and so that it is tied to the descriptor, not to
// a thread. The kernel drops it when the holder dies or closes it; on NFS
// the Linux client maps it to an ordinary POSIX lock held by the server's
// lock manager (NFSv4 leases: released when the holder's node stops
// renewing), Lustre and CephFS give cluster-wide fcntl locks too. Nothing
// home-made: no lock file contents decide anything; the holder only writes
// "host pid" into the file so that others can say who holds it.
//
// The directory is created and checked as core::OpenOwnDir does (a real
// directory owned by the daemon's effective uid, not writable by group or
// others) and the file must be a regular file of the same owner, reached
// without following a symbolic link; anything else is refused (kPermission
// naming the path and what is wrong). core::IsOwnDirName covers the name,
// so the mount hides it and the scanner skips it.
//
// Thread-safe: TryAcquire, Release and held may be called from any thread.
#ifndef CKPTFS_INDEX_LEASE_H_
#define CKPTFS_INDEX_LEASE_H_

#include <mutex>
#include <string>

#include "core/beneath.h"
#include "core/status.h"

namespace ckptfs::index {

inline constexpr char kLeaseFile[] = "lease";  // in core::kLeaseDir at SOURCE's root

class Lease {
 public:
  // Opens (creating when missing) the lease file of source; takes no lock.
  static core::Result<Lease> Open(const core::Beneath& source);

  Lease(Lease&& other) noexcept;
  Lease& operator=(Lease&&) = delete;
  Lease(const Lease&) = delete;
  Lease& operator=(const Lease&) = delete;
  ~Lease();  // closing the descriptor releases the lock

  // Takes the lock if it is free: true when this object holds it now
  // (already held: true at once). false when another holds it; an error
  // other than "held" (ENOLCK: the filesystem has no lock manager) is
  // returned as a Status naming the file.
  core::Result<bool> TryAcquire();
  void Release();
  bool held() const;

  // Who holds the lease by the file's words ("host pid"), or "" if unknown.
  std::string Holder() const;
  const std::string& path() const { return path_; }

 private:
  Lease(core::ScopedFd fd, std::string path) : fd_(std::move(fd)), path_(std::move(path)) {}

  mutable std::mutex mu_;  // guards held_ and the file's contents
  core::ScopedFd fd_;
  std::string path_;
  bool held_ = false;
};

}  // namespace ckptfs::index

#endif  // CKPTFS_INDEX_LEASE_H_
