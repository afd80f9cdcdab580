#include "fs/committer.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>  // renameat2, RENAME_NOREPLACE (glibc >= 2.28, _GNU_SOURCE)
#include <ctime>
#include <filesystem>
#include <fstream>

#include "core/averaging.h"
#include "core/checkpoint.h"
#include "core/file_util.h"
#include "core/log.h"
#include "core/meta.h"
#include "index/resolver.h"

namespace ckptfs::fs {

using core::LogLevel;
using core::Status;
using Clock = std::chrono::steady_clock;

namespace {

Status FsyncPath(const std::string& path, bool directory) {
  int fd = ::open(path.c_str(), (directory ? O_RDONLY | O_DIRECTORY : O_RDONLY) | O_CLOEXEC);
  if (fd < 0) return Status::FromErrno(path, errno);
  int rc = ::fsync(fd);
  int err = errno;
  ::close(fd);
  return rc == 0 ? Status::Ok() : Status::FromErrno("fsync " + path, err);
}

// Walks a staged tree: regular files and directories only; fsyncs each when
// `sync`, checks tensor files are complete when `check`, and mixes every
// entry's name, size and mtime into *fingerprint when given.
Status Walk(const std::string& path, bool sync, bool check, int depth = 0, uint64_t* fingerprint = nullptr) {
  if (depth > 32) return Status::InvalidArgument(path + ": nested too deeply");
  struct stat st {};
  if (::lstat(path.c_str(), &st) != 0) return Status::FromErrno(path, errno);
  if (fingerprint != nullptr) {
    *fingerprint = core::Fnv1a(path + ':' + std::to_string(st.st_size) + ':' +
                                   std::to_string(st.st_mtim.tv_sec) + '.' + std::to_string(st.st_mtim.tv_nsec),
                               *fingerprint);
  }
  if (S_ISREG(st.st_mode)) {
    if (check) {
      if (Status s = core::CheckTensorFileComplete(path); !s.ok()) return s;
    }
    return sync ? FsyncPath(path, false) : Status::Ok();
  }
  if (!S_ISDIR(st.st_mode)) {
    return Status::InvalidArgument(path + ": a symbolic link or special file cannot be committed");
  }
  DIR* d = ::opendir(path.c_str());
  if (d == nullptr) return Status::FromErrno(path, errno);
  std::vector<std::string> names;
  while (struct dirent* e = ::readdir(d)) {
    std::string n = e->d_name;
    if (n != "." && n != "..") names.push_back(n);
  }
  ::closedir(d);
  for (const std::string& n : names) {
    if (Status s = Walk(path + "/" + n, sync, check, depth + 1, fingerprint); !s.ok()) return s;
  }
  return sync ? FsyncPath(path, true) : Status::Ok();
}

// rename(2) that never replaces `to`: kExists when `to` is taken. Filesystems
// without RENAME_NOREPLACE (EINVAL) get a check and a plain rename, the best
// they allow.
Status RenameNoReplace(const std::string& from, const std::string& to) {
  if (::renameat2(AT_FDCWD, from.c_str(), AT_FDCWD, to.c_str(), RENAME_NOREPLACE) == 0) {
    return Status::Ok();
  }
  int err = errno;
  if (err == EINVAL || err == ENOSYS) {
    struct stat st {};
    if (::lstat(to.c_str(), &st) == 0) {
      err = EEXIST;
    } else {
      err = ::rename(from.c_str(), to.c_str()) == 0 ? 0 : errno;
    }
  }
  if (err == 0) return Status::Ok();
  if (err == EEXIST) return Status::Exists(to + " already exists");
  return Status::FromErrno("commit " + from + " -> " + to, err);
}

bool Exists(const std::string& path) {
  struct stat st {};
  return ::lstat(path.c_str(), &st) == 0;
}

// What a staged tree looks like now (names, sizes, mtimes).
uint64_t FingerprintOf(const std::string& top) {
  uint64_t fp = core::Fnv1a("");
  (void)Walk(top, false, false, 0, &fp);  // a tree that cannot be walked still changes its print
  return fp;
}

bool IsDecimalName(const char* s) {
  if (*s == '\0') return false;
  for (; *s != '\0'; ++s) {
    if (*s < '0' || *s > '9') return false;
  }
  return true;
}

// Whether another process has a file at or below `top` open for writing:
// --direct-new writers write the staging area directly, unseen by the
// daemon, so their descriptors are looked up in /proc (as fuser does).
bool WriterOpenBelow(const std::string& top) {
  DIR* proc = ::opendir("/proc");
  if (proc == nullptr) return false;
  const std::string self = std::to_string(::getpid());
  bool found = false;
  while (struct dirent* p = ::readdir(proc)) {
    if (found) break;
    if (!IsDecimalName(p->d_name) || self == p->d_name) continue;
    const std::string fd_dir = std::string("/proc/") + p->d_name + "/fd";
    DIR* fds = ::opendir(fd_dir.c_str());
    if (fds == nullptr) continue;  // gone, or not ours to see
    while (struct dirent* f = ::readdir(fds)) {
      if (!IsDecimalName(f->d_name)) continue;
      char target[4096];
      const ssize_t n = ::readlink((fd_dir + "/" + f->d_name).c_str(), target, sizeof(target) - 1);
      if (n <= 0) continue;
      target[n] = '\0';
      const std::string t(target, static_cast<size_t>(n));
      if (t != top && t.compare(0, top.size() + 1, top + "/") != 0) continue;
      std::ifstream info(std::string("/proc/") + p->d_name + "/fdinfo/" + f->d_name);
      std::string key;
      unsigned long flags = 0;
      while (info >> key) {
        if (key == "flags:") {
          info >> std::oct >> flags;
          break;
        }
      }
      if ((flags & O_ACCMODE) != O_RDONLY) {
        found = true;
        break;
      }
    }
    ::closedir(fds);
  }
  ::closedir(proc);
  return found;
}

}  // namespace

Committer::Committer(Settings settings, OnCommitted on_committed)
    : settings_(settings), on_committed_(std::move(on_committed)) {}

Committer::~Committer() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  wake_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void Committer::Start() {
  thread_ = std::thread([this] { core::CatchAndLog("committer", [this] { Loop(); }); });
}

bool Committer::Split(const std::string& path, std::string* experiment, std::string* name) {
  const std::string marker = std::string("/") + index::kStagingDir + "/";
  size_t at = path.find(marker);
  if (at == std::string::npos) return false;
  *experiment = path.substr(0, at);
  std::string rest = path.substr(at + marker.size());
  *name = rest.substr(0, rest.find('/'));
  // new/NAME.commit marks the single file NAME.
  const std::string suffix = kCommitMarker;
  if (rest.find('/') == std::string::npos && name->size() > suffix.size() &&
      name->compare(name->size() - suffix.size(), suffix.size(), suffix) == 0) {
    name->resize(name->size() - suffix.size());
  }
  return !name->empty();
}

void Committer::Touched(const std::string& path) {
  std::string exp, name;
  if (!Split(path, &exp, &name)) return;
  {
    std::lock_guard<std::mutex> lock(mu_);
    Staged& s = staged_[{exp, name}];
    s.last = Clock::now();
  }
  wake_.notify_all();
}

void Committer::OpenedForWrite(const std::string& path) {
  std::string exp, name;
  if (!Split(path, &exp, &name)) return;
  std::lock_guard<std::mutex> lock(mu_);
  Staged& s = staged_[{exp, name}];
  ++s.writers;
  s.last = Clock::now();
}

void Committer::ClosedForWrite(const std::string& path) {
  std::string exp, name;
  if (!Split(path, &exp, &name)) return;
  {
    std::lock_guard<std::mutex> lock(mu_);
    Staged& s = staged_[{exp, name}];
    if (s.writers > 0) --s.writers;
    s.last = Clock::now();
  }
  wake_.notify_all();
}

Status Committer::CheckReady(const std::string& top) {
  const std::string name = top.substr(top.rfind('/') + 1);
  struct stat st {};
  if (::lstat(top.c_str(), &st) != 0) return Status::FromErrno(top, errno);
  if (S_ISDIR(st.st_mode)) {
    auto has = [&](const char* f) { return Exists(top + "/" + f); };
    if (!core::DirectoryLayout(name, has("CKPT.yaml"), has("meta.json"), has("trainer_state.json"))) {
      return Status::NotFound(top + ": not a checkpoint yet (no CKPT.yaml, meta.json, or "
                              "trainer_state.json in a checkpoint-N directory)");
    }
  } else if (S_ISREG(st.st_mode)) {
    if (!core::ParseSingleFileName(name)) {
      return Status::InvalidArgument(top + ": not a checkpoint file name (e.g. epoch=3-step=100.ckpt)");
    }
  }
  return Walk(top, /*sync=*/false, /*check=*/true);
}

Status Committer::Commit(const std::string& experiment, const std::string& name) {
  const std::string staging = index::StagingDir(experiment);
  const std::string top = staging + "/" + name;
  const std::string target = experiment + "/" + name;
  if (Status s = Walk(top, /*sync=*/true, /*check=*/false); !s.ok()) return s;
  // The name is claimed by the rename itself: a check before it would leave
  // a window in which a checkpoint written straight into the source under
  // the same name is silently replaced (a file) or made to fail later (a
  // directory). RENAME_NOREPLACE makes "exists" and "moved" one decision.
  if (Status s = RenameNoReplace(top, target); !s.ok()) {
    if (s.code() == core::StatusCode::kExists) {
      return Status::Exists(
          "cannot commit " + top + " as " + target +
          ": the experiment already has that name (written there directly?); new/" + name +
          " stays staged (remove or rename one of them)");
    }
    return s;
  }
  return FsyncPath(experiment, true);
}

int Committer::CommitReady() {
  std::vector<std::pair<std::string, std::string>> candidates;
  // With the print and whether a writer was open at the last look.
  std::vector<std::pair<std::pair<std::string, std::string>, std::pair<uint64_t, bool>>> quiet_ones;
  const auto now = Clock::now();
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& [key, s] : staged_) {
      const std::string top = index::StagingDir(key.first) + "/" + key.second;
      const bool marked = Exists(top + "/" + kCommitMarker) || Exists(top + kCommitMarker);
      const bool quiet = !settings_.explicit_only && s.writers == 0 && now - s.last >= settings_.quiet;
      if (marked || (quiet && !settings_.direct)) {
        candidates.push_back(key);
      } else if (quiet) {
        quiet_ones.push_back({key, {s.fingerprint, s.writer_seen}});
      }
    }
  }
  // --direct-new: quiet as far as the daemon saw; the disk and /proc must
  // agree: a tree that changed, or a file still open for writing, starts
  // another quiet period.
  for (const auto& [key, last] : quiet_ones) {
    const std::string top = index::StagingDir(key.first) + "/" + key.second;
    const uint64_t print = FingerprintOf(top);
    const bool writer = WriterOpenBelow(top);
    // A writer seen at the last look has closed since: the quiet period
    // starts now, as it does when the daemon sees a close.
    if (print == last.first && !writer && !last.second) {
      candidates.push_back(key);
      continue;
    }
    std::lock_guard<std::mutex> lock(mu_);
    Staged& st = staged_[key];
    st.fingerprint = print;
    st.writer_seen = writer;
    st.last = Clock::now();
  }
  int committed = 0;
  for (const auto& [exp, name] : candidates) {
    const std::string top = index::StagingDir(exp) + "/" + name;
    if (!Exists(top)) {  // removed by the writer, or already committed
      std::lock_guard<std::mutex> lock(mu_);
      staged_.erase({exp, name});
      continue;
    }
    // The marker is the writer's signal, not part of the checkpoint.
    ::unlink((top + "/" + kCommitMarker).c_str());
    const bool was_marked = ::unlink((top + kCommitMarker).c_str()) == 0;
    Status s = CheckReady(top);
    if (s.ok()) s = Commit(exp, name);
    if (!s.ok()) {
      std::lock_guard<std::mutex> lock(mu_);
      Staged& st = staged_[{exp, name}];
      if (st.reported != s.message()) {
        core::Log(LogLevel::kWarning, "new/%s not committed: %s", name.c_str(), s.message().c_str());
        st.reported = s.message();
      }
      st.last = Clock::now();  // look again after another quiet period
      if (was_marked) core::Log(LogLevel::kWarning, "new/%s: explicit commit refused", name.c_str());
      continue;
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      staged_.erase({exp, name});
    }
    core::Log(LogLevel::kInfo, "committed %s/%s", exp.c_str(), name.c_str());
    ++committed;
    if (on_committed_) on_committed_(exp, name);
  }
  return committed;
}

