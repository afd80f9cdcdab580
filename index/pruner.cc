#include "index/pruner.h"

#include <sys/stat.h>

#include <cerrno>
#include <map>
#include <mutex>
#include <set>

#include "core/log.h"

namespace ckptfs::index {

using core::Result;
using core::Status;

namespace {

bool Gone(const Status& s) {
  return s.code() == core::StatusCode::kNotFound || s.sys_errno() == ENOENT;
}

// Whether message has not been logged by this process yet: a refusal or an
// ignored checkpoint is news once, not at every pruning run.
bool FirstTime(const std::string& message) {
  static std::mutex mu;
  static std::set<std::string> seen;
  std::lock_guard<std::mutex> lock(mu);
  return seen.insert(message).second;
}

}  // namespace

Result<PruneReport> Prune(Index* index, const core::Beneath& source,
                          const core::RetentionPolicy& policy,
                          const std::vector<std::string>& experiments, bool dry_run,
                          const std::function<bool(const std::string&)>& is_open) {
  PruneReport report;
  if (policy.empty()) return report;
  Result<std::vector<core::Checkpoint>> all = index->List(index->source());
  if (!all.ok()) return all.status();
  const std::set<std::string> wanted(experiments.begin(), experiments.end());
  std::map<std::string, std::vector<core::Checkpoint>> by_experiment;
  for (core::Checkpoint& c : *all) {
    if (!wanted.empty() && wanted.count(c.experiment) == 0) continue;
    by_experiment[c.experiment].push_back(std::move(c));
  }
  std::vector<std::pair<std::string, std::string>> removed;
  for (auto& [experiment, checkpoints] : by_experiment) {
    // The trash is checked first: a refused one means no deletion at all here.
    Status trash = dry_run
                       ? core::OpenOwnDirUnder(source, experiment, core::kTrashDir, false).status()
                       // Not what an rmtree through new/ is emptying now.
                       : core::RemoveTrash(source, experiment, std::chrono::seconds(120));
    if (!trash.ok() && trash.code() != core::StatusCode::kNotFound) {
      const std::string why = "retention skipped for " + experiment + ": " + trash.message();
      if (FirstTime(why)) core::Log(core::LogLevel::kError, "%s", why.c_str());
      report.refused.push_back(why);
      continue;
    }
    struct stat est {};
    if (Status s = source.Lstat(experiment, &est); !s.ok()) {
      report.refused.push_back("retention skipped for " + experiment + ": " + s.message());
      continue;
    }
    std::vector<core::RetentionCandidate> candidates;
    std::vector<size_t> counted;  // indexes into checkpoints of the candidates
    std::vector<PruneEntry> ignored;
    for (size_t i = 0; i < checkpoints.size(); ++i) {
      const core::Checkpoint& c = checkpoints[i];
      struct stat st {};
      Status s = source.Lstat(c.path, &st);
      if (Gone(s)) {
        // Deleted meanwhile (by another node's pruner, or by hand): not an
        // error, and the index forgets it below.
        core::Log(core::LogLevel::kDebug, "retention: %s is gone already", c.path.c_str());
        removed.emplace_back(experiment, c.name);
        continue;
      }
      if (s.ok() && !core::CountsForRetention(est.st_uid, st.st_uid)) {
        s = Status::Permission("owned by uid " + std::to_string(st.st_uid) +
                               ", not the experiment's owner (uid " + std::to_string(est.st_uid) +
                               "): ignored by retention");
        const std::string line = c.path + ": " + s.message();
        if (FirstTime(line)) core::Log(core::LogLevel::kWarning, "retention: %s", line.c_str());
      }
      if (!s.ok()) {
        ignored.push_back({c, {c.path, true, s.message()}, false, ""});
        continue;
      }
      core::RetentionCandidate rc;
      rc.checkpoint = c;
      for (const core::CheckpointFile& f : c.files) rc.bytes += f.size;
      rc.pinned = core::IsPinned(source, c);
      rc.open = is_open && is_open(c.path);
      candidates.push_back(std::move(rc));
      counted.push_back(i);
    }
    std::vector<core::RetentionDecision> decisions = core::DecideRetention(policy, candidates);
    for (size_t k = 0; k < counted.size(); ++k) {
      PruneEntry e{checkpoints[counted[k]], decisions[k], false, ""};
      if (!e.decision.keep && !dry_run) {
        Status s = core::DeleteCheckpoint(source, e.checkpoint);
        if (Gone(s)) {
          core::Log(core::LogLevel::kDebug, "retention: %s was deleted meanwhile",
                    e.checkpoint.path.c_str());
          removed.emplace_back(experiment, e.checkpoint.name);
          continue;
        }
        if (s.ok()) {
          e.deleted = true;
          ++report.deleted;
          removed.emplace_back(experiment, e.checkpoint.name);
          core::Log(core::LogLevel::kInfo, "retention: deleted %s (%s)", e.checkpoint.path.c_str(),
                    e.decision.why.c_str());
        } else {
          e.error = s.message();
          ++report.failed;
          core::Log(core::LogLevel::kWarning, "retention: kept %s: %s", e.checkpoint.path.c_str(),
                    s.message().c_str());
        }
      }
      report.entries.push_back(std::move(e));
    }
    for (PruneEntry& e : ignored) report.entries.push_back(std::move(e));
  }
  if (!removed.empty()) {
    Result<ScanStats> scan = index->ScanChanges(removed);
    if (!scan.ok()) return scan.status();
  }
  return report;
}

}  // namespace ckptfs::index
