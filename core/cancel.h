// Process-wide cancellation of long work (averages): a daemon that is told to
// stop (SIGTERM, an unmount it hears of) must not first finish an average of
// many gigabytes.
//
// Work that may run long calls CancelRequested() between chunks (at most
// kReadChunk bytes apart, file_util.h) and returns CancelledStatus() when it
// is true. The answer comes from a check that the owner of the process
// installs (the daemon: "has the FUSE session ended?"), so the signal
// handlers that libfuse owns need no change. Thread-safe.
#ifndef CKPTFS_CORE_CANCEL_H_
#define CKPTFS_CORE_CANCEL_H_

#include <string>

#include "core/status.h"

namespace ckptfs::core {

// check(arg) answers CancelRequested from now on; nullptr: never cancelled.
// arg must outlive the check (install nullptr before it goes away).
using CancelCheck = bool (*)(void* arg);
void SetCancelCheck(CancelCheck check, void* arg);

bool CancelRequested();

// "WHAT: cancelled (ckptfs is stopping): Operation canceled", errno ECANCELED.
Status CancelledStatus(const std::string& what);

}  // namespace ckptfs::core

#endif  // CKPTFS_CORE_CANCEL_H_
