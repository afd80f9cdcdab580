#define FUSE_USE_VERSION 314
#include "fs/fuse_ops.h"

#include <fuse_lowlevel.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <unordered_map>
#include <vector>

#include "core/log.h"
#include "fs/node_table.h"

namespace ckptfs::fs {
namespace {

using core::LogLevel;

NodeTable* Table(fuse_req_t req) { return static_cast<NodeTable*>(fuse_req_userdata(req)); }

// The supplementary groups of process pid, from its /proc status. (libfuse
// 3.14's fuse_req_getgroups does the same but searches its buffer without
// terminating it, which AddressSanitizer reports as an overflow.)
std::vector<gid_t> GroupsOf(pid_t pid) {
  std::vector<gid_t> groups;
  const std::string path = "/proc/" + std::to_string(pid) + "/status";
  std::FILE* f = std::fopen(path.c_str(), "re");
  if (f == nullptr) return groups;  // unknown: only the primary group counts
  char line[4096];
  while (std::fgets(line, sizeof(line), f) != nullptr) {
    if (std::strncmp(line, "Groups:", 7) != 0) continue;
    char* p = line + 7;
    for (;;) {
      char* end = nullptr;
      const unsigned long g = std::strtoul(p, &end, 10);
      if (end == p) break;
      groups.push_back(static_cast<gid_t>(g));
      p = end;
    }
    break;
  }
  std::fclose(f);
  return groups;
}

// Who sends req: its uid and gid, and (on a multi-user mount, for a caller
// other than root) its supplementary groups.
core::Caller CallerOf(fuse_req_t req) {
  core::Caller c;
  const struct fuse_ctx* ctx = fuse_req_ctx(req);
  if (ctx == nullptr) return c;
  c.uid = ctx->uid;
  c.gid = ctx->gid;
  if (!Table(req)->multi_user() || c.uid == 0) return c;
  c.groups = GroupsOf(ctx->pid);
  return c;
}

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

// One request's answer. Every fuse_reply_* goes through it, so the wall
// knows whether the request was answered before something threw.
class Reply {
 public:
  explicit Reply(fuse_req_t req) : req_(req) {}
  Reply(const Reply&) = delete;
  Reply& operator=(const Reply&) = delete;

  const bool* replied() const { return &replied_; }

  void Err(int err) {
    replied_ = true;
    fuse_reply_err(req_, err);
  }
  void Fail(const core::Status& s) { Err(Errno(s)); }
  void None() {
    replied_ = true;
    fuse_reply_none(req_);
  }
  void Entry(const NodeAttr& a) {
    struct fuse_entry_param e {};
    e.ino = a.st.st_ino;
    e.attr = a.st;
    e.attr_timeout = a.timeout;
    e.entry_timeout = a.timeout;
    replied_ = true;
    fuse_reply_entry(req_, &e);
  }
  void Attr(const NodeAttr& a) {
    replied_ = true;
    fuse_reply_attr(req_, &a.st, a.timeout);
  }
  void Readlink(const std::string& target) {
    replied_ = true;
    fuse_reply_readlink(req_, target.c_str());
  }
  // Nonzero: the request was interrupted and no release will follow.
  int Open(const struct fuse_file_info* fi) {
    replied_ = true;
    return fuse_reply_open(req_, fi);
  }
  int Create(const struct fuse_entry_param* e, const struct fuse_file_info* fi) {
    replied_ = true;
    return fuse_reply_create(req_, e, fi);
  }
  void Buf(const char* data, size_t size) {
    replied_ = true;
    fuse_reply_buf(req_, data, size);
  }
  void Data(struct fuse_bufvec* buf) {
    replied_ = true;
    fuse_reply_data(req_, buf, FUSE_BUF_SPLICE_MOVE);
  }
  void Write(size_t count) {
    replied_ = true;
    fuse_reply_write(req_, count);
  }
  void Statfs(const struct statvfs* sv) {
    replied_ = true;
    fuse_reply_statfs(req_, sv);
  }
  void XattrSize(size_t size) {
    replied_ = true;
    fuse_reply_xattr(req_, size);
  }

