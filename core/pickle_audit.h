// What a checkpoint holds and what its pickle would import, read without
// running anything (`ckptfs inspect`, the xattr user.ckptfs.globals).
//
// Every global the pickle references (GLOBAL / STACK_GLOBAL) is marked
// allowed or not against PyTorch's weights_only allow-list (see
// pickle_audit.cc for the list and the torch version it follows).
#ifndef CKPTFS_CORE_PICKLE_AUDIT_H_
#define CKPTFS_CORE_PICKLE_AUDIT_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "core/averaging.h"
#include "core/status.h"

namespace ckptfs::core {

struct AuditTensor {
  std::string name;  // dotted, as in the safetensors conversion
  std::string dtype;
  std::vector<int64_t> shape;
  int64_t bytes = 0;
};

struct AuditValue {
  std::string name;  // dotted
  std::string json;  // JSON text, or the global name of an opaque object
  bool opaque = false;
};

struct AuditGlobal {
  std::string name;  // "module.name"
  bool allowed = false;
  int64_t uses = 0;
};

struct CheckpointAudit {
  TensorFormat format = TensorFormat::kUnknown;
  std::string allow_list;  // which allow-list the verdicts follow
  std::vector<AuditTensor> tensors;
  std::vector<AuditValue> values;
  std::vector<AuditGlobal> globals;
  bool Safe() const;  // no global outside the allow-list
};

// A PyTorch zip or safetensors file (a safetensors file references no
// global). kUnsupported for other formats, kCorrupt for malformed input.
Result<CheckpointAudit> InspectFile(const std::string& path);

// Whether torch.load(weights_only=True) resolves this global ("module.name"):
// the allow-list of torch 1.13's _get_allowed_globals (pickle_audit.cc).
bool WeightsOnlyAllowed(const std::string& global);

// Names the allow-list WeightsOnlyAllowed follows, for reports.
extern const char kWeightsOnlyAllowList[];

// The value of the xattr user.ckptfs.globals: "safe" or
// "unsafe: module.name, ..." (the globals outside the allow-list), each
// name through PrintableName.
std::string GlobalsVerdict(const CheckpointAudit& audit);

// A global's name for a terminal or a log: control characters (C0, DEL,
// C1; a STACK_GLOBAL name may hold a newline, a carriage return or an
// escape sequence that redraws the line as "verdict: safe") as \xNN, a
// backslash doubled; anything else as it is.
std::string PrintableName(std::string_view name);

}  // namespace ckptfs::core

#endif  // CKPTFS_CORE_PICKLE_AUDIT_H_
