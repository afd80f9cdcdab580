#include "core/average_cache.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <ctime>

#include "core/file_util.h"
#include "core/log.h"
#include "core/meta.h"

namespace ckptfs::core {
namespace {

// Bumped when the averaging output changes, so old results are not reused.
constexpr char kVersion[] = "ckptfs-average-v1";
constexpr int64_t kStaleTmpSeconds = 3600;

}  // namespace

AverageCache::AverageCache(std::string dir, int64_t max_bytes)
    : dir_(std::move(dir)), max_bytes_(max_bytes) {}

namespace {

// What identifies a member's content: path, size, mtime, device, inode,
// ctime; of the open file fd when fd >= 0.
Result<std::string> IdentityOf(const std::string& m, int fd = -1) {
  struct stat st {};
  if ((fd >= 0 ? ::fstat(fd, &st) : ::stat(m.c_str(), &st)) != 0)
    return Status::FromErrno(m, errno);
  if (!S_ISREG(st.st_mode)) return Status::InvalidArgument(m + ": not a regular file");
  return m + "|" + std::to_string(st.st_size) + "|" + std::to_string(st.st_mtim.tv_sec) + "." +
         std::to_string(st.st_mtim.tv_nsec) + "|" + std::to_string(st.st_dev) + "|" +
         std::to_string(st.st_ino) + "|" + std::to_string(st.st_ctim.tv_sec) + "." +
         std::to_string(st.st_ctim.tv_nsec);
}

// The first member whose identity is not the one in `before` any more.
Status CheckUnchanged(const std::vector<std::string>& members, const std::vector<ScopedFd>& fds,
                      const std::vector<std::string>& before) {
  for (size_t i = 0; i < members.size(); ++i) {
    Result<std::string> now = IdentityOf(members[i], fds.empty() ? -1 : fds[i].get());
    if (!now.ok()) return now.status();
    if (*now != before[i]) return Status::Corrupt(members[i] + ": changed while it was averaged");
  }
  return Status::Ok();
}

// A status from reading "/proc/self/fd/N" names the member instead.
Status NamingMembers(const Status& s, const std::vector<std::string>& read_as,
                     const std::vector<std::string>& members) {
  std::string msg = s.message();
  for (size_t i = 0; i < members.size(); ++i) {
    if (read_as[i] == members[i]) continue;  // read by path: already named
    for (size_t at = msg.find(read_as[i]); at != std::string::npos;) {
      const size_t end = at + read_as[i].size();
      if (end < msg.size() && std::isdigit(static_cast<unsigned char>(msg[end]))) {
        at = msg.find(read_as[i], end);  // "/proc/self/fd/12", not ".../1"
        continue;
      }
      msg.replace(at, read_as[i].size(), members[i]);
      at = msg.find(read_as[i], at + members[i].size());
    }
  }
  if (msg == s.message()) return s;
  switch (s.code()) {
    case StatusCode::kNotFound:
      return Status::NotFound(msg);
    case StatusCode::kInvalidArgument:
      return Status::InvalidArgument(msg);
    case StatusCode::kCorrupt:
      return Status::Corrupt(msg);
    case StatusCode::kUnsupported:
      return Status::Unsupported(msg);
    case StatusCode::kExists:
      return Status::Exists(msg);
    case StatusCode::kPermission:
      return Status::Permission(msg);
    default:
      return s;  // keeps its errno (ECANCELED, EIO, ...)
  }
}

}  // namespace

Result<std::string> AverageCache::KeyOf(const std::vector<std::string>& members,
                                        const std::vector<std::string>& identities) const {
  std::string identity = kVersion;
  for (const std::string& id : identities) identity += "|" + id;
  char key[40];
  std::snprintf(key, sizeof(key), "%016llx%016llx",
                static_cast<unsigned long long>(Fnv1a(identity, 1469598103934665603ULL)),
                static_cast<unsigned long long>(Fnv1a(identity, 0x9e3779b97f4a7c15ULL)));
  return std::string(key) + FileExtension(members.front().substr(members.front().rfind('/') + 1));
}

Result<std::string> AverageCache::Get(const std::vector<std::string>& members,
                                      const ProgressFn& progress) {
  if (members.empty()) return Status::InvalidArgument("an average needs members");
  // Open every member first (beneath the source when one is set); what is
  // read below is read through these descriptors.
  std::vector<ScopedFd> fds;
  std::vector<std::string> read_as = members;
  std::vector<std::string> identities;
  for (size_t i = 0; i < members.size(); ++i) {
    if (source_ != nullptr) {
      Result<ScopedFd> fd = source_->OpenAt(members[i], O_RDONLY | O_NOFOLLOW);
      if (!fd.ok()) return fd.status();
      // A shard index is recognised by its name, so it is read by path
      // (after this check); tensor files are read through the descriptor.
      const std::string& m = members[i];
      const bool index_json = m.size() >= 11 && m.compare(m.size() - 11, 11, ".index.json") == 0;
      if (!index_json) read_as[i] = "/proc/self/fd/" + std::to_string(fd->get());
      fds.push_back(std::move(*fd));
    }
    Result<std::string> id = IdentityOf(members[i], fds.empty() ? -1 : fds[i].get());
    if (!id.ok()) return id.status();
    identities.push_back(std::move(*id));
  }
  Result<std::string> key = KeyOf(members, identities);
  if (!key.ok()) return key.status();
  const std::string path = dir_ + "/" + *key;
  std::shared_ptr<std::mutex> slot;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto& s = computing_[*key];
    if (!s) s = std::make_shared<std::mutex>();
    slot = s;
  }
  std::lock_guard<std::mutex> one_computation(*slot);
  if (::access(path.c_str(), R_OK) == 0) {
    ::utimensat(AT_FDCWD, path.c_str(), nullptr, 0);  // recently used
    return path;
  }
  if (Status s = MakeDirs(dir_); !s.ok()) return s;
  auto start = std::chrono::steady_clock::now();
  Log(LogLevel::kInfo, "averaging %zu member(s), newest %s", members.size(),
      members.front().c_str());
  Result<AverageResult> r = AverageFiles(read_as, path, progress);
  if (!r.ok()) r = NamingMembers(r.status(), read_as, members);
  if (!r.ok()) {
    // A cancelled average is the daemon stopping, not a fault of the members.
    const bool cancelled = r.status().sys_errno() == ECANCELED;
    Log(cancelled ? LogLevel::kInfo : LogLevel::kError, "average of %zu member(s) %s: %s",
        members.size(), cancelled ? "stopped" : "failed", r.status().message().c_str());
    return r.status();
  }
  // The key names the members as they were before the average; a member
  // that changed since (touched, replaced, rewritten) makes the result stale.
  if (Status s = CheckUnchanged(members, fds, identities); !s.ok()) {
    ::unlink(path.c_str());
    Log(LogLevel::kError, "average of %zu member(s) failed: %s", members.size(),
        s.message().c_str());
    return s;
  }
  const double secs =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  Log(LogLevel::kInfo,
      "averaged %zu member(s) (%s, %d averaged, %d copied, %.1f MB) in %.2f s -> %s",
      members.size(), TensorFormatName(r->format), r->tensors_averaged, r->tensors_copied,
      static_cast<double>(r->bytes) / 1e6, secs, path.c_str());
  Evict(path);
  return path;
}