 private:
  fuse_req_t req_;
  bool replied_ = false;
};

// Every callback's body runs here: whatever it throws becomes EIO (or, for
// forget, the reply-less answer), sent only if the body had not replied.
template <typename Body>
void Serve(fuse_req_t req, const char* op, Body&& body) noexcept {
  Reply reply(req);
  CallbackWall(
      op, reply.replied(), [&] { body(reply); }, [&] { reply.Err(EIO); });
}
template <typename Body>
void ServeForget(fuse_req_t req, const char* op, Body&& body) noexcept {
  Reply reply(req);
  CallbackWall(
      op, reply.replied(), [&] { body(reply); }, [&] { reply.None(); });
}

struct OpenDir {
  std::vector<index::DirEntry> entries;
};

// An open file; the last owner closes it and tells the table.
struct OpenFileHandle {
  OpenFileHandle(NodeTable* t, OpenedFile f) : table(t), file(std::move(f)) {}
  ~OpenFileHandle() {
    if (file.fd >= 0) ::close(file.fd);
    table->Released(file);
  }
  OpenFileHandle(const OpenFileHandle&) = delete;
  OpenFileHandle& operator=(const OpenFileHandle&) = delete;
  NodeTable* table;
  OpenedFile file;
};

// Open handles by number (fi->fh). The kernel can send RELEASE while a READ
// of the same file is still being answered (the reader was killed while it
// waited), so a request holds its handle for as long as it uses it and
// RELEASE only drops the table's reference. Thread-safe.
template <typename T>
class Handles {
 public:
  uint64_t Add(std::shared_ptr<T> h) {
    std::lock_guard<std::mutex> lock(mu_);
    const uint64_t id = next_++;
    map_.emplace(id, std::move(h));
    return id;
  }
  std::shared_ptr<T> Get(uint64_t id) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = map_.find(id);
    return it == map_.end() ? nullptr : it->second;
  }
  std::shared_ptr<T> Take(uint64_t id) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = map_.find(id);
    if (it == map_.end()) return nullptr;
    std::shared_ptr<T> h = std::move(it->second);
    map_.erase(it);
    return h;
  }

 private:
  std::mutex mu_;
  uint64_t next_ = 1;
  std::unordered_map<uint64_t, std::shared_ptr<T>> map_;
};

Handles<OpenFileHandle>& Files() {
  static auto* files = new Handles<OpenFileHandle>();  // outlives every request
  return *files;
}
Handles<OpenDir>& Dirs() {
  static auto* dirs = new Handles<OpenDir>();
  return *dirs;
}

void Init(void* /*userdata*/, struct fuse_conn_info* conn) {
  core::CatchAndLog("init", [&] {
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
  });
}

void Lookup(fuse_req_t req, fuse_ino_t parent, const char* name) {
  Serve(req, "lookup", [&](Reply& reply) {
    NodeTable* table = Table(req);
    const uint64_t generation = table->generation();
    const core::Caller caller = CallerOf(req);
    auto a = table->Lookup(parent, name, true, &caller);
    if (!a.ok()) return reply.Fail(a.status());
    reply.Entry(*a);
    table->AfterLookupReply(parent, name, generation);
  });
}

void Forget(fuse_req_t req, fuse_ino_t ino, uint64_t nlookup) {
  ServeForget(req, "forget", [&](Reply& reply) {
    Table(req)->Forget(ino, nlookup);
    reply.None();
  });
}

void ForgetMulti(fuse_req_t req, size_t count, struct fuse_forget_data* forgets) {
  ServeForget(req, "forget", [&](Reply& reply) {
    for (size_t i = 0; i < count; ++i) Table(req)->Forget(forgets[i].ino, forgets[i].nlookup);
    reply.None();
  });
}

