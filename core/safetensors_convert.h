// Converting a torch.save checkpoint (PyTorch zip) to safetensors without
// running anything of it (issue 13; README "Safe formats").
//
// The pickle is read by the code-free reader (pickle.h); tensors are data.
// Rules:
//   - nested containers (dicts, OrderedDicts, lists, tuples) flatten to
//     dotted names ({"enc": {"w": t}} -> "enc.w"; a list index is a part);
//     a Lightning dict keeps its top-level keys as prefixes
//     ("state_dict.layer.weight");
//   - every tensor keeps its dtype and shape and is written contiguous in
//     row-major order (a transposed view or a slice is materialised);
//   - a storage shared by two names is written once per name;
//   - non-tensor leaves JSON can hold (numbers, strings, bools, None) go
//     into __metadata__ under their dotted name as JSON text; opaque objects
//     are listed there by their global name only, never their contents;
//   - the output follows safetensors' own parsing rules: 8-byte
//     little-endian header length, JSON header padded with spaces to 8-byte
//     alignment, offsets dense and in order; a tensor or value name that is
//     not UTF-8 (a str with a lone surrogate) is refused (kUnsupported), as
//     safetensors could not read the header.
// The output is written beside out_path and renamed (no fsync: a cache
// entry, see AverageCache). Errors name the file and the tensor.
//
// Budget: the tensor data written may be at most kMaxConvertAmplification
// times the input file's size plus kConvertSlackBytes. A real checkpoint
// stays far below (a storage is written once per name: tied weights double
// it at most), while a crafted or odd one could ask for almost any size: a
// 4-byte storage expanded with stride 0 to 2^40 elements (4 TiB), or one
// storage viewed whole by thousands of names. Such a file is refused before
// anything is written (kUnsupported naming the file, the bytes it would
// take and the budget), not cut short.
#ifndef CKPTFS_CORE_SAFETENSORS_CONVERT_H_
#define CKPTFS_CORE_SAFETENSORS_CONVERT_H_

#include <cstdint>
#include <string>
#include <vector>

#include "core/averaging.h"
#include "core/status.h"

namespace ckptfs::core {

inline constexpr uint64_t kMaxConvertAmplification = 4;
inline constexpr uint64_t kConvertSlackBytes = uint64_t{64} << 20;

struct ConvertResult {
  int tensors = 0;    // names written
  int64_t bytes = 0;  // tensor data bytes written
  // Globals the pickle references outside the weights_only allow-list
  // (pickle_audit.h), also listed in __metadata__.
  std::vector<std::string> unsafe_globals;
};

// input: a PyTorch zip checkpoint. kUnsupported for anything else.
Result<ConvertResult> ConvertToSafetensors(const std::string& input, const std::string& out_path,
                                           const ProgressFn& progress);

}  // namespace ckptfs::core

#endif  // CKPTFS_CORE_SAFETENSORS_CONVERT_H_
