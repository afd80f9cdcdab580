#include "core/safetensors_convert.h"

#include <dirent.h>
#include <gtest/gtest.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <nlohmann/json.hpp>

#include "core/average_cache.h"
#include "core/averaging.h"
#include "core/safetensors.h"
#include "test_util.h"

namespace ckptfs::core {
namespace {

using testing::TempDir;

const std::string kCases = std::string(CKPTFS_CONVERT_FIXTURES) + "/torch_cases.py";

// Runs torch_cases.py with the arguments; its exit status (output to `log`).
int Cases(const std::string& args, const std::string& log) {
  const std::string cmd = "/usr/bin/python3 '" + kCases + "' " + args + " > '" + log + "' 2>&1";
  const int rc = std::system(cmd.c_str());
  return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
}

std::vector<std::string> Listing(const std::string& dir) {
  std::vector<std::string> names;
  if (DIR* d = ::opendir(dir.c_str())) {
    while (struct dirent* e = ::readdir(d)) {
      if (std::strcmp(e->d_name, ".") != 0 && std::strcmp(e->d_name, "..") != 0)
        names.push_back(e->d_name);
    }
    ::closedir(d);
  }
  std::sort(names.begin(), names.end());
  return names;
}

// The JSON header of a safetensors file, checked by core's own parser too.
nlohmann::json Header(const std::string& path) {
  const std::string bytes = testing::ReadFile(path);
  EXPECT_GE(bytes.size(), 8u);
  uint64_t n = 0;
  for (int b = 7; b >= 0; --b) n = (n << 8) | static_cast<unsigned char>(bytes[b]);
  EXPECT_EQ((8 + n) % 8, 0u);
  Result<SafetensorsHeader> h =
      ParseSafetensorsHeader(std::string_view(bytes).substr(8, n), n, bytes.size(), path);
  EXPECT_TRUE(h.ok()) << h.status().message();
  return nlohmann::json::parse(bytes.substr(8, n));
}

class ConvertTest : public ::testing::TestWithParam<std::string> {
 protected:
  std::string Make(const std::string& name) {
    const std::string path = dir_.path() + "/" + name + ".pt";
    const int rc = Cases("make " + name + " '" + path + "'", dir_.path() + "/make.log");
    if (rc != 0) ADD_FAILURE() << testing::ReadFile(dir_.path() + "/make.log");
    return path;
  }
  TempDir dir_;
};

// Every case converts, and the independent numpy reader finds in the raw
// bytes what torch.load of the original holds, tensor for tensor and value
// for value.
TEST_P(ConvertTest, RoundTripsThroughAnIndependentReader) {
  const std::string in = Make(GetParam());
  const std::string out = dir_.path() + "/out.safetensors";
  Result<ConvertResult> r = ConvertToSafetensors(in, out, nullptr);
  ASSERT_TRUE(r.ok()) << r.status().message();
  EXPECT_GT(r->tensors, 0);
  // argparse.Namespace is outside torch's allow-list; nothing else is.
  EXPECT_EQ(r->unsafe_globals, GetParam() == "lightning"
                                   ? std::vector<std::string>{"argparse.Namespace"}
                                   : std::vector<std::string>{});
  Header(out);
  const std::string log = dir_.path() + "/check.log";
  EXPECT_EQ(Cases("check '" + in + "' '" + out + "'", log), 0) << testing::ReadFile(log);
  // Nothing left beside the output.
  std::vector<std::string> expect = {"check.log", GetParam() + ".pt", "make.log",
                                     "out.safetensors"};
  std::sort(expect.begin(), expect.end());
  EXPECT_EQ(Listing(dir_.path()), expect);
}

INSTANTIATE_TEST_SUITE_P(Cases, ConvertTest,
                         ::testing::Values("plain", "nested", "lightning", "dtypes", "views",
                                           "large_views"));

TEST_F(ConvertTest, NamesValuesAndLayout) {
  const std::string in = Make("lightning");
  const std::string out = dir_.path() + "/l.safetensors";
  ASSERT_TRUE(ConvertToSafetensors(in, out, nullptr).ok());
  nlohmann::json h = Header(out);
  EXPECT_EQ(h["state_dict.layer.weight"]["dtype"], "F32");
  EXPECT_EQ(h["state_dict.layer.weight"]["shape"], nlohmann::json::parse("[3,4]"));
  EXPECT_EQ(h["optimizer_states.0.state.0.step"]["shape"], nlohmann::json::array());
  const nlohmann::json& meta = h["__metadata__"];
  EXPECT_EQ(meta["epoch"], "3");
  EXPECT_EQ(meta["pytorch-lightning_version"], "\"2.0.0\"");
  EXPECT_EQ(meta["optimizer_states.0.param_groups.0.lr"], "0.001");
  EXPECT_EQ(meta["optimizer_states.0.param_groups.0.betas.1"], "0.999");
  EXPECT_EQ(meta["loops"], "null");
  // An opaque object: its global name, never its contents.
  EXPECT_EQ(meta["hyper_parameters"], "argparse.Namespace");
  EXPECT_FALSE(meta.contains("hyper_parameters.lr"));
  EXPECT_EQ(meta["ckptfs.unsafe_globals"], "[\"argparse.Namespace\"]");
  // Offsets: dense, in name order.
  std::vector<std::string> names;
  for (const auto& [k, v] : h.items()) {
    if (k != "__metadata__") names.push_back(k);
  }
  std::sort(names.begin(), names.end());
  uint64_t at = 0;
  for (const std::string& n : names) {
    EXPECT_EQ(h[n]["data_offsets"][0].get<uint64_t>(), at) << n;
    at = h[n]["data_offsets"][1].get<uint64_t>();
  }
}

TEST_F(ConvertTest, TiedWeightsAreWrittenOncePerName) {
  const std::string in = Make("views");
  const std::string out = dir_.path() + "/v.safetensors";
  ASSERT_TRUE(ConvertToSafetensors(in, out, nullptr).ok());
  nlohmann::json h = Header(out);
  ASSERT_TRUE(h.contains("a") && h.contains("tied"));
  EXPECT_NE(h["a"]["data_offsets"], h["tied"]["data_offsets"]);
  EXPECT_EQ(h["t"]["shape"], nlohmann::json::parse("[5,6]"));
  EXPECT_EQ(h["elem"]["shape"], nlohmann::json::array());
}

TEST_F(ConvertTest, UnsafeGlobalsConvertAndAreListed) {
  const std::string marker = dir_.path() + "/PWNED_";
  ::setenv("CKPTFS_PWNED", marker.c_str(), 1);
  const std::string in = Make("unsafe");
  const std::string out = dir_.path() + "/u.safetensors";
  Result<ConvertResult> r = ConvertToSafetensors(in, out, nullptr);
  ASSERT_TRUE(r.ok()) << r.status().message();
  EXPECT_EQ(r->tensors, 1);
  // Named as the pickle spells them: protocol 2 writes Python 2's module
  // names (__builtin__, commands), which Python 3 maps back when loading.
  EXPECT_EQ(r->unsafe_globals,
            (std::vector<std::string>{"posix.system", "__builtin__.eval", "commands.Popen"}));
  nlohmann::json h = Header(out);
  EXPECT_EQ(h["__metadata__"]["ckptfs.unsafe_globals"],
            "[\"posix.system\",\"__builtin__.eval\",\"commands.Popen\"]");
  EXPECT_EQ(h["__metadata__"]["system"], "posix.system");
  EXPECT_EQ(h["__metadata__"]["popen"], "commands.Popen");
  for (const char* m : {"system", "eval", "popen"}) {
    EXPECT_NE(::access((marker + m).c_str(), F_OK), 0) << "executed: " << m;
  }
}

TEST_F(ConvertTest, RefusesOtherFormatsAndBrokenFilesLeavingNothing) {
  const std::string in = Make("plain");
  const std::string bytes = testing::ReadFile(in);
  const std::string out = dir_.path() + "/x.safetensors";
  testing::WriteFile(dir_.path() + "/half.pt", bytes.substr(0, bytes.size() / 2));
  testing::WriteFile(dir_.path() + "/text.pt", "not a checkpoint");
  Result<ConvertResult> r = ConvertToSafetensors(dir_.path() + "/half.pt", out, nullptr);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("half.pt"), std::string::npos) << r.status().message();
  r = ConvertToSafetensors(dir_.path() + "/text.pt", out, nullptr);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kUnsupported);
  // A byte flipped in a tensor record: the zip reader's checks or the data,
  // never a crash; here the pickle is corrupted.
  std::string flipped = bytes;
  const size_t at = flipped.find("data.pkl");
  ASSERT_NE(at, std::string::npos);
  for (size_t i = at + 40; i < at + 200 && i < flipped.size(); ++i) flipped[i] ^= 0x5a;
  testing::WriteFile(dir_.path() + "/flipped.pt", flipped);
  r = ConvertToSafetensors(dir_.path() + "/flipped.pt", out, nullptr);
  EXPECT_FALSE(r.ok());
  EXPECT_EQ(::access(out.c_str(), F_OK), -1);
  for (const std::string& name : Listing(dir_.path())) {
    EXPECT_EQ(name.find(".tmp-"), std::string::npos) << name;
  }
}