void GetAttr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info* /*fi*/) {
  Serve(req, "getattr", [&](Reply& reply) {
    auto a = Table(req)->GetAttr(ino);
    if (!a.ok()) return reply.Fail(a.status());
    reply.Attr(*a);
  });
}

void ReadLink(fuse_req_t req, fuse_ino_t ino) {
  Serve(req, "readlink", [&](Reply& reply) {
    auto target = Table(req)->ReadLink(ino);
    if (!target.ok()) return reply.Fail(target.status());
    reply.Readlink(*target);
  });
}

void OpenDirOp(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info* fi) {
  Serve(req, "opendir", [&](Reply& reply) {
    const core::Caller caller = CallerOf(req);
    auto entries = Table(req)->ReadDir(ino, &caller);
    if (!entries.ok()) return reply.Fail(entries.status());
    fi->fh = Dirs().Add(std::make_shared<OpenDir>(OpenDir{std::move(*entries)}));
    if (reply.Open(fi) != 0) Dirs().Take(fi->fh);  // interrupted: no release follows
  });
}

void ReadDir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info* fi) {
  Serve(req, "readdir", [&](Reply& reply) {
    std::shared_ptr<OpenDir> dir = Dirs().Get(fi->fh);
    if (dir == nullptr) return reply.Err(EBADF);
    std::vector<char> buf(size);
    size_t used = 0;
    // Offsets: 0 ".", 1 "..", then entries; each entry records the next offset.
    const size_t total = dir->entries.size() + 2;
    for (size_t i = static_cast<size_t>(off); i < total; ++i) {
      struct stat st {};
      st.st_ino = 0xffffffff;  // the kernel's "unknown"; 0 would hide the entry
      const char* name;
      if (i == 0) {
        name = ".", st.st_mode = S_IFDIR, st.st_ino = ino;
      } else if (i == 1) {
        name = "..", st.st_mode = S_IFDIR;
      } else {
        const index::DirEntry& e = dir->entries[i - 2];
        name = e.name.c_str();
        st.st_mode = e.is_dir ? S_IFDIR : S_IFREG;
      }
      size_t need = fuse_add_direntry(req, buf.data() + used, size - used, name, &st,
                                      static_cast<off_t>(i + 1));
      if (need > size - used) break;
      used += need;
    }
    reply.Buf(buf.data(), used);
  });
}

void ReleaseDir(fuse_req_t req, fuse_ino_t /*ino*/, struct fuse_file_info* fi) {
  Serve(req, "releasedir", [&](Reply& reply) {
    Dirs().Take(fi->fh);
    reply.Err(0);
  });
}

// Hands an opened file to the kernel; on failure undoes the open (the
// handle's destructor closes it).
void ReplyOpen(fuse_req_t req, Reply& reply, struct fuse_file_info* fi, OpenedFile f) {
  auto h = std::make_shared<OpenFileHandle>(Table(req), std::move(f));
  fi->keep_cache = h->file.keep_cache;
  fi->direct_io = h->file.generated;  // generated content may differ from the size in getattr
  fi->noflush = h->file.writer ? 0 : 1;
  fi->fh = Files().Add(std::move(h));
  if (reply.Open(fi) != 0) Files().Take(fi->fh);  // interrupted: no release follows
}

void Open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info* fi) {
  Serve(req, "open", [&](Reply& reply) {
    const core::Caller caller = CallerOf(req);
    auto f = Table(req)->Open(ino, fi->flags, &caller);
    if (!f.ok()) return reply.Fail(f.status());
    ReplyOpen(req, reply, fi, std::move(*f));
  });
}

