#define FUSE_USE_VERSION 314
#include "fs/fuse_ops.h"

#include <fuse_lowlevel.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <memory>
#include <new>
#include <string>
#include <vector>

#include "core/log.h"
#include "fs/node_table.h"

namespace ckptfs::fs {
namespace {

using core::LogLevel;

NodeTable* Table(fuse_req_t req) { return static_cast<NodeTable*>(fuse_req_userdata(req)); }

// Logs what the user will see as an errno, once per failing request; ENOENT
// is the normal answer of lookups and is not logged above debug.
int Errno(const core::Status& s) {
  int err = ToErrno(s);
  if (err == ENOENT || err == ENODATA) {
    core::Log(LogLevel::kDebug, "%s", s.message().c_str());
  } else {
    core::Log(LogLevel::kWarning, "%s (%s)", s.message().c_str(), std::strerror(err));
  }
  return err;
}

struct OpenDir {
  std::vector<index::DirEntry> entries;
};

struct OpenFileHandle {
  int fd = -1;
  std::string content;
};

void ReplyEntry(fuse_req_t req, const NodeAttr& a) {
  struct fuse_entry_param e {};
  e.ino = a.st.st_ino;
  e.attr = a.st;
  e.attr_timeout = a.timeout;
  e.entry_timeout = a.timeout;
  fuse_reply_entry(req, &e);
}

void Init(void* /*userdata*/, struct fuse_conn_info* conn) {
  // Data is spliced from the real file's descriptor into /dev/fuse.
  if (conn->capable & FUSE_CAP_SPLICE_WRITE) conn->want |= FUSE_CAP_SPLICE_WRITE;
  if (conn->capable & FUSE_CAP_SPLICE_MOVE) conn->want |= FUSE_CAP_SPLICE_MOVE;
  // Pages stay cached across opens unless keep_cache says otherwise, and a
  // changed mtime drops them.
  if (conn->capable & FUSE_CAP_AUTO_INVAL_DATA) conn->want |= FUSE_CAP_AUTO_INVAL_DATA;
  core::Log(LogLevel::kDebug, "fuse: max_write %u, max_read %u, max_readahead %u",
            conn->max_write, conn->max_read, conn->max_readahead);
}

void Lookup(fuse_req_t req, fuse_ino_t parent, const char* name) {
  auto a = Table(req)->Lookup(parent, name);
  if (!a.ok()) {
    fuse_reply_err(req, Errno(a.status()));
    return;
  }
  ReplyEntry(req, *a);
}

void Forget(fuse_req_t req, fuse_ino_t ino, uint64_t nlookup) {
  Table(req)->Forget(ino, nlookup);
  fuse_reply_none(req);
}

void ForgetMulti(fuse_req_t req, size_t count, struct fuse_forget_data* forgets) {
  for (size_t i = 0; i < count; ++i) Table(req)->Forget(forgets[i].ino, forgets[i].nlookup);
  fuse_reply_none(req);
}

void GetAttr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info* /*fi*/) {
  auto a = Table(req)->GetAttr(ino);
  if (!a.ok()) {
    fuse_reply_err(req, Errno(a.status()));
    return;
  }
  fuse_reply_attr(req, &a->st, a->timeout);
}

void ReadLink(fuse_req_t req, fuse_ino_t ino) {
  auto target = Table(req)->ReadLink(ino);
  if (!target.ok()) {
    fuse_reply_err(req, Errno(target.status()));
    return;
  }
  fuse_reply_readlink(req, target->c_str());
}

void OpenDirOp(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info* fi) {
  auto entries = Table(req)->ReadDir(ino);
  if (!entries.ok()) {
    fuse_reply_err(req, Errno(entries.status()));
    return;
  }
  auto* dir = new (std::nothrow) OpenDir{std::move(*entries)};
  if (dir == nullptr) {
    fuse_reply_err(req, ENOMEM);
    return;
  }
  fi->fh = reinterpret_cast<uint64_t>(dir);
  if (fuse_reply_open(req, fi) != 0) delete dir;  // interrupted: no release follows
}

void ReadDir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info* fi) {
  auto* dir = reinterpret_cast<OpenDir*>(fi->fh);
  std::vector<char> buf(size);
  size_t used = 0;
  // Offsets: 0 ".", 1 "..", then entries; each entry records the next offset.
  const size_t total = dir->entries.size() + 2;
  for (size_t i = static_cast<size_t>(off); i < total; ++i) {
    struct stat st {};
    st.st_ino = 0xffffffff;  // the kernel's "unknown"; 0 would hide the entry
    std::string name;
    if (i == 0) {
      name = ".", st.st_mode = S_IFDIR, st.st_ino = ino;
    } else if (i == 1) {
      name = "..", st.st_mode = S_IFDIR;
    } else {
      const index::DirEntry& e = dir->entries[i - 2];
      name = e.name;
      st.st_mode = e.is_dir ? S_IFDIR : S_IFREG;
    }
    size_t need = fuse_add_direntry(req, buf.data() + used, size - used, name.c_str(), &st,
                                    static_cast<off_t>(i + 1));
    if (need > size - used) break;
    used += need;
  }
  fuse_reply_buf(req, buf.data(), used);
}

void ReleaseDir(fuse_req_t req, fuse_ino_t /*ino*/, struct fuse_file_info* fi) {
  delete reinterpret_cast<OpenDir*>(fi->fh);
  fuse_reply_err(req, 0);
}