// A byte flipped in a tensor's record is caught by its CRC-32, whether the
// record is copied (a whole contiguous tensor) or gathered (a view).
TEST_F(ConvertTest, CorruptTensorBytesAreErrors) {
  const std::string in = dir_.path() + "/crc.pt";
  const std::string cmd =
      "/usr/bin/python3 -c 'import sys, torch; torch.save({\"w\": torch.full((64,), 1234.5), "
      "\"v\": torch.full((8, 8), 77.25).t()}, sys.argv[1])' '" + in + "'";
  ASSERT_EQ(std::system(cmd.c_str()), 0);
  const std::string bytes = testing::ReadFile(in);
  const std::string out = dir_.path() + "/crc.safetensors";
  ASSERT_TRUE(ConvertToSafetensors(in, out, nullptr).ok());
  for (float value : {1234.5f, 77.25f}) {
    std::string pattern(4, '\0');
    std::memcpy(pattern.data(), &value, 4);
    std::string broken = bytes;
    const size_t at = broken.find(pattern);
    ASSERT_NE(at, std::string::npos);
    broken[at + 1] ^= 0x01;
    const std::string path = dir_.path() + "/broken.pt";
    testing::WriteFile(path, broken);
    Result<ConvertResult> r = ConvertToSafetensors(path, out + "2", nullptr);
    ASSERT_FALSE(r.ok()) << value;
    EXPECT_EQ(r.status().code(), StatusCode::kCorrupt);
    EXPECT_NE(r.status().message().find("CRC-32"), std::string::npos) << r.status().message();
    EXPECT_NE(r.status().message().find(value > 100 ? "'w'" : "'v'"), std::string::npos)
        << r.status().message();
  }
}

