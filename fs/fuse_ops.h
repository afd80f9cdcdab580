// The FUSE low-level callbacks: thin shells that call NodeTable and reply
// exactly once, turning a Status into an errno. No logic lives here.
#ifndef CKPTFS_FS_FUSE_OPS_H_
#define CKPTFS_FS_FUSE_OPS_H_

struct fuse_lowlevel_ops;

namespace ckptfs::fs {

class NodeTable;

// The operations table; the session's userdata must be a NodeTable*.
const struct fuse_lowlevel_ops& FuseOps();

}  // namespace ckptfs::fs

#endif  // CKPTFS_FS_FUSE_OPS_H_