void Open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info* fi) {
  auto f = Table(req)->Open(ino, fi->flags);
  if (!f.ok()) {
    fuse_reply_err(req, Errno(f.status()));
    return;
  }
  auto* h = new (std::nothrow) OpenFileHandle{f->fd, std::move(f->content)};
  if (h == nullptr) {
    if (f->fd >= 0) ::close(f->fd);
    fuse_reply_err(req, ENOMEM);
    return;
  }
  fi->fh = reinterpret_cast<uint64_t>(h);
  fi->keep_cache = f->keep_cache;
  fi->direct_io = f->generated;  // generated content may differ from the size in getattr
  fi->noflush = 1;
  if (fuse_reply_open(req, fi) != 0) {
    if (h->fd >= 0) ::close(h->fd);
    delete h;
  }
}

void Read(fuse_req_t req, fuse_ino_t /*ino*/, size_t size, off_t off, struct fuse_file_info* fi) {
  auto* h = reinterpret_cast<OpenFileHandle*>(fi->fh);
  if (h->fd < 0) {
    const size_t len = h->content.size();
    const size_t start = static_cast<size_t>(off) < len ? static_cast<size_t>(off) : len;
    const size_t n = std::min(size, len - start);
    fuse_reply_buf(req, h->content.data() + start, n);
    return;
  }
  struct fuse_bufvec buf = FUSE_BUFVEC_INIT(size);
  buf.buf[0].flags = static_cast<enum fuse_buf_flags>(FUSE_BUF_IS_FD | FUSE_BUF_FD_SEEK);
  buf.buf[0].fd = h->fd;
  buf.buf[0].pos = off;
  fuse_reply_data(req, &buf, FUSE_BUF_SPLICE_MOVE);
}

void Release(fuse_req_t req, fuse_ino_t /*ino*/, struct fuse_file_info* fi) {
  auto* h = reinterpret_cast<OpenFileHandle*>(fi->fh);
  if (h->fd >= 0) ::close(h->fd);
  delete h;
  fuse_reply_err(req, 0);
}

void StatFs(fuse_req_t req, fuse_ino_t /*ino*/) {
  struct statvfs sv {};
  if (::statvfs(Table(req)->source().c_str(), &sv) != 0) {
    fuse_reply_err(req, errno);
    return;
  }
  fuse_reply_statfs(req, &sv);
}

void ReplyXattr(fuse_req_t req, const std::string& value, size_t size) {
  if (size == 0) {
    fuse_reply_xattr(req, value.size());
  } else if (size < value.size()) {
    fuse_reply_err(req, ERANGE);
  } else {
    fuse_reply_buf(req, value.data(), value.size());
  }
}

void GetXattr(fuse_req_t req, fuse_ino_t ino, const char* name, size_t size) {
  auto v = Table(req)->GetXattr(ino, name);
  if (!v.ok()) {
    fuse_reply_err(req, Errno(v.status()));
    return;
  }
  ReplyXattr(req, *v, size);
}

void ListXattr(fuse_req_t req, fuse_ino_t ino, size_t size) {
  std::string names;
  for (const std::string& n : Table(req)->ListXattr(ino)) names += n + '\0';
  ReplyXattr(req, names, size);
}

// Everything that would change the source outside new/ is refused.
void RofsMkdir(fuse_req_t req, fuse_ino_t, const char*, mode_t) { fuse_reply_err(req, EROFS); }
void RofsMknod(fuse_req_t req, fuse_ino_t, const char*, mode_t, dev_t) { fuse_reply_err(req, EROFS); }
void RofsUnlink(fuse_req_t req, fuse_ino_t, const char*) { fuse_reply_err(req, EROFS); }
void RofsSymlink(fuse_req_t req, const char*, fuse_ino_t, const char*) { fuse_reply_err(req, EROFS); }
void RofsRename(fuse_req_t req, fuse_ino_t, const char*, fuse_ino_t, const char*, unsigned int) {
  fuse_reply_err(req, EROFS);
}
void RofsLink(fuse_req_t req, fuse_ino_t, fuse_ino_t, const char*) { fuse_reply_err(req, EROFS); }
void RofsSetAttr(fuse_req_t req, fuse_ino_t, struct stat*, int, struct fuse_file_info*) {
  fuse_reply_err(req, EROFS);
}
void RofsCreate(fuse_req_t req, fuse_ino_t, const char*, mode_t, struct fuse_file_info*) {
  fuse_reply_err(req, EROFS);
}
void RofsSetXattr(fuse_req_t req, fuse_ino_t, const char*, const char*, size_t, int) {
  fuse_reply_err(req, EROFS);
}
void RofsRemoveXattr(fuse_req_t req, fuse_ino_t, const char*) { fuse_reply_err(req, EROFS); }

struct fuse_lowlevel_ops MakeOps() {
  struct fuse_lowlevel_ops ops {};
  ops.init = Init;
  ops.lookup = Lookup;
  ops.forget = Forget;
  ops.forget_multi = ForgetMulti;
  ops.getattr = GetAttr;
  ops.readlink = ReadLink;
  ops.opendir = OpenDirOp;
  ops.readdir = ReadDir;
  ops.releasedir = ReleaseDir;
  ops.open = Open;
  ops.read = Read;
  ops.release = Release;
  ops.statfs = StatFs;
  ops.getxattr = GetXattr;
  ops.listxattr = ListXattr;
  ops.mkdir = RofsMkdir;
  ops.mknod = RofsMknod;
  ops.unlink = RofsUnlink;
  ops.rmdir = RofsUnlink;
  ops.symlink = RofsSymlink;
  ops.rename = RofsRename;
  ops.link = RofsLink;
  ops.setattr = RofsSetAttr;
  ops.create = RofsCreate;
  ops.setxattr = RofsSetXattr;
  ops.removexattr = RofsRemoveXattr;
  return ops;
}

}  // namespace

const struct fuse_lowlevel_ops& FuseOps() {
  static const struct fuse_lowlevel_ops kOps = MakeOps();
  return kOps;
}

}  // namespace ckptfs::fs
