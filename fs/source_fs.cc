#include "fs/source_fs.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <unistd.h>

#include <ctime>
#include <fstream>
#include <sstream>
#include <vector>

namespace ckptfs::fs {

namespace {

// statfs(2) magic numbers (linux/magic.h and the filesystems' own).
constexpr long kNfsMagic = 0x6969;
constexpr long kLustreMagic = 0x0BD00BD0;
constexpr long kCephMagic = 0x00C36400;
constexpr long kSmbMagic = 0x517B;
constexpr long kCifsMagic = 0xFF534D42;
constexpr long kSmb2Magic = 0xFE534D42;
constexpr long kFuseMagic = 0x65735546;

// FUSE filesystems over object stores: rename is a copy and a delete.
const char* const kCopyingRenames[] = {"fuse.s3fs",     "fuse.goofys",        "fuse.gcsfuse",
                                       "fuse.rclone",   "fuse.mountpoint-s3", "fuse.blobfuse",
                                       "fuse.blobfuse2"};

// mountinfo escapes space, tab, newline and backslash as \ooo.
std::string Unescape(const std::string& s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '\\' && i + 3 < s.size()) {
      const std::string oct = s.substr(i + 1, 3);
      if (oct.size() == 3 && oct.find_first_not_of("01234567") == std::string::npos) {
        out.push_back(static_cast<char>(std::stoi(oct, nullptr, 8)));
        i += 3;
        continue;
      }
    }
    out.push_back(s[i]);
  }
  return out;
}

bool Under(const std::string& path, const std::string& mountpoint) {
  if (mountpoint == "/") return true;
  return path == mountpoint ||
         (path.size() > mountpoint.size() && path.compare(0, mountpoint.size(), mountpoint) == 0 &&
          path[mountpoint.size()] == '/');
}

// Whether dir_fd or anything below it changed at or after since. budget:
// entries left to look at; running out reads as changed.
bool ChangedSince(int dir_fd, std::time_t since, int depth, int* budget) {
  const int dup_fd = ::dup(dir_fd);
  DIR* d = dup_fd < 0 ? nullptr : ::fdopendir(dup_fd);
  if (d == nullptr) {
    if (dup_fd >= 0) ::close(dup_fd);
    return false;
  }
  bool changed = false;
  while (!changed) {
    struct dirent* e = ::readdir(d);
    if (e == nullptr) break;
    const std::string n = e->d_name;
    if (n == "." || n == "..") continue;
    if (--*budget < 0) {
      changed = true;
      break;
    }
    struct stat st {};
    if (::fstatat(dir_fd, n.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0) continue;
    if (st.st_mtime >= since || st.st_ctime >= since) {
      changed = true;
    } else if (S_ISDIR(st.st_mode) && depth > 0) {
      const int sub = ::openat(dir_fd, n.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
      if (sub >= 0) {
        changed = ChangedSince(sub, since, depth - 1, budget);
        ::close(sub);
      }
    }
  }
  ::closedir(d);
  return changed;
}

}  // namespace

bool OwnDirActive(const core::Beneath& source, const std::string& experiment,
                  const std::string& name, std::chrono::seconds window) {
  core::Result<core::ScopedFd> dir = core::OpenOwnDirUnder(source, experiment, name, false);
  if (!dir.ok()) return false;
  const std::time_t since = std::time(nullptr) - static_cast<std::time_t>(window.count());
  int budget = kOwnDirWalkBudget;
  return ChangedSince(dir->get(), since, kOwnDirWalkDepth, &budget);
}

SourceFilesystem ClassifyFilesystem(long f_type, const std::string& mount_fstype) {
  SourceFilesystem fs;
  fs.name = "local";
  switch (static_cast<unsigned long>(f_type) & 0xFFFFFFFFul) {
    case kNfsMagic:
      fs.name = "nfs";
      break;
    case kLustreMagic:
      fs.name = "lustre";
      break;
    case kCephMagic:
      fs.name = "cephfs";
      break;
    case kSmbMagic:
    case static_cast<unsigned long>(kCifsMagic):
    case static_cast<unsigned long>(kSmb2Magic):
      fs.name = "smb";
      break;
    case kFuseMagic:
      fs.name = mount_fstype.empty() ? "fuse" : mount_fstype;
      for (const char* copying : kCopyingRenames) {
        if (mount_fstype == copying) fs.atomic_rename = false;
      }
      break;
    default:
      return fs;
  }
  fs.shared = true;
  return fs;
}

std::string MountFstype(const std::string& mountinfo, const std::string& path) {
  std::istringstream in(mountinfo);
  std::string line, best_fstype;
  size_t best_len = 0;
  bool found = false;
  while (std::getline(in, line)) {
    std::istringstream fields(line);
    std::vector<std::string> f;
    for (std::string w; fields >> w;) f.push_back(w);
    size_t dash = 0;
    while (dash < f.size() && f[dash] != "-") ++dash;
    if (f.size() < 5 || dash + 1 >= f.size()) continue;
    const std::string mountpoint = Unescape(f[4]);
    // The last matching mount of the longest prefix is the one on top.
    if (Under(path, mountpoint) && (!found || mountpoint.size() >= best_len)) {
      found = true;
      best_len = mountpoint.size();
      best_fstype = f[dash + 1];
    }
  }
  return best_fstype;
}

SourceFilesystem DescribeSourceFilesystem(const std::string& source) {
  struct statfs st {};
  if (::statfs(source.c_str(), &st) != 0) return ClassifyFilesystem(0, "");
  std::string fstype;
  if (static_cast<long>(st.f_type) == kFuseMagic) {
    std::ifstream in("/proc/self/mountinfo");
    std::stringstream text;
    text << in.rdbuf();
    fstype = MountFstype(text.str(), source);
  }
  return ClassifyFilesystem(static_cast<long>(st.f_type), fstype);
}

}  // namespace ckptfs::fs
