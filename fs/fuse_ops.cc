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
  if (err == ENOENT || err == ENODATA || err == ESTALE) {  // ESTALE: the kernel retries
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
  OpenedFile file;
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
  // Writes under new/ are spliced from /dev/fuse into the staging file.
  if (conn->capable & FUSE_CAP_SPLICE_READ) conn->want |= FUSE_CAP_SPLICE_READ;
  // Pages stay cached across opens unless keep_cache says otherwise, and a
  // changed mtime drops them.
  if (conn->capable & FUSE_CAP_AUTO_INVAL_DATA) conn->want |= FUSE_CAP_AUTO_INVAL_DATA;
  core::Log(LogLevel::kDebug, "fuse: max_write %u, max_read %u, max_readahead %u",
            conn->max_write, conn->max_read, conn->max_readahead);
}

void Lookup(fuse_req_t req, fuse_ino_t parent, const char* name) {
  NodeTable* table = Table(req);
  const uint64_t generation = table->generation();
  auto a = table->Lookup(parent, name);
  if (!a.ok()) {
    fuse_reply_err(req, Errno(a.status()));
    return;
  }
  ReplyEntry(req, *a);
  table->AfterLookupReply(parent, name, generation);
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

// Hands an opened file to the kernel; on failure undoes the open.
void ReplyOpen(fuse_req_t req, struct fuse_file_info* fi, OpenedFile f) {
  auto* h = new (std::nothrow) OpenFileHandle{std::move(f)};
  if (h == nullptr) {
    Table(req)->Released(f);
    if (f.fd >= 0) ::close(f.fd);
    fuse_reply_err(req, ENOMEM);
    return;
  }
  fi->fh = reinterpret_cast<uint64_t>(h);
  fi->keep_cache = h->file.keep_cache;
  fi->direct_io = h->file.generated;  // generated content may differ from the size in getattr
  fi->noflush = h->file.writer ? 0 : 1;
  if (fuse_reply_open(req, fi) != 0) {
    Table(req)->Released(h->file);
    if (h->file.fd >= 0) ::close(h->file.fd);
    delete h;
  }
}

void Open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info* fi) {
  auto f = Table(req)->Open(ino, fi->flags);
  if (!f.ok()) {
    fuse_reply_err(req, Errno(f.status()));
    return;
  }
  ReplyOpen(req, fi, std::move(*f));
}

void Read(fuse_req_t req, fuse_ino_t /*ino*/, size_t size, off_t off, struct fuse_file_info* fi) {
  auto* h = reinterpret_cast<OpenFileHandle*>(fi->fh);
  if (h->file.fd < 0) {
    const std::string& content = h->file.content;
    const size_t len = content.size();
    const size_t start = static_cast<size_t>(off) < len ? static_cast<size_t>(off) : len;
    const size_t n = std::min(size, len - start);
    fuse_reply_buf(req, content.data() + start, n);
    return;
  }
  struct fuse_bufvec buf = FUSE_BUFVEC_INIT(size);
  buf.buf[0].flags = static_cast<enum fuse_buf_flags>(FUSE_BUF_IS_FD | FUSE_BUF_FD_SEEK);
  buf.buf[0].fd = h->file.fd;
  buf.buf[0].pos = off;
  fuse_reply_data(req, &buf, FUSE_BUF_SPLICE_MOVE);
}

void Release(fuse_req_t req, fuse_ino_t /*ino*/, struct fuse_file_info* fi) {
  auto* h = reinterpret_cast<OpenFileHandle*>(fi->fh);
  if (h->file.fd >= 0) ::close(h->file.fd);
  Table(req)->Released(h->file);
  delete h;
  fuse_reply_err(req, 0);
}

// Writes land in the staging file (new/ only: other opens are read-only).
void WriteBuf(fuse_req_t req, fuse_ino_t /*ino*/, struct fuse_bufvec* in, off_t off,
              struct fuse_file_info* fi) {
  auto* h = reinterpret_cast<OpenFileHandle*>(fi->fh);
  if (!h->file.writer) {
    fuse_reply_err(req, EBADF);
    return;
  }
  struct fuse_bufvec out = FUSE_BUFVEC_INIT(fuse_buf_size(in));
  out.buf[0].flags = static_cast<enum fuse_buf_flags>(FUSE_BUF_IS_FD | FUSE_BUF_FD_SEEK);
  out.buf[0].fd = h->file.fd;
  out.buf[0].pos = off;
  ssize_t n = fuse_buf_copy(&out, in, FUSE_BUF_SPLICE_NONBLOCK);
  if (n < 0) {
    fuse_reply_err(req, static_cast<int>(-n));
    return;
  }
  Table(req)->Wrote(h->file);
  fuse_reply_write(req, static_cast<size_t>(n));
}

