// libFuzzer target: averaging end to end over members that may disagree.
//
// The input is one or more member files (safetensors or PyTorch zip, the
// newest first) separated by kMemberSeparator; scripts/fuzz.sh seeds it with
// real files alone and paired. Each member is written to a file and the
// whole of core::AverageFiles runs on them, as an avg/ view does: format
// detection, completeness check, header or pickle parsing, the comparison of
// members (names, shapes, dtypes, layouts), accumulation and the atomic
// write. An input without a separator is averaged with itself.
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "core/averaging.h"
#include "fuzz_files.h"

namespace {
constexpr std::string_view kMemberSeparator = "\n--ckptfs-fuzz-member--\n";
constexpr size_t kMaxMembers = 4;  // more adds cost, not coverage
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using ckptfs::fuzz::ScratchDir;
  std::string_view input(reinterpret_cast<const char*>(data), size);
  std::vector<std::string> members;
  while (members.size() < kMaxMembers) {
    const size_t cut = members.size() + 1 < kMaxMembers ? input.find(kMemberSeparator)
                                                         : std::string_view::npos;
    const std::string_view part = input.substr(0, cut);
    const std::string path = ScratchDir() + "/member" + std::to_string(members.size());
    ckptfs::fuzz::WriteFileOrDie(path, reinterpret_cast<const uint8_t*>(part.data()), part.size());
    (void)ckptfs::core::CheckTensorFileComplete(path);
    members.push_back(path);
    if (cut == std::string_view::npos) break;
    input.remove_prefix(cut + kMemberSeparator.size());
  }
  if (members.size() == 1) members.push_back(members[0]);
  const std::string out = ScratchDir() + "/avg.out";
  (void)ckptfs::core::AverageFiles(members, out, nullptr);
  ::unlink(out.c_str());
  return 0;
}
