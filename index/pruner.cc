#include "index/pruner.h"

#include <map>
#include <set>

#include "core/log.h"

namespace ckptfs::index {

using core::Result;
using core::Status;

Result<PruneReport> Prune(Index* index, const core::RetentionPolicy& policy,
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
    if (!dry_run) core::RemoveTrash(experiment);
    std::vector<core::RetentionCandidate> candidates;
    for (const core::Checkpoint& c : checkpoints) {
      core::RetentionCandidate rc;
      rc.checkpoint = c;
      for (const core::CheckpointFile& f : c.files) rc.bytes += f.size;
      rc.pinned = core::IsPinned(c);
      rc.open = is_open && is_open(c.path);
      candidates.push_back(std::move(rc));
    }
    std::vector<core::RetentionDecision> decisions = core::DecideRetention(policy, candidates);
    for (size_t i = 0; i < checkpoints.size(); ++i) {
      PruneEntry e{checkpoints[i], decisions[i], false, ""};
      if (!e.decision.keep && !dry_run) {
        Status s = core::DeleteCheckpoint(e.checkpoint);
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
  }
  if (!removed.empty()) {
    Result<ScanStats> scan = index->ScanChanges(removed);
    if (!scan.ok()) return scan.status();
  }
  return report;
}

}  // namespace ckptfs::index
