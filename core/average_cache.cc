#include "core/average_cache.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <ctime>

#include "core/file_util.h"
#include "core/log.h"
#include "core/meta.h"
#include "core/safetensors_convert.h"

namespace ckptfs::core {
namespace {

// Bumped when the averaging output changes, so old results are not reused.
constexpr char kVersion[] = "ckptfs-average-v2";
// Conversions to safetensors: their kind in the key (bumped when the
// conversion's output changes), and their extension.
constexpr char kConvertedKind[] = "safetensors-v1";
constexpr char kConvertedExtension[] = ".safetensors";
constexpr int64_t kStaleTmpSeconds = 3600;
// A result KEY is served only beside KEY + kDoneSuffix, written after it:
// "ckptfs-average-v2 SIZE CHECKSUM\n".
constexpr char kDoneSuffix[] = ".done";
constexpr size_t kHashBuffer = size_t{4} << 20;

bool EndsWith(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// A 64-bit checksum of a file's bytes, at memory speed (four independent
// multiply-xor lanes over 8-byte words): it tells a file written whole from
// one a crash left torn (zeros, short, or another write's bytes), not a
// defence against someone forging the daemon's own cache.
Result<uint64_t> Checksum(const std::string& path, uint64_t* size) {
  ScopedFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (fd.get() < 0) return Status::FromErrno(path, errno);
  (void)::posix_fadvise(fd.get(), 0, 0, POSIX_FADV_SEQUENTIAL);
  constexpr uint64_t kMul = 0x9E3779B97F4A7C15ULL;
  uint64_t lane[4] = {1, 2, 3, 4};
  std::vector<char> buf(kHashBuffer);
  uint64_t total = 0;
  size_t held = 0;  // bytes at the start of buf not yet hashed (< 32)
  for (;;) {
    const ssize_t n = ::read(fd.get(), buf.data() + held, buf.size() - held);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return Status::FromErrno(path, errno);
    total += static_cast<uint64_t>(n);
    const size_t have = held + static_cast<size_t>(n);
    const size_t whole = have - have % 32;
    size_t i = 0;
    for (; i + 32 <= whole; i += 32) {
      for (int j = 0; j < 4; ++j) {
        uint64_t w;
        std::memcpy(&w, buf.data() + i + 8 * j, 8);
        lane[j] = (lane[j] ^ w) * kMul;
      }
    }
    if (n == 0) {
      uint64_t tail[4] = {0, 0, 0, 0};
      std::memcpy(tail, buf.data() + i, have - i);
      for (int j = 0; j < 4; ++j) lane[j] = (lane[j] ^ tail[j]) * kMul;
      break;
    }
    std::memmove(buf.data(), buf.data() + i, have - i);
    held = have - i;
  }
  uint64_t h = total;
  for (uint64_t l : lane) {
    h = (h ^ l ^ (l >> 31)) * kMul;
    h ^= h >> 29;
  }
  *size = total;
  return h;
}

std::string DoneRecord(uint64_t size, uint64_t checksum) {
  char line[96];
  std::snprintf(line, sizeof(line), "%s %llu %016llx\n", kVersion,
                static_cast<unsigned long long>(size), static_cast<unsigned long long>(checksum));
  return line;
}

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
                                        const std::vector<std::string>& identities,
                                        const char* kind) const {
  std::string identity = kVersion;
  // Averages keep their historic keys; another kind of result is keyed apart.
  if (kind != nullptr) identity += std::string("|") + kind;
  for (const std::string& id : identities) identity += "|" + id;
  char key[40];
  std::snprintf(key, sizeof(key), "%016llx%016llx",
                static_cast<unsigned long long>(Fnv1a(identity, 1469598103934665603ULL)),
                static_cast<unsigned long long>(Fnv1a(identity, 0x9e3779b97f4a7c15ULL)));
  if (kind != nullptr) return std::string(key) + kConvertedExtension;
  return std::string(key) + FileExtension(members.front().substr(members.front().rfind('/') + 1));
}

Result<std::string> AverageCache::Get(const std::vector<std::string>& members,
                                      const ProgressFn& progress) {
  return Cached(members, nullptr, [&](const std::vector<std::string>& read_as,
                                      const std::string& path) -> Result<std::string> {
    Result<AverageResult> r = AverageFiles(read_as, path, progress);
    if (!r.ok()) return r.status();
    char line[160];
    std::snprintf(line, sizeof(line), "averaged %zu member(s) (%s, %d averaged, %d copied, %.1f MB)",
                  members.size(), TensorFormatName(r->format), r->tensors_averaged,
                  r->tensors_copied, static_cast<double>(r->bytes) / 1e6);
    return std::string(line);
  });
}

Result<std::string> AverageCache::GetSafetensors(const std::vector<std::string>& members,
                                                 const ProgressFn& progress) {
  if (members.empty()) return Status::InvalidArgument("a conversion needs a file");
  return Cached(members, kConvertedKind, [&](const std::vector<std::string>& read_as,
                                             const std::string& path) -> Result<std::string> {
    std::string input = read_as.front();
    if (members.size() > 1) {
      // The average first (cached as such), then its conversion.
      Result<std::string> avg = Get(members, progress);
      if (!avg.ok()) return avg.status();
      input = *avg;
    }
    Result<ConvertResult> r = ConvertToSafetensors(input, path, progress);
    if (!r.ok()) return r.status();
    char line[160];
    std::snprintf(line, sizeof(line), "converted %zu member(s) to safetensors (%d tensors, %.1f MB)",
                  members.size(), r->tensors, static_cast<double>(r->bytes) / 1e6);
    return std::string(line);
  });
}

Result<std::string> AverageCache::Cached(const std::vector<std::string>& members, const char* kind,
                                         const ComputeFn& compute) {
  if (members.empty()) return Status::InvalidArgument("an average needs members");
  const char* what = kind == nullptr ? "average" : "conversion";
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
  Result<std::string> key = KeyOf(members, identities, kind);
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
  if (Complete(path)) {
    ::utimensat(AT_FDCWD, path.c_str(), nullptr, 0);  // recently used
    return path;
  }
  if (Status s = MakeDirs(dir_); !s.ok()) return s;
  auto start = std::chrono::steady_clock::now();
  Log(LogLevel::kInfo, "%s of %zu member(s), newest %s: computing", what, members.size(),
      members.front().c_str());
  Result<std::string> r = compute(read_as, path);
  if (!r.ok()) r = NamingMembers(r.status(), read_as, members);
  if (!r.ok()) {
    // A cancelled average is the daemon stopping, not a fault of the members.
    const bool cancelled = r.status().sys_errno() == ECANCELED;
    Log(cancelled ? LogLevel::kInfo : LogLevel::kError, "%s of %zu member(s) %s: %s", what,
        members.size(), cancelled ? "stopped" : "failed", r.status().message().c_str());
    return r.status();
  }
  // The key names the members as they were before the average; a member
  // that changed since (touched, replaced, rewritten) makes the result stale.
  if (Status s = CheckUnchanged(members, fds, identities); !s.ok()) {
    ::unlink(path.c_str());
    Log(LogLevel::kError, "%s of %zu member(s) failed: %s", what, members.size(),
        s.message().c_str());
    return s;
  }
  // Recorded complete only now, with what was written: a crash before this
  // line leaves no record, one that tore the file leaves a record it fails.
  if (Status s = RecordComplete(path); !s.ok()) {
    ::unlink(path.c_str());
    Log(LogLevel::kError, "%s of %zu member(s) failed: %s", what, members.size(),
        s.message().c_str());
    return s;
  }
  const double secs =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  Log(LogLevel::kInfo, "%s in %.2f s -> %s", r->c_str(), secs, path.c_str());
  Evict(path);
  return path;
}

bool AverageCache::Complete(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return false;
  const std::string done_path = path + kDoneSuffix;
  Result<std::string> done = ReadFile(done_path);
  std::string why;
  uint64_t size = 0, checksum = 0;
  char version[32] = {};
  unsigned long long size_ull = 0, sum_ull = 0;
  if (!done.ok()) {
    why = "no completion record";
  } else if (done->size() > 90 ||
             std::sscanf(done->c_str(), "%31s %llu %llx", version, &size_ull, &sum_ull) != 3 ||
             *done != DoneRecord(size_ull, sum_ull) || std::string(version) != kVersion) {
    why = "malformed completion record";
  } else if (size = size_ull, checksum = sum_ull; static_cast<uint64_t>(st.st_size) != size) {
    why = "size " + std::to_string(st.st_size) + ", recorded " + std::to_string(size);
  } else {
    // Checked whole once per process (a crash ends the process); the size
    // at every use.
    std::lock_guard<std::mutex> lock(mu_);
    if (verified_.count(*done + path) != 0) return true;
  }
  if (why.empty()) {
    uint64_t read = 0;
    Result<uint64_t> sum = Checksum(path, &read);
    if (!sum.ok()) {
      why = sum.status().message();
    } else if (*sum != checksum || read != size) {
      why = "checksum differs from the recorded one";
    } else {
      std::lock_guard<std::mutex> lock(mu_);
      verified_.insert(*done + path);
      return true;
    }
  }
  // Torn by a crash, or never finished: computed again.
  Log(LogLevel::kWarning, "average cache: %s is incomplete (%s); computing it again", path.c_str(),
      why.c_str());
  ::unlink(done_path.c_str());
  ::unlink(path.c_str());
  return false;
}

Status AverageCache::RecordComplete(const std::string& path) {
  uint64_t size = 0;
  Result<uint64_t> sum = Checksum(path, &size);
  if (!sum.ok()) return sum.status();
  const std::string record = DoneRecord(size, *sum);
  const std::string done_path = path + kDoneSuffix;
  const std::string tmp = done_path + ".tmp-" + std::to_string(::getpid());
  {
    ScopedFd fd(::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600));
    if (fd.get() < 0) return Status::FromErrno(tmp, errno);
    if (::write(fd.get(), record.data(), record.size()) != static_cast<ssize_t>(record.size())) {
      Status s = Status::FromErrno(tmp, errno != 0 ? errno : ENOSPC);
      ::unlink(tmp.c_str());
      return s;
    }
  }
  if (::rename(tmp.c_str(), done_path.c_str()) != 0) {
    Status s = Status::FromErrno("rename to " + done_path, errno);
    ::unlink(tmp.c_str());
    return s;
  }
  std::lock_guard<std::mutex> lock(mu_);
  verified_.insert(record + path);
  return Status::Ok();
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
    if (EndsWith(name, kDoneSuffix)) {
      // A record whose result is gone (evicted by another process) goes too.
      const std::string result = p.substr(0, p.size() - std::strlen(kDoneSuffix));
      if (::access(result.c_str(), F_OK) != 0 && errno == ENOENT) ::unlink(p.c_str());
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
    ::unlink((e.path + kDoneSuffix).c_str());  // first: never a record without its file
    if (::unlink(e.path.c_str()) == 0) {
      total -= e.size;
      Log(LogLevel::kInfo, "average cache: evicted %s (%.1f MB)", e.path.c_str(),
          static_cast<double>(e.size) / 1e6);
    }
  }
}

}  // namespace ckptfs::core