void Read(fuse_req_t req, fuse_ino_t /*ino*/, size_t size, off_t off, struct fuse_file_info* fi) {
  Serve(req, "read", [&](Reply& reply) {
    std::shared_ptr<OpenFileHandle> h = Files().Get(fi->fh);
    if (h == nullptr) return reply.Err(EBADF);
    if (h->file.fd < 0) {
      const std::string& content = h->file.content;
      const size_t len = content.size();
      const size_t start = static_cast<size_t>(off) < len ? static_cast<size_t>(off) : len;
      const size_t n = std::min(size, len - start);
      return reply.Buf(content.data() + start, n);
    }
    struct fuse_bufvec buf = FUSE_BUFVEC_INIT(size);
    buf.buf[0].flags = static_cast<enum fuse_buf_flags>(FUSE_BUF_IS_FD | FUSE_BUF_FD_SEEK);
    buf.buf[0].fd = h->file.fd;
    buf.buf[0].pos = off;
    reply.Data(&buf);
  });
}

void Release(fuse_req_t req, fuse_ino_t /*ino*/, struct fuse_file_info* fi) {
  Serve(req, "release", [&](Reply& reply) {
    Files().Take(fi->fh);  // closed when no request uses it any more
    reply.Err(0);
  });
}

// Writes land in the staging file (new/ only: other opens are read-only).
void WriteBuf(fuse_req_t req, fuse_ino_t /*ino*/, struct fuse_bufvec* in, off_t off,
              struct fuse_file_info* fi) {
  Serve(req, "write", [&](Reply& reply) {
    std::shared_ptr<OpenFileHandle> h = Files().Get(fi->fh);
    if (h == nullptr || !h->file.writer) return reply.Err(EBADF);
    struct fuse_bufvec out = FUSE_BUFVEC_INIT(fuse_buf_size(in));
    out.buf[0].flags = static_cast<enum fuse_buf_flags>(FUSE_BUF_IS_FD | FUSE_BUF_FD_SEEK);
    out.buf[0].fd = h->file.fd;
    out.buf[0].pos = off;
    ssize_t n = fuse_buf_copy(&out, in, FUSE_BUF_SPLICE_NONBLOCK);
    if (n < 0) return reply.Err(static_cast<int>(-n));
    Table(req)->Wrote(h->file);
    reply.Write(static_cast<size_t>(n));
  });
}

void Fsync(fuse_req_t req, fuse_ino_t /*ino*/, int datasync, struct fuse_file_info* fi) {
  Serve(req, "fsync", [&](Reply& reply) {
    std::shared_ptr<OpenFileHandle> h = Files().Get(fi->fh);
    if (h == nullptr) return reply.Err(EBADF);
    if (h->file.fd < 0) return reply.Err(0);
    int rc = datasync ? ::fdatasync(h->file.fd) : ::fsync(h->file.fd);
    reply.Err(rc == 0 ? 0 : errno);
  });
}

void Flush(fuse_req_t req, fuse_ino_t /*ino*/, struct fuse_file_info* /*fi*/) {
  Serve(req, "flush", [&](Reply& reply) { reply.Err(0); });
}

void Mkdir(fuse_req_t req, fuse_ino_t parent, const char* name, mode_t mode) {
  Serve(req, "mkdir", [&](Reply& reply) {
    const core::Caller caller = CallerOf(req);
    auto a = Table(req)->Mkdir(parent, name, mode, &caller);
    if (!a.ok()) return reply.Fail(a.status());
    reply.Entry(*a);
  });
}

void Create(fuse_req_t req, fuse_ino_t parent, const char* name, mode_t mode,
            struct fuse_file_info* fi) {
  Serve(req, "create", [&](Reply& reply) {
    const core::Caller caller = CallerOf(req);
    auto r = Table(req)->Create(parent, name, mode, fi->flags, &caller);
    if (!r.ok()) return reply.Fail(r.status());
    fi->fh = Files().Add(std::make_shared<OpenFileHandle>(Table(req), std::move(r->second)));
    fi->keep_cache = 0;
    fi->direct_io = 0;
    struct fuse_entry_param e {};
    e.ino = r->first.st.st_ino;
    e.attr = r->first.st;
    e.attr_timeout = r->first.timeout;
    e.entry_timeout = r->first.timeout;
    if (reply.Create(&e, fi) != 0) Files().Take(fi->fh);
  });
}

