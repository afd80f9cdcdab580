#include "core/checkpoint.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <ctime>
#include <memory>
#include <mutex>
#include <set>

#include "core/beneath.h"
#include "core/log.h"

namespace ckptfs::core {
namespace {

int64_t MtimeNs(const struct stat& st) {
  return static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec;
}

std::string Basename(const std::string& path) {
  auto slash = path.rfind('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

std::string Dirname(const std::string& path) {
  auto slash = path.rfind('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

// Reads at most max_bytes (meta.h's budget for the layout's format) from
// name in dir_fd, opened without following a link: a larger file is
// refused with the budget named, never read whole. path names it in
// messages.
Result<std::string> ReadSmallFileAt(int dir_fd, const char* name, const std::string& path,
                                    size_t max_bytes) {
  const auto too_large = [&]() {
    return Status::Corrupt(path + ": meta file larger than the " + std::to_string(max_bytes) +
                           "-byte budget for " + Basename(path));
  };
  // O_NONBLOCK: a FIFO put where the meta file was must not hang the scan
  // (fstat below refuses it).
  ScopedFd fd(::openat(dir_fd, name, O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK));
  if (!fd.valid()) return Status::FromErrno(path, errno);
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) return Status::FromErrno(path, errno);
  if (!S_ISREG(st.st_mode)) return Status::Corrupt(path + ": not a regular file");
  if (static_cast<uint64_t>(st.st_size) > max_bytes) return too_large();
  std::string data;
  char buf[65536];
  for (;;) {
    ssize_t n = ::read(fd.get(), buf, sizeof(buf));
    if (n < 0) {
      if (errno == EINTR) continue;
      return Status::FromErrno(path, errno);
    }
    if (n == 0) break;
    data.append(buf, static_cast<size_t>(n));
    if (data.size() > max_bytes) return too_large();  // grew while read
  }
  return data;
}

// The meta file of the checkpoint directory dir_fd; file is its path.
Result<Meta> ParseMetaFileAt(Layout layout, int dir_fd, const std::string& file) {
  Result<std::string> text =
      ReadSmallFileAt(dir_fd, MetaFileName(layout), file,
                      layout == Layout::kSpeechBrain ? kMaxYamlMetaBytes : kMaxJsonMetaBytes);
  if (!text.ok()) return text.status();
  switch (layout) {
    case Layout::kSpeechBrain:
      return ParseSpeechBrainYaml(*text, file);
    case Layout::kNative:
      return ParseNativeJson(*text, file);
    case Layout::kHuggingFace:
      return ParseTrainerState(*text, file);
    case Layout::kSingleFile:
      break;
  }
  return Status::InvalidArgument(file + ": layout has no meta file");
}

// Logs once per checkpoint path (a checkpoint is reloaded whenever it
// changes; the warning says nothing new the second time).
void WarnFutureOnce(const std::string& path, double unixtime, double now) {
  static std::mutex mu;
  static std::set<std::string> warned;
  {
    std::lock_guard<std::mutex> lock(mu);
    if (!warned.insert(path).second) return;
  }
  Log(LogLevel::kWarning,
      "%s: unixtime %.0f is %.0f s in the future (more than %lld s ahead of this clock); "
      "its recency is its newest file's mtime instead",
      path.c_str(), unixtime, unixtime - now, static_cast<long long>(kMaxFutureUnixtimeSeconds));
}

}  // namespace

double RecencyOf(const std::string& path, std::optional<double> unixtime, double newest_mtime,
                 double now) {
  if (!unixtime) return newest_mtime;
  if (*unixtime > now + static_cast<double>(kMaxFutureUnixtimeSeconds)) {
    WarnFutureOnce(path, *unixtime, now);
    return newest_mtime;
  }
  return *unixtime;
}

const char* LayoutName(Layout layout) {
  switch (layout) {
    case Layout::kSpeechBrain:
      return "speechbrain";
    case Layout::kNative:
      return "native";
    case Layout::kHuggingFace:
      return "huggingface";
    case Layout::kSingleFile:
      return "single-file";
  }
  return "unknown";
}

const char* MetaFileName(Layout layout) {
  switch (layout) {
    case Layout::kSpeechBrain:
      return "CKPT.yaml";
    case Layout::kNative:
      return "meta.json";
    case Layout::kHuggingFace:
      return "trainer_state.json";
    case Layout::kSingleFile:
      return "";
  }
  return "";
}

std::optional<Layout> DirectoryLayout(std::string_view dir_name, bool has_ckpt_yaml,
                                      bool has_meta_json, bool has_trainer_state) {
  if (dir_name.rfind("CKPT+", 0) == 0 && has_ckpt_yaml) return Layout::kSpeechBrain;
  if (has_meta_json) return Layout::kNative;
  if (has_trainer_state && dir_name.rfind("checkpoint-", 0) == 0 && dir_name.size() > 11 &&
      std::all_of(dir_name.begin() + 11, dir_name.end(),
                  [](char c) { return c >= '0' && c <= '9'; })) {
    return Layout::kHuggingFace;
  }
  return std::nullopt;
}

Result<std::string> CheckpointStamp(const Beneath& source, const std::string& path, Layout layout) {
  struct stat st {};
  if (Status s = source.Lstat(path, &st); !s.ok()) return s;
  std::string stamp = std::to_string(MtimeNs(st)) + ":" + std::to_string(st.st_size);
  if (layout != Layout::kSingleFile) {
    struct stat mst {};
    if (source.Lstat(path + "/" + MetaFileName(layout), &mst).ok()) {
      stamp += ":" + std::to_string(MtimeNs(mst)) + ":" + std::to_string(mst.st_size);
    } else {
      stamp += ":missing";
    }
  }
  return stamp;
}

Result<Checkpoint> LoadCheckpoint(const Beneath& source, const std::string& path, Layout layout) {
  Checkpoint c;
  c.path = path;
  c.experiment = Dirname(path);
  c.name = Basename(path);
  c.layout = layout;
  Result<std::string> stamp = CheckpointStamp(source, path, layout);
  if (!stamp.ok()) return stamp.status();
  c.stamp = *stamp;

  int64_t newest_ns = 0;
  if (layout == Layout::kSingleFile) {
    // O_PATH: the file is only stat'ed; a FIFO in its place never blocks.
    Result<ScopedFd> fd = source.OpenAt(path, O_PATH);
    if (!fd.ok()) return fd.status();
    struct stat st {};
    if (::fstat(fd->get(), &st) != 0) return Status::FromErrno(path, errno);
    if (!S_ISREG(st.st_mode)) return Status::InvalidArgument(path + ": not a regular file");
    c.files.push_back({c.name, static_cast<int64_t>(st.st_size), MtimeNs(st)});
    newest_ns = MtimeNs(st);
    if (auto meta = ParseSingleFileName(c.name)) c.meta = std::move(*meta);
  } else {
    // Beneath the source: a directory swapped for a link to one the
    // daemon's user alone can read is never listed or parsed.
    Result<ScopedFd> dir_fd = source.OpenAt(path, O_RDONLY | O_DIRECTORY);
    if (!dir_fd.ok()) return dir_fd.status();
    int list_fd = ::dup(dir_fd->get());
    if (list_fd < 0) return Status::FromErrno(path, errno);
    DIR* dir = ::fdopendir(list_fd);
    if (dir == nullptr) {
      ::close(list_fd);
      return Status::FromErrno(path, errno);
    }
    std::unique_ptr<DIR, int (*)(DIR*)> guard(dir, ::closedir);
    while (struct dirent* e = ::readdir(dir)) {
      std::string name = e->d_name;
      if (name == "." || name == "..") continue;
      struct stat st {};
      if (::fstatat(::dirfd(dir), e->d_name, &st, AT_SYMLINK_NOFOLLOW) != 0) continue;
      if (!S_ISREG(st.st_mode)) continue;
      c.files.push_back({name, static_cast<int64_t>(st.st_size), MtimeNs(st)});
      newest_ns = std::max(newest_ns, MtimeNs(st));
    }
    std::sort(c.files.begin(), c.files.end(),
              [](const CheckpointFile& a, const CheckpointFile& b) { return a.name < b.name; });
    Result<Meta> meta = ParseMetaFileAt(layout, dir_fd->get(), path + "/" + MetaFileName(layout));
    if (meta.ok()) {
      c.meta = std::move(*meta);
    } else {
      c.valid = false;
      c.error = meta.status().message();
    }
  }
  c.recency = RecencyOf(path, c.meta.Number("unixtime"), static_cast<double>(newest_ns) / 1e9,
                        static_cast<double>(std::time(nullptr)));
  c.step = StepOf(c.meta);
  return c;
}

Result<Checkpoint> LoadCheckpoint(const std::string& path, Layout layout) {
  Result<Beneath> parent = Beneath::Open(Dirname(path));
  if (!parent.ok()) return parent.status();
  return LoadCheckpoint(*parent, path, layout);
}

std::string NaturalSortKey(std::string_view name) {
  std::string key;
  key.reserve(name.size() + 8);
  size_t i = 0;
  while (i < name.size()) {
    if (name[i] >= '0' && name[i] <= '9') {
      size_t j = i;
      while (j < name.size() && name[j] >= '0' && name[j] <= '9') ++j;
      size_t start = i;
      while (start + 1 < j && name[start] == '0') ++start;  // "007" sorts as 7
      size_t len = j - start;
      // A length prefix makes longer numbers sort after shorter ones. Digits
      // sort before letters at the same position, as in most natural sorts.
      char prefix[8];
      std::snprintf(prefix, sizeof(prefix), "%03zu", std::min<size_t>(len, 999));
      key += prefix;
      key.append(name.substr(start, len));
      i = j;
    } else {
      key += name[i++];
    }
  }
  return key;
}

std::optional<double> StepOf(const Meta& meta) {
  for (const char* key : {"global_step", "step", "epoch", "index"}) {
    if (auto v = meta.Number(key)) return v;
  }
  return std::nullopt;
}

bool IsNewer(const Checkpoint& a, const Checkpoint& b) {
  if (a.recency != b.recency) return a.recency > b.recency;
  double sa = a.step.value_or(-INFINITY);
  double sb = b.step.value_or(-INFINITY);
  if (sa != sb) return sa > sb;
  return NaturalSortKey(a.name) > NaturalSortKey(b.name);
}

std::string SingleFileAlias(std::string_view file_name) {
  return "checkpoint" + FileExtension(file_name);
}

}  // namespace ckptfs::core