void AverageCache::Evict(const std::string& keep) {
  DIR* d = ::opendir(dir_.c_str());
  if (d == nullptr) return;
  struct Entry {
    std::string path;
    int64_t size;
    int64_t mtime;
  };
  std::vector<Entry> entries;
  int64_t total = 0;
  const int64_t now = static_cast<int64_t>(std::time(nullptr));
  while (struct dirent* e = ::readdir(d)) {
    std::string name = e->d_name;
    if (name == "." || name == "..") continue;
    std::string p = dir_ + "/" + name;
    struct stat st {};
    if (::lstat(p.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) continue;
    if (name.find(".tmp-") != std::string::npos) {
      // Left by a crash mid-average; one in progress is younger than this.
      if (now - st.st_mtim.tv_sec > kStaleTmpSeconds) ::unlink(p.c_str());
      continue;
    }
    entries.push_back(
        {p, static_cast<int64_t>(st.st_size), static_cast<int64_t>(st.st_mtim.tv_sec)});
    total += st.st_size;
  }
  ::closedir(d);
  std::sort(entries.begin(), entries.end(),
            [](const Entry& a, const Entry& b) { return a.mtime < b.mtime; });
  for (const Entry& e : entries) {
    if (total <= max_bytes_) break;
    if (e.path == keep) continue;
    if (::unlink(e.path.c_str()) == 0) {
      total -= e.size;
      Log(LogLevel::kInfo, "average cache: evicted %s (%.1f MB)", e.path.c_str(),
          static_cast<double>(e.size) / 1e6);
    }
  }
}

}  // namespace ckptfs::core