void Unlink(fuse_req_t req, fuse_ino_t parent, const char* name) {
  Serve(req, "unlink", [&](Reply& reply) {
    const core::Caller caller = CallerOf(req);
    reply.Err(ToErrno(Table(req)->Unlink(parent, name, false, &caller)));
  });
}

void Rmdir(fuse_req_t req, fuse_ino_t parent, const char* name) {
  Serve(req, "rmdir", [&](Reply& reply) {
    const core::Caller caller = CallerOf(req);
    reply.Err(ToErrno(Table(req)->Unlink(parent, name, true, &caller)));
  });
}

void Rename(fuse_req_t req, fuse_ino_t parent, const char* name, fuse_ino_t new_parent,
            const char* new_name, unsigned int flags) {
  Serve(req, "rename", [&](Reply& reply) {
    reply.Err(ToErrno(Table(req)->Rename(parent, name, new_parent, new_name, flags)));
  });
}

void SetAttr(fuse_req_t req, fuse_ino_t ino, struct stat* attr, int to_set,
             struct fuse_file_info* fi) {
  Serve(req, "setattr", [&](Reply& reply) {
    std::shared_ptr<OpenFileHandle> h = fi != nullptr ? Files().Get(fi->fh) : nullptr;
    auto a = Table(req)->SetAttr(ino, *attr, to_set, h != nullptr ? h->file.fd : -1);
    if (!a.ok()) return reply.Fail(a.status());
    reply.Attr(*a);
  });
}

void StatFs(fuse_req_t req, fuse_ino_t /*ino*/) {
  Serve(req, "statfs", [&](Reply& reply) {
    struct statvfs sv {};
    if (::statvfs(Table(req)->source().c_str(), &sv) != 0) return reply.Err(errno);
    reply.Statfs(&sv);
  });
}

void ReplyXattr(Reply& reply, const std::string& value, size_t size) {
  if (size == 0) {
    reply.XattrSize(value.size());
  } else if (size < value.size()) {
    reply.Err(ERANGE);
  } else {
    reply.Buf(value.data(), value.size());
  }
}

void GetXattr(fuse_req_t req, fuse_ino_t ino, const char* name, size_t size) {
  Serve(req, "getxattr", [&](Reply& reply) {
    const core::Caller caller = CallerOf(req);
    auto v = Table(req)->GetXattr(ino, name, &caller);
    if (!v.ok()) return reply.Fail(v.status());
    ReplyXattr(reply, *v, size);
  });
}

void ListXattr(fuse_req_t req, fuse_ino_t ino, size_t size) {
  Serve(req, "listxattr", [&](Reply& reply) {
    std::string names;
    const core::Caller caller = CallerOf(req);
    for (const std::string& n : Table(req)->ListXattr(ino, &caller)) names += n + '\0';
    ReplyXattr(reply, names, size);
  });
}

// Links and special files are never part of a checkpoint, and xattrs of the
// source are not ours to change: refused everywhere.
void Mknod(fuse_req_t req, fuse_ino_t parent, const char* name, mode_t, dev_t) {
  Serve(req, "mknod", [&](Reply& reply) {
    reply.Fail(Table(req)->RefuseSpecial(parent, name, "device node or fifo"));
  });
}
void Symlink(fuse_req_t req, const char*, fuse_ino_t parent, const char* name) {
  Serve(req, "symlink", [&](Reply& reply) {
    reply.Fail(Table(req)->RefuseSpecial(parent, name, "symbolic link"));
  });
}
void Link(fuse_req_t req, fuse_ino_t, fuse_ino_t parent, const char* name) {
  Serve(req, "link",
        [&](Reply& reply) { reply.Fail(Table(req)->RefuseSpecial(parent, name, "hard link")); });
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