void Committer::Loop() {
  std::unique_lock<std::mutex> lock(mu_);
  while (!stop_) {
    wake_.wait_for(lock, std::chrono::milliseconds(100));
    if (stop_) break;
    if (staged_.empty()) continue;
    lock.unlock();
    core::CatchAndLog("committer", [this] { CommitReady(); });
    lock.lock();
  }
}

std::vector<std::string> Committer::RecoverStaging(const std::string& experiment) {
  std::vector<std::string> moved;
  const std::string staging = index::StagingDir(experiment);
  DIR* d = ::opendir(staging.c_str());
  if (d == nullptr) return moved;
  std::vector<std::string> names;
  while (struct dirent* e = ::readdir(d)) {
    std::string n = e->d_name;
    if (n != "." && n != "..") names.push_back(n);
  }
  ::closedir(d);
  const std::string abandoned = experiment + "/" + index::kAbandonedDir;
  for (const std::string& n : names) {
    ::mkdir(abandoned.c_str(), 0700);
    const std::string to = abandoned + "/" + n + "." + std::to_string(std::time(nullptr));
    if (::rename((staging + "/" + n).c_str(), to.c_str()) == 0) {
      core::Log(LogLevel::kWarning,
                "new/%s was being written when ckptfs stopped; not committed, moved to %s",
                n.c_str(), to.c_str());
      moved.push_back(to);
    }
  }
  ::rmdir(staging.c_str());
  return moved;
}

}  // namespace ckptfs::fs
