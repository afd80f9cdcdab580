// Conversion to safetensors: see safetensors_convert.h. (Interface first;
// the implementation lands with issue 13.)
#include "core/safetensors_convert.h"

namespace ckptfs::core {

Result<ConvertResult> ConvertToSafetensors(const std::string& input, const std::string&,
                                           const ProgressFn&) {
  return Status::Unsupported(input + ": conversion to safetensors is not built yet");
}

}  // namespace ckptfs::core