// avg/ through safetensors/: the cached conversion of several members is
// the conversion of their average, byte for byte; one member is converted
// as it is; the result is cached (same path, not recomputed).
TEST_F(ConvertTest, CacheConvertsTheAverage) {
  const std::string a = Make("plain");
  // Two members of the same structure: re-save "plain" scaled.
  const std::string c = dir_.path() + "/c.pt";
  const std::string cmd =
      "/usr/bin/python3 -c 'import sys, torch; sd = torch.load(sys.argv[1]); "
      "torch.save({k: v * 3 if v.is_floating_point() else v for k, v in "
      "sd.items()}, sys.argv[2])' '" +
      a + "' '" + c + "'";
  ASSERT_EQ(std::system(cmd.c_str()), 0);
  AverageCache cache(dir_.path() + "/cache", int64_t{1} << 30);
  Result<std::string> conv = cache.GetSafetensors({c, a}, nullptr);
  ASSERT_TRUE(conv.ok()) << conv.status().message();
  EXPECT_EQ(conv->substr(conv->size() - 12), ".safetensors");
  const std::string avg = dir_.path() + "/avg.pt";
  ASSERT_TRUE(AverageFiles({c, a}, avg, nullptr).ok());
  const std::string expect = dir_.path() + "/avg.safetensors";
  ASSERT_TRUE(ConvertToSafetensors(avg, expect, nullptr).ok());
  EXPECT_EQ(testing::ReadFile(*conv), testing::ReadFile(expect));
  Result<std::string> again = cache.GetSafetensors({c, a}, nullptr);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(*again, *conv);
  // One member: its own conversion, keyed apart from its average.
  Result<std::string> one = cache.GetSafetensors({a}, nullptr);
  ASSERT_TRUE(one.ok()) << one.status().message();
  EXPECT_NE(*one, *conv);
  const std::string direct = dir_.path() + "/a.safetensors";
  ASSERT_TRUE(ConvertToSafetensors(a, direct, nullptr).ok());
  EXPECT_EQ(testing::ReadFile(*one), testing::ReadFile(direct));
  Result<std::string> average = cache.Get({a}, nullptr);
  ASSERT_TRUE(average.ok());
  EXPECT_NE(*average, *one);
}

// By hand (README "Safe formats"): the time and peak memory of converting
// the checkpoint named by $CKPTFS_CONVERT_BENCH_INPUT, e.g.
//   CKPTFS_CONVERT_BENCH_INPUT=/tmp/big.pt build/tests/core_tests
//     --gtest_also_run_disabled_tests
//     --gtest_filter=ConvertBench.DISABLED_ConvertsALargeCheckpoint
// (torch_cases.py make linear_stack /tmp/big.pt writes 400 MB).
TEST(ConvertBench, DISABLED_ConvertsALargeCheckpoint) {
  const char* in = std::getenv("CKPTFS_CONVERT_BENCH_INPUT");
  ASSERT_NE(in, nullptr) << "set CKPTFS_CONVERT_BENCH_INPUT";
  TempDir dir;
  struct rusage before {};
  ::getrusage(RUSAGE_SELF, &before);
  const auto start = std::chrono::steady_clock::now();
  Result<ConvertResult> r = ConvertToSafetensors(in, dir.path() + "/out.safetensors", nullptr);
  const double secs =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  ASSERT_TRUE(r.ok()) << r.status().message();
  struct rusage after {};
  ::getrusage(RUSAGE_SELF, &after);
  std::printf(
      "converted %d tensors, %.1f MB in %.3f s (%.0f MB/s); peak RSS %.1f MB (before: %.1f MB)\n",
      r->tensors, static_cast<double>(r->bytes) / 1e6, secs,
      static_cast<double>(r->bytes) / 1e6 / secs, after.ru_maxrss / 1024.0,
      before.ru_maxrss / 1024.0);
}

}  // namespace
}  // namespace ckptfs::core
