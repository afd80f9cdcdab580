#include "fs/mount_status.h"

#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <nlohmann/json.hpp>

#include "core/json_text.h"

namespace ckptfs::fs {
namespace {

double Now() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

const char* const kKindNames[] = {"commits", "deletions", "averages", "errors"};

}  // namespace

MountStatus::MountStatus(Identity identity) : identity_(std::move(identity)), started_(Now()) {}

void MountStatus::Record(EventKind kind, const std::string& what) {
  const auto k = static_cast<size_t>(kind);
  std::lock_guard<std::mutex> lock(mu_);
  counts_[k]++;
  recent_[k].push_back({Now(), what});
  if (recent_[k].size() > kRecentPerKind) recent_[k].pop_front();
}

std::string MountStatus::ToJson(index::Index* index,
                                const std::function<bool(const std::string&)>& keep) const {
  nlohmann::ordered_json j;
  if (!identity_.name.empty()) j["name"] = identity_.name;
  j["source"] = identity_.source;
  j["mountpoint"] = identity_.mountpoint;
  j["pid"] = static_cast<int64_t>(::getpid());
  j["started"] = started_;
  j["uptime_s"] = Now() - started_;
  j["policy"] = identity_.policy;
  nlohmann::ordered_json idx;
  idx["path"] = identity_.index_path;
  struct stat st {};
  idx["file_bytes"] = ::stat(identity_.index_path.c_str(), &st) == 0 ? static_cast<int64_t>(st.st_size) : 0;
  if (index != nullptr) {
    core::Result<index::IndexCounts> c = index->Counts();
    if (c.ok()) {
      idx["checkpoints"] = c->checkpoints;
      idx["invalid"] = c->invalid;
      idx["experiments"] = c->experiments;
      idx["files"] = c->files;
      idx["checkpoint_bytes"] = c->bytes;
    } else {
      idx["error"] = c.status().message();
    }
  }
  j["index"] = idx;
  std::lock_guard<std::mutex> lock(mu_);
  nlohmann::ordered_json totals;
  for (size_t k = 0; k < 4; ++k) totals[kKindNames[k]] = counts_[k];
  j["totals"] = totals;
  for (size_t k = 0; k < 4; ++k) {
    nlohmann::ordered_json list = nlohmann::ordered_json::array();
    for (auto it = recent_[k].rbegin(); it != recent_[k].rend(); ++it) {  // newest first
      if (keep && !keep(it->what)) continue;
      list.push_back({{"time", it->time}, {"what", it->what}});
    }
    j[std::string("last_") + kKindNames[k]] = list;
  }
  return core::DumpJson(j, 2) + "\n";  // paths may be any bytes
}

}  // namespace ckptfs::fs
