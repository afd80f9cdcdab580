// libFuzzer target: a PyTorch zip checkpoint (torch.save since 1.6) averaged
// end to end, exactly as avg/ views do: DetectFormat, the completeness check,
// then AverageFiles with the input as both members: our zip reader
// (core/zip_reader.cc), our pickle reader on data.pkl, tensor extents
// against storages, record bounds over the zip directory
// (core/torch_zip.cc), the float accumulation and our zip writer, all
// built in and instrumented. The same input is then inspected (the pickle
// audit, core/pickle_audit.h) and converted to safetensors
// (core/safetensors_convert.h), as safetensors/ views and `ckptfs inspect` do.
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <string>

#include "core/averaging.h"
#include "core/pickle_audit.h"
#include "core/safetensors_convert.h"
#include "fuzz_files.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using ckptfs::fuzz::ScratchDir;
  const std::string in = ScratchDir() + "/member.pt";
  const std::string out = ScratchDir() + "/avg.pt";
  ckptfs::fuzz::WriteFileOrDie(in, data, size);
  (void)ckptfs::core::CheckTensorFileComplete(in);
  (void)ckptfs::core::AverageFiles({in, in}, out, nullptr);
  ::unlink(out.c_str());
  const std::string converted = ScratchDir() + "/converted.safetensors";
  (void)ckptfs::core::InspectFile(in);
  (void)ckptfs::core::ConvertToSafetensors(in, converted, nullptr);
  ::unlink(converted.c_str());
  return 0;
}
