#include "core/averaging.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <thread>

#include "core/average_cache.h"
#include "test_util.h"

namespace ckptfs::core {
namespace {

using testing::TempDir;

std::string Fixture(const std::string& name) {
  return std::string(CKPTFS_TENSOR_FIXTURES) + "/" + name;
}

class AveragingTest : public ::testing::Test {
 protected:
  std::string Copy(const std::string& name, const std::string& as) {
    std::string to = dir_.path() + "/" + as;
    testing::CopyFile(Fixture(name), to);
    return to;
  }
  TempDir dir_;
};

TEST_F(AveragingTest, TorchZipOfIdenticalMembersKeepsValues) {
  std::string a = Copy("state_dict_p2.pt", "a.pt"), b = Copy("state_dict_p2.pt", "b.pt");
  std::string out = dir_.path() + "/out.pt";
  int calls = 0;
  Result<AverageResult> r = AverageFiles({a, b}, out, [&](const AverageProgress&) { ++calls; });
  ASSERT_TRUE(r.ok()) << r.status().message();
  EXPECT_EQ(r->format, TensorFormat::kTorchZip);
  EXPECT_EQ(r->tensors_averaged, 8);
  EXPECT_EQ(r->tensors_copied, 1);  // num_batches_tracked
  EXPECT_GT(calls, 2);
  // Averaging the output with itself again gives the same storages back.
  Result<AverageResult> again = AverageFiles({out, out}, dir_.path() + "/again.pt", nullptr);
  ASSERT_TRUE(again.ok()) << again.status().message();
  EXPECT_EQ(testing::ReadFile(out), testing::ReadFile(dir_.path() + "/again.pt"));
}

TEST_F(AveragingTest, SafetensorsOfIdenticalMembersIsTheSameFile) {
  std::string a = Copy("small.safetensors", "a.safetensors");
  std::string out = dir_.path() + "/out.safetensors";
  Result<AverageResult> r = AverageFiles({a, a, a}, out, nullptr);
  ASSERT_TRUE(r.ok()) << r.status().message();
  EXPECT_EQ(r->tensors_averaged, 1);
  EXPECT_EQ(r->tensors_copied, 1);
  EXPECT_EQ(testing::ReadFile(out), testing::ReadFile(a));
}

TEST_F(AveragingTest, BadMembersFailWithNoOutput) {
  std::string good = Copy("state_dict_p2.pt", "good.pt");
  std::string other = Copy("tied.pt", "other.pt");
  std::string legacy = Copy("legacy.pt", "legacy.pt");
  std::string text = dir_.path() + "/text.pt";
  testing::WriteFile(text, "hello, not a checkpoint");
  std::string truncated = dir_.path() + "/trunc.pt";
  std::string bytes = testing::ReadFile(good);
  testing::WriteFile(truncated, bytes.substr(0, bytes.size() - 100));
  std::string st = Copy("small.safetensors", "st.safetensors");
  std::string st_bad = dir_.path() + "/bad.safetensors";
  std::string stb = testing::ReadFile(st);
  testing::WriteFile(st_bad, stb.substr(0, stb.size() - 4));
  struct Case {
    std::vector<std::string> members;
    StatusCode code;
    std::string names;
  } cases[] = {
      {{good, other}, StatusCode::kCorrupt, other},
      {{good, legacy}, StatusCode::kCorrupt, legacy},  // formats differ
      {{legacy, legacy}, StatusCode::kUnsupported, legacy},
      {{good, text}, StatusCode::kCorrupt, text},
      {{good, truncated}, StatusCode::kCorrupt, truncated},
      {{st, st_bad}, StatusCode::kCorrupt, st_bad},
      {{good, dir_.path() + "/missing.pt"}, StatusCode::kIoError, "missing.pt"},
  };
  for (const Case& c : cases) {
    std::string out = dir_.path() + "/out.pt";
    Result<AverageResult> r = AverageFiles(c.members, out, nullptr);
    ASSERT_FALSE(r.ok()) << c.names;
    EXPECT_EQ(r.status().code(), c.code) << r.status().message();
    EXPECT_NE(r.status().message().find(c.names), std::string::npos) << r.status().message();
    EXPECT_NE(::access(out.c_str(), F_OK), 0) << "no output on failure";
  }
}

TEST_F(AveragingTest, OpaqueObjectsAreCarriedNotRun) {
  ::unlink("/tmp/ckptfs-pwned");
  std::string evil = Copy("evil.pt", "evil.pt");
  Result<AverageResult> r = AverageFiles({evil, evil}, dir_.path() + "/out.pt", nullptr);
  ASSERT_TRUE(r.ok()) << r.status().message();
  EXPECT_NE(::access("/tmp/ckptfs-pwned", F_OK), 0);
  EXPECT_NE(testing::ReadFile(dir_.path() + "/out.pt").find("system"), std::string::npos);
}

TEST_F(AveragingTest, CacheComputesOnceAndFollowsMembers) {
  std::string a = Copy("state_dict_p2.pt", "a.pt"), b = Copy("state_dict_p2.pt", "b.pt");
  AverageCache cache(dir_.path() + "/cache", int64_t{1} << 30);
  int computations = 0;
  std::mutex mu;
  auto count = [&](const AverageProgress& p) {
    if (std::string(p.stage) == "done") {
      std::lock_guard<std::mutex> lock(mu);
      ++computations;
    }
  };
  std::vector<std::thread> threads;
  std::vector<std::string> paths(4);
  for (int i = 0; i < 4; ++i) {
    threads.emplace_back([&, i] { paths[i] = *cache.Get({a, b}, count); });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(computations, 1);
  for (const std::string& p : paths) EXPECT_EQ(p, paths[0]);
  // A changed member is a new key: never the stale result.
  testing::CopyFile(Fixture("state_dict_p4.pt"), b);
  testing::SetMtime(b, 12345);
  Result<std::string> changed = cache.Get({a, b}, count);
  ASSERT_TRUE(changed.ok());
  EXPECT_NE(*changed, paths[0]);
  EXPECT_EQ(computations, 2);
  // The size bound evicts the least recently used result.
  AverageCache tiny(dir_.path() + "/cache", 1);
  Result<std::string> third = tiny.Get({b, a}, nullptr);
  ASSERT_TRUE(third.ok());
  EXPECT_EQ(::access(third->c_str(), F_OK), 0);
  EXPECT_NE(::access(paths[0].c_str(), F_OK), 0);
}

}  // namespace
}  // namespace ckptfs::core
