// The FUSE low-level callbacks: thin shells that call NodeTable and reply
// exactly once, turning a Status into an errno. No logic lives here.
//
// Every callback runs behind CallbackWall: nothing it throws reaches
// libfuse's C frames (STYLE.md "The C boundary is a wall").
#ifndef CKPTFS_FS_FUSE_OPS_H_
#define CKPTFS_FS_FUSE_OPS_H_

#include "core/log.h"
#include "core/status.h"

struct fuse_lowlevel_ops;

namespace ckptfs::fs {

class NodeTable;

// The operations table; the session's userdata must be a NodeTable*.
const struct fuse_lowlevel_ops& FuseOps();

// Runs a request's work, body(). What it throws (std::exception, nlohmann's
// errors, std::bad_alloc, anything) is logged as an error naming `op`, and
// if the body had not replied yet (*replied false: the body sets it as it
// replies) fail() sends the one reply the request still needs (EIO, or
// none for forget). So each request gets exactly one reply, and no exception
// leaves the callback.
template <typename Body, typename Fail>
void CallbackWall(const char* op, const bool* replied, Body&& body, Fail&& fail) noexcept {
  if (core::CatchAndLog(op, body)) return;
  if (!*replied) fail();
}

}  // namespace ckptfs::fs

#endif  // CKPTFS_FS_FUSE_OPS_H_