void Fsync(fuse_req_t req, fuse_ino_t /*ino*/, int datasync, struct fuse_file_info* fi) {
  auto* h = reinterpret_cast<OpenFileHandle*>(fi->fh);
  if (h->file.fd < 0) {
    fuse_reply_err(req, 0);
    return;
  }
  int rc = datasync ? ::fdatasync(h->file.fd) : ::fsync(h->file.fd);
  fuse_reply_err(req, rc == 0 ? 0 : errno);
}

void Flush(fuse_req_t req, fuse_ino_t /*ino*/, struct fuse_file_info* /*fi*/) { fuse_reply_err(req, 0); }

void Mkdir(fuse_req_t req, fuse_ino_t parent, const char* name, mode_t mode) {
  auto a = Table(req)->Mkdir(parent, name, mode);
  if (!a.ok()) {
    fuse_reply_err(req, Errno(a.status()));
    return;
  }
  ReplyEntry(req, *a);
}

void Create(fuse_req_t req, fuse_ino_t parent, const char* name, mode_t mode,
            struct fuse_file_info* fi) {
  auto r = Table(req)->Create(parent, name, mode, fi->flags);
  if (!r.ok()) {
    fuse_reply_err(req, Errno(r.status()));
    return;
  }
  auto* h = new (std::nothrow) OpenFileHandle{std::move(r->second)};
  if (h == nullptr) {
    fuse_reply_err(req, ENOMEM);
    return;
  }
  fi->fh = reinterpret_cast<uint64_t>(h);
  fi->keep_cache = 0;
  fi->direct_io = 0;
  struct fuse_entry_param e {};
  e.ino = r->first.st.st_ino;
  e.attr = r->first.st;
  e.attr_timeout = r->first.timeout;
  e.entry_timeout = r->first.timeout;
  if (fuse_reply_create(req, &e, fi) != 0) {
    ::close(h->file.fd);
    Table(req)->Released(h->file);
    delete h;
  }
}

void Unlink(fuse_req_t req, fuse_ino_t parent, const char* name) {
  fuse_reply_err(req, ToErrno(Table(req)->Unlink(parent, name, false)));
}

void Rmdir(fuse_req_t req, fuse_ino_t parent, const char* name) {
  fuse_reply_err(req, ToErrno(Table(req)->Unlink(parent, name, true)));
}

void Rename(fuse_req_t req, fuse_ino_t parent, const char* name, fuse_ino_t new_parent,
            const char* new_name, unsigned int flags) {
  fuse_reply_err(req, ToErrno(Table(req)->Rename(parent, name, new_parent, new_name, flags)));
}

void SetAttr(fuse_req_t req, fuse_ino_t ino, struct stat* attr, int to_set, struct fuse_file_info* fi) {
  const int fd = fi != nullptr ? reinterpret_cast<OpenFileHandle*>(fi->fh)->file.fd : -1;
  auto a = Table(req)->SetAttr(ino, *attr, to_set, fd);
  if (!a.ok()) {
    fuse_reply_err(req, Errno(a.status()));
    return;
  }
  fuse_reply_attr(req, &a->st, a->timeout);
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

// Links and special files are never part of a checkpoint, and xattrs of the
// source are not ours to change: refused everywhere.
void Mknod(fuse_req_t req, fuse_ino_t parent, const char* name, mode_t, dev_t) {
  fuse_reply_err(req, Errno(Table(req)->RefuseSpecial(parent, name, "device node or fifo")));
}
void Symlink(fuse_req_t req, const char*, fuse_ino_t parent, const char* name) {
  fuse_reply_err(req, Errno(Table(req)->RefuseSpecial(parent, name, "symbolic link")));
}
void Link(fuse_req_t req, fuse_ino_t, fuse_ino_t parent, const char* name) {
  fuse_reply_err(req, Errno(Table(req)->RefuseSpecial(parent, name, "hard link")));
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
  ops.write_buf = WriteBuf;
  ops.fsync = Fsync;
  ops.flush = Flush;
  ops.mkdir = Mkdir;
  ops.create = Create;
  ops.unlink = Unlink;
  ops.rmdir = Rmdir;
  ops.rename = Rename;
  ops.setattr = SetAttr;
  ops.mknod = Mknod;
  ops.symlink = Symlink;
  ops.link = Link;
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
