// Internal to core's pickle code: unique names for paths that may repeat.
#ifndef CKPTFS_CORE_UNIQUE_NAMES_H_
#define CKPTFS_CORE_UNIQUE_NAMES_H_

#include <string>
#include <unordered_map>
#include <unordered_set>

namespace ckptfs::core {

// Gives each tensor path a unique name in time linear in the paths' bytes:
// a set of names taken and, per base path, the next "#n" to try.
// A path met again gets "#2", "#3", ... (the first of those not taken).
class UniqueNames {
 public:
  std::string Take(const std::string& path) {
    if (taken_.insert(path).second) return path;
    size_t& n = next_[path];
    if (n == 0) n = 2;
    for (;; ++n) {
      std::string candidate = path + "#" + std::to_string(n);
      if (taken_.insert(candidate).second) {
        ++n;
        return candidate;
      }
    }
  }

 private:
  std::unordered_set<std::string> taken_;
  std::unordered_map<std::string, size_t> next_;
};

}  // namespace ckptfs::core

#endif  // CKPTFS_CORE_UNIQUE_NAMES_H_
