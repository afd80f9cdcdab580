// libFuzzer target: every meta parser (CKPT.yaml, meta.json,
// trainer_state.json, single-file names) on arbitrary bytes.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "core/meta.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view text(reinterpret_cast<const char*>(data), size);
  (void)ckptfs::core::ParseSpeechBrainYaml(text, "fuzz");
  (void)ckptfs::core::ParseNativeJson(text, "fuzz");
  (void)ckptfs::core::ParseTrainerState(text, "fuzz");
  if (size < 256) (void)ckptfs::core::ParseSingleFileName(text);
  return 0;
}
