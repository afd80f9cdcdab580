// The audit of a checkpoint's pickle: see pickle_audit.h. (Interface first;
// the implementation lands with issue 13.)
#include "core/pickle_audit.h"

namespace ckptfs::core {

bool CheckpointAudit::Safe() const {
  for (const AuditGlobal& g : globals) {
    if (!g.allowed) return false;
  }
  return true;
}

Result<CheckpointAudit> InspectFile(const std::string& path) {
  return Status::Unsupported(path + ": inspect is not built yet");
}

std::string GlobalsVerdict(const CheckpointAudit& audit) {
  if (audit.Safe()) return "safe";
  std::string s = "unsafe:";
  bool first = true;
  for (const AuditGlobal& g : audit.globals) {
    if (g.allowed) continue;
    s += (first ? " " : ", ") + g.name;
    first = false;
  }
  return s;
}

}  // namespace ckptfs::core
