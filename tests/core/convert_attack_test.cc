// The safetensors conversion and the audit on small real checkpoints that
// ask for far more than their size (tests/fixtures/convert/attack_cases.py):
// an expanded tensor, one storage under many names, a memoized string used
// many times, a long key repeated in every value name below it. Each is
// refused by a named budget before the output or the memory grows; what
// stays under the budgets converts.
#include <dirent.h>
#include <gtest/gtest.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include <cstdlib>
#include <cstring>
#include <nlohmann/json.hpp>

#include "core/pickle_audit.h"
#include "core/pickle_inventory.h"
#include "core/safetensors_convert.h"
#include "test_util.h"

namespace ckptfs::core {
namespace {

using testing::TempDir;

const std::string kAttack = std::string(CKPTFS_CONVERT_FIXTURES) + "/attack_cases.py";

// Bytes this process has read with read/pread so far (page cache included).
uint64_t ReadBytes() {
  const std::string io = testing::ReadFile("/proc/self/io");
  const size_t at = io.find("rchar: ");
  return at == std::string::npos ? 0 : std::stoull(io.substr(at + 7));
}

// AddressSanitizer keeps freed memory in quarantine (256 MiB by default) and
// pads every allocation, so peak RSS there says nothing about what the code
// holds: the memory bounds are checked in the plain build only (the budget's
// error is checked in both).
#if defined(__SANITIZE_ADDRESS__)
constexpr bool kMeasuresMemory = false;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
constexpr bool kMeasuresMemory = false;
#else
constexpr bool kMeasuresMemory = true;
#endif
#else
constexpr bool kMeasuresMemory = true;
#endif

long MaxRssKiB() {
  struct rusage ru {};
  ::getrusage(RUSAGE_SELF, &ru);
  return ru.ru_maxrss;
}

// Bytes of every file in `dir` (not below).
uint64_t DirBytes(const std::string& dir) {
  uint64_t total = 0;
  if (DIR* d = ::opendir(dir.c_str())) {
    while (struct dirent* e = ::readdir(d)) {
      struct stat st {};
      if (::stat((dir + "/" + e->d_name).c_str(), &st) == 0 && S_ISREG(st.st_mode))
        total += static_cast<uint64_t>(st.st_size);
    }
    ::closedir(d);
  }
  return total;
}

class ConvertAttackTest : public ::testing::Test {
 protected:
  std::string Make(const std::string& name, uint64_t n) {
    const std::string path = in_.path() + "/" + name + ".pt";
    const std::string log = in_.path() + "/make.log";
    const std::string cmd = "/usr/bin/python3 '" + kAttack + "' " + name + " '" + path + "' " +
                            std::to_string(n) + " > '" + log + "' 2>&1";
    const int rc = std::system(cmd.c_str());
    if (!WIFEXITED(rc) || WEXITSTATUS(rc) != 0) ADD_FAILURE() << testing::ReadFile(log);
    return path;
  }
  // Converts `in` into out_ and expects a refusal of `code` naming the file
  // and `budget`, with nothing left in out_ (no output, no temporary file).
  void ExpectRefused(const std::string& in, StatusCode code, const std::string& budget) {
    const std::string out = out_.path() + "/out.safetensors";
    Result<ConvertResult> r = ConvertToSafetensors(in, out, nullptr);
    ASSERT_FALSE(r.ok()) << in;
    EXPECT_EQ(r.status().code(), code) << r.status().message();
    EXPECT_NE(r.status().message().find(in), std::string::npos) << r.status().message();
    EXPECT_NE(r.status().message().find(budget), std::string::npos) << r.status().message();
    EXPECT_EQ(DirBytes(out_.path()), 0u);
  }
  TempDir in_, out_;
};

// torch.ones(1).expand(2^28): a 4-byte storage, 1 GiB of output asked for
// by a file of about 700 bytes. Before the budget this wrote 1 GiB.
TEST_F(ConvertAttackTest, ExpandedTensorOverTheBudgetIsRefusedBeforeWriting) {
  ExpectRefused(Make("expand", uint64_t{1} << 28), StatusCode::kUnsupported,
                "kMaxConvertAmplification");
}

// 200 names over one 1 MiB storage: 200 MiB of output from a 1 MiB file.
TEST_F(ConvertAttackTest, OneStorageUnderManyNamesOverTheBudgetIsRefused) {
  ExpectRefused(Make("shared", 200), StatusCode::kUnsupported, "kConvertSlackBytes");
}

// Under the budget both still convert, each name written whole.
TEST_F(ConvertAttackTest, ExpansionAndSharingUnderTheBudgetConvert) {
  const std::string out = out_.path() + "/out.safetensors";
  Result<ConvertResult> r = ConvertToSafetensors(Make("expand", 1 << 20), out, nullptr);
  ASSERT_TRUE(r.ok()) << r.status().message();
  EXPECT_EQ(r->bytes, 4 << 20);
  const std::string bytes = testing::ReadFile(out);
  uint64_t n = 0;
  for (int b = 7; b >= 0; --b) n = (n << 8) | static_cast<unsigned char>(bytes[b]);
  nlohmann::json h = nlohmann::json::parse(bytes.substr(8, n));
  EXPECT_EQ(h["w"]["shape"], nlohmann::json::array({1 << 20}));
  EXPECT_EQ(bytes.size(), 8 + n + (4 << 20));
  float last = 0;
  std::memcpy(&last, bytes.data() + bytes.size() - 4, 4);
  EXPECT_EQ(last, 1.0f);  // torch.ones(1) expanded

  r = ConvertToSafetensors(Make("shared", 8), out, nullptr);
  ASSERT_TRUE(r.ok()) << r.status().message();
  EXPECT_EQ(r->tensors, 8);
  EXPECT_EQ(r->bytes, 8 << 20);
}

// 200 names, each two floats 32 MiB apart in one shared 32 MiB storage:
// each view was gathered by reading its whole span, 6.4 GB of reading (a
// million names: 32 TiB, hours) for 1.6 KB of output. Now no view reads
// more than kMaxGatherReadFactor times its bytes: about the file once (its
// CRC-32).
TEST_F(ConvertAttackTest, ViewsSpreadOverAStorageReadOnlyTheirElements) {
  const std::string in = Make("strided", 200);
  const std::string out = out_.path() + "/out.safetensors";
  const uint64_t before = ReadBytes();
  Result<ConvertResult> r = ConvertToSafetensors(in, out, nullptr);
  ASSERT_TRUE(r.ok()) << r.status().message();
  const uint64_t read = ReadBytes() - before;
  struct stat st {};
  ASSERT_EQ(::stat(in.c_str(), &st), 0);
  EXPECT_LT(read, 3 * static_cast<uint64_t>(st.st_size)) << read << " bytes read";
  EXPECT_EQ(r->tensors, 200);
  const std::string bytes = testing::ReadFile(out);
  uint64_t n = 0;
  for (int b = 7; b >= 0; --b) n = (n << 8) | static_cast<unsigned char>(bytes[b]);
  nlohmann::json h = nlohmann::json::parse(bytes.substr(8, n));
  for (int i : {0, 199}) {
    const nlohmann::json& e = h["t" + std::to_string(i)];
    ASSERT_EQ(e["shape"], nlohmann::json::array({2}));
    float v[2];
    std::memcpy(v, bytes.data() + 8 + n + e["data_offsets"][0].get<uint64_t>(), 8);
    EXPECT_EQ(v[0], 0.0f);
    EXPECT_EQ(v[1], static_cast<float>(1 << 23));  // arange: its index
  }
}

// 200 two-element views of one deflated 4 MiB storage: each name
// inflated the whole record (800 MB inflated for 1.6 KB of output from a
// file of about 20 KB; a million names over 32 MiB: 32 TiB). Inflations after the first count
// against the budget; a few names still convert.
TEST_F(ConvertAttackTest, ReinflatingADeflatedRecordPerNameIsBudgeted) {
  ExpectRefused(Make("deflated", 200), StatusCode::kUnsupported, "kMaxConvertAmplification");
  const std::string out = out_.path() + "/out.safetensors";
  Result<ConvertResult> r = ConvertToSafetensors(Make("deflated", 2), out, nullptr);
  ASSERT_TRUE(r.ok()) << r.status().message();
  EXPECT_EQ(r->tensors, 2);
}

// A name with a lone surrogate was written as "a\udced\udcb3\udcbf", which
// safetensors' own reader (serde_json) refuses: the file would not load.
TEST_F(ConvertAttackTest, NamesThatAreNotUtf8AreRefused) {
  ExpectRefused(Make("surrogate", 0), StatusCode::kUnsupported, "tensor name");
  ExpectRefused(Make("surrogate", 1), StatusCode::kUnsupported, "value name");
  // inspect still lists them (its JSON escapes them as names of files are).
  Result<CheckpointAudit> a = InspectFile(Make("surrogate", 0));
  ASSERT_TRUE(a.ok()) << a.status().message();
  EXPECT_EQ(a->tensors.size(), 2u);
}

// A global named with a newline, a carriage return and escape sequences:
// the verdict (the xattr, inspect's last line) and the log show them as
// \xNN, so no line is forged or redrawn as "verdict: safe".
TEST_F(ConvertAttackTest, GlobalNamesWithControlCharactersArePrintedEscaped) {
  const std::string in = Make("spoof", 0);
  Result<CheckpointAudit> a = InspectFile(in);
  ASSERT_TRUE(a.ok()) << a.status().message();
  const std::string raw = "posix.system\nckptfs: info: all checked\r\x1b[2Kverdict: safe\x1b[8m";
  bool found = false;
  for (const AuditGlobal& g : a->globals) found = found || (g.name == raw && !g.allowed);
  EXPECT_TRUE(found);
  EXPECT_FALSE(a->Safe());
  const std::string verdict = GlobalsVerdict(*a);
  EXPECT_EQ(verdict,
            "unsafe: posix.system\\x0ackptfs: info: all checked\\x0d\\x1b[2Kverdict: "
            "safe\\x1b[8m");
  EXPECT_EQ(PrintableName("a\\b\xc2\x9b"
                          "c\x7f"),
            "a\\\\b\\x9bc\\x7f");
  // It converts, with the global listed (as JSON) in __metadata__.
  Result<ConvertResult> r = ConvertToSafetensors(in, out_.path() + "/out.safetensors", nullptr);
  ASSERT_TRUE(r.ok()) << r.status().message();
  EXPECT_EQ(r->unsafe_globals, std::vector<std::string>{raw});
}

// One 1 MiB string used 300 times (2 bytes a use): 300 MiB of JSON values
// from a 1 MiB file. Before the budget the conversion and the audit each
// held all of it (about 315 MB peak) before the header's own limit failed
// the conversion; the audit even succeeded, with N x 1 MiB for N uses.
TEST_F(ConvertAttackTest, AStringUsedManyTimesIsBoundedByTheValueBudget) {
  const std::string in = Make("strings", 300);
  const long before = MaxRssKiB();
  ExpectRefused(in, StatusCode::kCorrupt, "kMaxValueBytes");
  Result<CheckpointAudit> a = InspectFile(in);
  ASSERT_FALSE(a.ok());
  EXPECT_NE(a.status().message().find("kMaxValueBytes"), std::string::npos) << a.status().message();
  if (kMeasuresMemory) {
    EXPECT_LT(MaxRssKiB() - before, 160 << 10);
  }
}

// A 60 000-byte key over 3000 ints: 180 MB of value names from a 70 KB file
// (a 3 MB file with a million ints asked for 60 GB).
TEST_F(ConvertAttackTest, ALongKeyRepeatedInEveryNameIsBoundedByTheValueBudget) {
  const std::string in = Make("names", 3000);
  const long before = MaxRssKiB();
  ExpectRefused(in, StatusCode::kCorrupt, "kMaxValueBytes");
  Result<CheckpointAudit> a = InspectFile(in);
  ASSERT_FALSE(a.ok());
  EXPECT_NE(a.status().message().find("kMaxValueBytes"), std::string::npos) << a.status().message();
  if (kMeasuresMemory) {
    EXPECT_LT(MaxRssKiB() - before, 160 << 10);
  }
  // Fewer uses fit, and keep their full names.
  a = InspectFile(Make("names", 100));
  ASSERT_TRUE(a.ok()) << a.status().message();
  EXPECT_EQ(a->values.size(), 100u);
  EXPECT_EQ(a->values[99].name, std::string(60000, 'k') + ".99");
}

}  // namespace
}  // namespace ckptfs::core
