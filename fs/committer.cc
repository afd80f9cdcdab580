#include "fs/committer.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>  // renameat2, RENAME_NOREPLACE (glibc >= 2.28, _GNU_SOURCE)
#include <cstring>
#include <ctime>
#include <fstream>
#include <map>

#include "core/averaging.h"
#include "core/checkpoint.h"
#include "core/file_util.h"
#include "core/log.h"
#include "core/meta.h"
#include "core/retention.h"
#include "index/resolver.h"

namespace ckptfs::fs {

using core::LogLevel;
using core::Status;

namespace {

// Walks the staged entry `name` of dir_fd (what: its path, for messages):
// regular files and directories only, each opened beneath its parent's
// descriptor without following a link; fsyncs each when `sync`, checks
// tensor files are complete when `check`, and mixes every entry's name, size
// and mtime into *fingerprint when given.
Status Walk(int dir_fd, const std::string& name, const std::string& what, bool sync, bool check,
            int depth = 0, uint64_t* fingerprint = nullptr) {
  if (depth > 32) return Status::InvalidArgument(what + ": nested too deeply");
  struct stat st {};
  if (::fstatat(dir_fd, name.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0) {
    return Status::FromErrno(what, errno);
  }
  if (fingerprint != nullptr) {
    *fingerprint = core::Fnv1a(what + ':' + std::to_string(st.st_size) + ':' +
                                   std::to_string(st.st_mtim.tv_sec) + '.' +
                                   std::to_string(st.st_mtim.tv_nsec),
                               *fingerprint);
  }
  if (!S_ISREG(st.st_mode) && !S_ISDIR(st.st_mode)) {
    return Status::InvalidArgument(what + ": a symbolic link or special file cannot be committed");
  }
  if (S_ISREG(st.st_mode) && !sync && !check) return Status::Ok();
  const int flags = S_ISDIR(st.st_mode) ? O_RDONLY | O_DIRECTORY : O_RDONLY | O_NONBLOCK;
  const int raw = ::openat(dir_fd, name.c_str(), flags | O_NOFOLLOW | O_CLOEXEC);
  if (raw < 0) return Status::FromErrno(what, errno);
  core::ScopedFd fd(raw);
  struct stat again {};
  if (::fstat(fd.get(), &again) != 0) return Status::FromErrno(what, errno);
  if (again.st_ino != st.st_ino || again.st_dev != st.st_dev) {
    return Status::InvalidArgument(what + ": replaced while it was read; not committed");
  }
  if (S_ISREG(st.st_mode)) {
    if (check) {
      // The very file opened above, whatever its name now points to.
      const std::string self = "/proc/self/fd/" + std::to_string(fd.get());
      if (Status s = core::CheckTensorFileComplete(self); !s.ok()) {
        std::string message = s.message();
        for (size_t at = message.find(self); at != std::string::npos; at = message.find(self)) {
          message.replace(at, self.size(), what);
        }
        return Status::InvalidArgument(message);
      }
    }
    if (sync && ::fsync(fd.get()) != 0) return Status::FromErrno("fsync " + what, errno);
    return Status::Ok();
  }
  core::Result<std::vector<std::string>> names = core::ListDirAt(fd.get(), what);
  if (!names.ok()) return names.status();
  for (const std::string& n : *names) {
    if (Status s = Walk(fd.get(), n, what + "/" + n, sync, check, depth + 1, fingerprint);
        !s.ok()) {
      return s;
    }
  }
  if (sync && ::fsync(fd.get()) != 0) return Status::FromErrno("fsync " + what, errno);
  return Status::Ok();
}

// renameat2 between directory descriptors that never replaces `to`: kExists
// when `to` is taken. Filesystems without RENAME_NOREPLACE (EINVAL) get a
// check and a plain rename, the best they allow.
Status RenameNoReplace(int from_dir, const std::string& from, int to_dir, const std::string& to,
                       const std::string& what) {
  if (::renameat2(from_dir, from.c_str(), to_dir, to.c_str(), RENAME_NOREPLACE) == 0) {
    return Status::Ok();
  }
  int err = errno;
  if (err == EINVAL || err == ENOSYS) {
    struct stat st {};
    if (::fstatat(to_dir, to.c_str(), &st, AT_SYMLINK_NOFOLLOW) == 0) {
      err = EEXIST;
    } else {
      err = ::renameat(from_dir, from.c_str(), to_dir, to.c_str()) == 0 ? 0 : errno;
    }
  }
  if (err == 0) return Status::Ok();
  if (err == EEXIST) return Status::Exists(what + " already exists");
  return Status::FromErrno("commit " + what, err);
}

// A new version replaces the committed one in one step: the two are
// exchanged, so a reader finds either whole at the name, never neither;
// then the old one, now in staging, is removed (its files' inodes live on
// while a reader holds them open). If the experiment's entry turns out not
// to be the version this one started from (replaced in the meantime), the
// exchange is undone and kExists returned: nothing is lost either way.
Status ReplaceCommitted(int exp_fd, int staging_fd, const std::string& experiment,
                        const std::string& name, dev_t old_dev, ino_t old_ino) {
  const std::string what = experiment + "/" + name;
  if (::renameat2(staging_fd, name.c_str(), exp_fd, name.c_str(), RENAME_EXCHANGE) != 0) {
    return Status::FromErrno("replace " + what, errno);
  }
  struct stat old {};
  if (::fstatat(staging_fd, name.c_str(), &old, AT_SYMLINK_NOFOLLOW) != 0 ||
      old.st_dev != old_dev || old.st_ino != old_ino) {
    ::renameat2(staging_fd, name.c_str(), exp_fd, name.c_str(), RENAME_EXCHANGE);
    return Status::Exists(what +
                          " was replaced while its new version was written through new/; "
                          "the new version stays staged");
  }
  if (::fsync(exp_fd) != 0) return Status::FromErrno("fsync " + experiment, errno);
  core::Log(LogLevel::kInfo, "new version of %s replaces the old one", what.c_str());
  return core::RemoveTreeAt(staging_fd, name,
                            experiment + "/" + core::kStagingDir + "/" + name + " (old version)");
}

// What a staged tree looks like now (names, sizes, mtimes).
uint64_t FingerprintOf(int staging_fd, const std::string& name, const std::string& top) {
  uint64_t fp = core::Fnv1a("");
  // A tree that cannot be walked still changes its print.
  (void)Walk(staging_fd, name, top, false, false, 0, &fp);
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

Committer::Committer(const core::Beneath* source, Settings settings, OnCommitted on_committed)
    : source_(source), settings_(settings), on_committed_(std::move(on_committed)) {}

core::Result<core::ScopedFd> Committer::OpenStaging(const std::string& experiment, bool create) {
  core::Result<core::ScopedFd> fd =
      core::OpenOwnDirUnder(*source_, experiment, core::kStagingDir, create);
  if (!fd.ok() && fd.status().code() == core::StatusCode::kPermission) {
    bool first;
    {
      std::lock_guard<std::mutex> lock(mu_);
      first = refusals_.insert(fd.status().message()).second;
    }
    if (first) {
      core::Log(LogLevel::kError, "new/ disabled for %s: %s", experiment.c_str(),
                fd.status().message().c_str());
    }
  }
  return fd;
}

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

Status Committer::CheckReady(int staging_fd, const std::string& staging, const std::string& name) {
  const std::string top = staging + "/" + name;
  struct stat st {};
  if (::fstatat(staging_fd, name.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0) {
    return Status::FromErrno(top, errno);
  }
  if (S_ISDIR(st.st_mode)) {
    auto has = [&](const char* f) { return core::ExistsBeneath(staging_fd, name + "/" + f); };
    if (!core::DirectoryLayout(name, has("CKPT.yaml"), has("meta.json"),
                               has("trainer_state.json"))) {
      return Status::NotFound(top +
                              ": not a checkpoint yet (no CKPT.yaml, meta.json, or "
                              "trainer_state.json in a checkpoint-N directory)");
    }
  }
  // A file of any name commits (new/ is the experiment: Lightning's
  // last.ckpt is a file of it like epoch=3-step=100.ckpt); whether the index
  // sees a checkpoint in it is the name's business. A tensor file must be
  // complete either way (Walk's check).
  return Walk(staging_fd, name, top, /*sync=*/false, /*check=*/true);
}

Status Committer::Commit(const std::string& experiment, const std::string& name,
                         const Staged& staged) {
  core::Result<core::ScopedFd> exp = source_->OpenAt(experiment, O_RDONLY | O_DIRECTORY);
  if (!exp.ok()) return exp.status();
  core::Result<core::ScopedFd> staging =
      core::OpenOwnDir(exp->get(), experiment, core::kStagingDir, ::geteuid(), false);
  if (!staging.ok()) return staging.status();
  const std::string top = index::StagingDir(experiment) + "/" + name;
  const std::string target = experiment + "/" + name;
  if (Status s = Walk(staging->get(), name, top, /*sync=*/true, /*check=*/false); !s.ok()) return s;
  // From here no write through the mount can start on this entry (each
  // takes write_mu_ shared): if one happened since the decision, or a file
  // is open for writing, the commit waits for another look (EAGAIN).
  std::unique_lock<std::shared_mutex> sealed(write_mu_);
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = staged_.find({experiment, name});
    if (it != staged_.end() && (it->second.writers > 0 || it->second.last != staged.last)) {
      return Status::FromErrno(top + ": written while being committed", EAGAIN);
    }
  }
  // The marker is the writer's signal, not part of the checkpoint.
  if (auto dir = core::OpenBeneathFd(staging->get(), name, O_RDONLY | O_DIRECTORY, 0, name);
      dir.ok()) {
    ::unlinkat(dir->get(), kCommitMarker, 0);
  }
  ::unlinkat(staging->get(), (name + kCommitMarker).c_str(), 0);
  // The name is claimed by the rename itself: a check before it would leave
  // a window in which a checkpoint written straight into the source under
  // the same name is silently replaced (a file) or made to fail later (a
  // directory). RENAME_NOREPLACE makes "exists" and "moved" one decision.
  struct stat committed {};
  if (staged.replaces &&
      ::fstatat(exp->get(), name.c_str(), &committed, AT_SYMLINK_NOFOLLOW) == 0 &&
      committed.st_dev == staged.old_dev && committed.st_ino == staged.old_ino &&
      committed.st_ctim.tv_sec == staged.old_ctime.tv_sec &&
      committed.st_ctim.tv_nsec == staged.old_ctime.tv_nsec) {
    return ReplaceCommitted(exp->get(), staging->get(), experiment, name, staged.old_dev,
                            staged.old_ino);
  }
  if (Status s = RenameNoReplace(staging->get(), name, exp->get(), name, top + " -> " + target);
      !s.ok()) {
    if (s.code() == core::StatusCode::kExists) {
      return Status::Exists(
          "cannot commit " + top + " as " + target +
          ": the experiment already has that name (written there directly?); new/" + name +
          " stays staged (remove or rename one of them)");
    }
    return s;
  }
  if (::fsync(exp->get()) != 0) return Status::FromErrno("fsync " + experiment, errno);
  return Status::Ok();
}

int Committer::CommitReady() { return CommitCandidates(false); }

int Committer::CommitCandidates(bool at_exit) {
  std::vector<std::pair<std::string, std::string>> candidates;
  // With the print and whether a writer was open at the last look.
  std::vector<std::pair<std::pair<std::string, std::string>, std::pair<uint64_t, bool>>> quiet_ones;
  std::vector<std::pair<std::string, std::string>> maybe_marked;
  // Quiet candidates not yet quiet for `wait`: they must hold every file of
  // their predecessor.
  std::set<std::pair<std::string, std::string>> must_be_whole;
  const auto now = Clock::now();
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& [key, s] : staged_) {
      // At exit every writer is gone and nothing more will come: quiet.
      const bool quiet = !settings_.explicit_only && s.writers == 0 &&
                         (at_exit || now - s.last >= settings_.quiet);
      if (quiet && (at_exit || now - s.last < settings_.wait)) must_be_whole.insert(key);
      if (quiet && (!settings_.direct || at_exit)) {
        candidates.push_back(key);
      } else if (quiet) {
        quiet_ones.push_back({key, {s.fingerprint, s.writer_seen}});
      } else {
        maybe_marked.push_back(key);
      }
    }
  }
  // Staging directories, opened (and checked) once per experiment per look.
  std::map<std::string, core::Result<core::ScopedFd>> stagings;
  auto staging_of = [&](const std::string& exp) -> int {
    auto it = stagings.find(exp);
    if (it == stagings.end()) it = stagings.emplace(exp, OpenStaging(exp, false)).first;
    return it->second.ok() ? it->second->get() : -1;
  };
  // An explicit marker commits at once, quiet or not.
  for (const auto& key : maybe_marked) {
    const int fd = staging_of(key.first);
    if (fd >= 0 && (core::ExistsBeneath(fd, key.second + "/" + kCommitMarker) ||
                    core::ExistsBeneath(fd, key.second + kCommitMarker))) {
      candidates.push_back(key);
    }
  }
  for (auto it = quiet_ones.begin(); it != quiet_ones.end();) {
    const int fd = staging_of(it->first.first);
    if (fd >= 0 && (core::ExistsBeneath(fd, it->first.second + "/" + kCommitMarker) ||
                    core::ExistsBeneath(fd, it->first.second + kCommitMarker))) {
      candidates.push_back(it->first);
      it = quiet_ones.erase(it);
    } else {
      ++it;
    }
  }
  // --direct-new: quiet as far as the daemon saw; the disk and /proc must
  // agree: a tree that changed, or a file still open for writing, starts
  // another quiet period.
  for (const auto& [key, last] : quiet_ones) {
    const std::string top = index::StagingDir(key.first) + "/" + key.second;
    const int fd = staging_of(key.first);
    const uint64_t print = fd >= 0 ? FingerprintOf(fd, key.second, top) : 0;
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
    const int staging_fd = staging_of(exp);
    if (staging_fd >= 0 && must_be_whole.count({exp, name}) != 0 &&
        !core::ExistsBeneath(staging_fd, name + "/" + kCommitMarker) &&
        !core::ExistsBeneath(staging_fd, name + kCommitMarker) &&
        !HoldsPredecessorFiles(staging_fd, exp, name)) {
      continue;  // logged by HoldsPredecessorFiles; looked at again later
    }
    struct stat top_st {};
    if (staging_fd >= 0 && ::fstatat(staging_fd, name.c_str(), &top_st, AT_SYMLINK_NOFOLLOW) != 0) {
      // Removed by the writer, or already committed.
      std::lock_guard<std::mutex> lock(mu_);
      staged_.erase({exp, name});
      continue;
    }
    Status s;
    bool marked = false;
    if (staging_fd < 0) {
      s = stagings.at(exp).status();
    } else {
      marked = core::ExistsBeneath(staging_fd, name + "/" + kCommitMarker) ||
               core::ExistsBeneath(staging_fd, name + kCommitMarker);
      Staged st;
      {
        std::lock_guard<std::mutex> lock(mu_);
        st = staged_[{exp, name}];
      }
      // Never while a file of it is open for writing through the mount,
      // marker or not: those writes would land in the committed checkpoint.
      if (st.writers > 0) continue;
      s = CheckReady(staging_fd, index::StagingDir(exp), name);
      if (s.ok()) s = Commit(exp, name, st);
      if (!s.ok() && s.sys_errno() == EAGAIN) continue;  // written meanwhile: look again later
    }
    if (!s.ok()) {
      std::lock_guard<std::mutex> lock(mu_);
      Staged& st = staged_[{exp, name}];
      if (st.reported != s.message()) {
        core::Log(LogLevel::kWarning, "new/%s not committed: %s", name.c_str(),
                  s.message().c_str());
        st.reported = s.message();
      }
      st.last = Clock::now();  // look again after another quiet period
      if (marked && staging_fd >= 0) {
        // The signal was answered: the writer signals again once it fixed it.
        if (auto top = core::OpenBeneathFd(staging_fd, name, O_RDONLY | O_DIRECTORY, 0, name);
            top.ok()) {
          ::unlinkat(top->get(), kCommitMarker, 0);
        }
        ::unlinkat(staging_fd, (name + kCommitMarker).c_str(), 0);
        core::Log(LogLevel::kWarning, "new/%s: explicit commit refused", name.c_str());
      }
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
    if (staged_.empty() && deleting_.empty()) continue;
    lock.unlock();
    core::CatchAndLog("committer", [this] {
      CommitReady();
      ExpireDeletions(false);
    });
    lock.lock();
  }
}

bool Committer::HoldsPredecessorFiles(int staging_fd, const std::string& experiment,
                                      const std::string& name) {
  struct stat st {};
  if (::fstatat(staging_fd, name.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0 || !S_ISDIR(st.st_mode)) {
    return true;  // single files: quiet and a complete tensor file are all there is
  }
  auto has = [&](const char* f) { return core::ExistsBeneath(staging_fd, name + "/" + f); };
  std::optional<core::Layout> layout =
      core::DirectoryLayout(name, has("CKPT.yaml"), has("meta.json"), has("trainer_state.json"));
  if (!layout) return true;  // CheckReady says why it waits
  bool version = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = staged_.find({experiment, name});
    version = it != staged_.end() && it->second.replaces;
  }
  // A new version's predecessor is the committed version it started from:
  // the files it was made of.
  std::optional<std::vector<std::string>> previous;
  if (version) {
    core::Result<core::ScopedFd> top =
        core::OpenBeneathFd(staging_fd, name, O_RDONLY | O_DIRECTORY, 0, name);
    if (top.ok()) {
      core::Result<std::vector<std::string>> names = core::ListDirAt(top->get(), name);
      if (names.ok()) previous = std::move(*names);
    }
  } else if (previous_files_) {
    previous = previous_files_(experiment, name, core::MetaFileName(*layout));
  }
  if (!previous) return true;
  // A new version starts with links to every committed file: a file still
  // shared with the committed version (more than one link) is one the
  // writer has not written yet.
  std::vector<std::string> missing;
  for (const std::string& f : *previous) {
    struct stat fst {};
    const std::string rel = name + "/" + f;
    if (::fstatat(staging_fd, rel.c_str(), &fst, AT_SYMLINK_NOFOLLOW) != 0 ||
        (version && S_ISREG(fst.st_mode) && fst.st_nlink > 1)) {
      missing.push_back(f);
    }
  }
  if (missing.empty()) return true;
  std::string list;
  for (const std::string& f : missing) list += (list.empty() ? "" : ", ") + f;
  const std::string reason =
      (version ? "has not rewritten " : "lacks ") + list + " of the previous checkpoint";
  std::lock_guard<std::mutex> lock(mu_);
  Staged& s = staged_[{experiment, name}];
  if (s.reported != reason) {
    core::Log(LogLevel::kInfo, "new/%s waits: %s (committed after %lld s quiet)", name.c_str(),
              reason.c_str(), static_cast<long long>(settings_.wait.count() / 1000));
    s.reported = reason;
  }
  return false;
}

int Committer::StopAndCommit() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  wake_.notify_all();
  if (thread_.joinable()) thread_.join();
  const int committed = CommitCandidates(/*at_exit=*/true);
  ExpireDeletions(/*everything=*/true);
  return committed;
}

std::vector<std::string> Committer::RecoverStaging(const core::Beneath& source,
                                                   const std::string& experiment) {
  std::vector<std::string> moved;
  core::Result<core::ScopedFd> exp = source.OpenAt(experiment, O_RDONLY | O_DIRECTORY);
  if (!exp.ok()) return moved;
  const uid_t self = ::geteuid();
  core::Result<core::ScopedFd> staging =
      core::OpenOwnDir(exp->get(), experiment, core::kStagingDir, self, false);
  if (!staging.ok()) {
    if (staging.status().code() != core::StatusCode::kNotFound) {
      core::Log(LogLevel::kError, "staging recovery skipped: %s",
                staging.status().message().c_str());
    }
    return moved;
  }
  const std::string staging_path = index::StagingDir(experiment);
  core::Result<std::vector<std::string>> names = core::ListDirAt(staging->get(), staging_path);
  if (!names.ok() || names->empty()) {
    if (names.ok()) ::unlinkat(exp->get(), core::kStagingDir, AT_REMOVEDIR);
    return moved;
  }
  core::Result<core::ScopedFd> abandoned =
      core::OpenOwnDir(exp->get(), experiment, core::kAbandonedDir, self, true);
  if (!abandoned.ok()) {
    core::Log(LogLevel::kError, "staging recovery skipped (what %s holds stays there): %s",
              staging_path.c_str(), abandoned.status().message().c_str());
    return moved;
  }
  const std::string abandoned_path = experiment + "/" + core::kAbandonedDir;
  for (const std::string& n : *names) {
    const std::string to = n + "." + std::to_string(std::time(nullptr));
    if (::renameat2(staging->get(), n.c_str(), abandoned->get(), to.c_str(), RENAME_NOREPLACE) ==
        0) {
      core::Log(LogLevel::kWarning,
                "new/%s was being written when ckptfs stopped; not committed, moved to %s/%s",
                n.c_str(), abandoned_path.c_str(), to.c_str());
      moved.push_back(abandoned_path + "/" + to);
    } else {
      core::Log(LogLevel::kError, "cannot move %s/%s to %s: %s", staging_path.c_str(), n.c_str(),
                abandoned_path.c_str(), std::strerror(errno));
    }
  }
  ::unlinkat(exp->get(), core::kStagingDir, AT_REMOVEDIR);
  return moved;
}

}  // namespace ckptfs::fs
