// The average cache never serves a torn result: a result cut short at any
// byte, with bytes changed, or without its completion record (what a crash
// before the page cache reached the disk leaves) is computed again.
#include "core/average_cache.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <string>
#include <vector>

#include "test_util.h"

namespace ckptfs::core {
namespace {

using testing::TempDir;

std::string Fixture(const std::string& name) {
  return std::string(CKPTFS_TENSOR_FIXTURES) + "/" + name;
}

class AverageCacheTest : public ::testing::TestWithParam<const char*> {
 protected:
  void SetUp() override {
    const std::string name = GetParam();
    const std::string ext = name.substr(name.rfind('.'));
    a_ = dir_.path() + "/a" + ext;
    b_ = dir_.path() + "/b" + ext;
    testing::CopyFile(Fixture(name), a_);
    testing::CopyFile(Fixture(name), b_);
    testing::SetMtime(b_, 1000);
  }
  // A cache as a restarted process sees it: nothing verified yet.
  // computations_ counts the averages computed (not served from the cache).
  Result<std::string> Get() {
    AverageCache cache(dir_.path() + "/cache", int64_t{1} << 30);
    return cache.Get({a_, b_}, [this](const AverageProgress& p) {
      if (std::string(p.stage) == "done") ++computations_;
    });
  }

  TempDir dir_;
  std::string a_, b_;
  int computations_ = 0;
};

TEST_P(AverageCacheTest, ResultCutShortAtAnyByteIsComputedAgain) {
  Result<std::string> first = Get();
  ASSERT_TRUE(first.ok()) << first.status().message();
  const std::string whole = testing::ReadFile(*first);
  ASSERT_GT(whole.size(), 4u);
  // A whole result is served as it is, not computed again.
  EXPECT_EQ(computations_, 1);
  Result<std::string> again = Get();
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(computations_, 1);

  for (size_t cut : {size_t{0}, size_t{1}, whole.size() / 2, whole.size() - 1}) {
    ASSERT_EQ(::truncate(first->c_str(), static_cast<off_t>(cut)), 0);
    const int before = computations_;
    Result<std::string> got = Get();
    ASSERT_TRUE(got.ok()) << "cut at " << cut << ": " << got.status().message();
    EXPECT_EQ(testing::ReadFile(*got), whole) << "cut at " << cut << " was served";
    EXPECT_EQ(computations_, before + 1) << "cut at " << cut << " was not computed again";
  }
}

TEST_P(AverageCacheTest, ResultWithChangedBytesOrNoRecordIsComputedAgain) {
  Result<std::string> first = Get();
  ASSERT_TRUE(first.ok()) << first.status().message();
  const std::string whole = testing::ReadFile(*first);
  // Same size, a page of zeros in the middle (blocks never written back).
  std::string zeros = whole;
  const size_t at = zeros.size() / 2, n = std::min<size_t>(4096, zeros.size() - at);
  zeros.replace(at, n, std::string(n, '\0'));
  if (zeros != whole) {
    testing::WriteFile(*first, zeros);
    const int before = computations_;
    Result<std::string> got = Get();
    ASSERT_TRUE(got.ok());
    EXPECT_EQ(testing::ReadFile(*got), whole);
    EXPECT_EQ(computations_, before + 1);
  }
  // The completion record missing, or cut short: computed again.
  const std::string record = *first + ".done";
  const std::string full_record = testing::ReadFile(record);
  for (size_t cut : {size_t{0}, size_t{1}, full_record.size() / 2, full_record.size() - 1}) {
    ASSERT_EQ(::truncate(record.c_str(), static_cast<off_t>(cut)), 0);
    const int before = computations_;
    Result<std::string> got = Get();
    ASSERT_TRUE(got.ok());
    EXPECT_EQ(computations_, before + 1) << "record cut at " << cut;
    EXPECT_EQ(testing::ReadFile(*got), whole);
    EXPECT_EQ(testing::ReadFile(record), full_record);
  }
  ASSERT_EQ(::unlink(record.c_str()), 0);
  const int before = computations_;
  Result<std::string> got = Get();
  ASSERT_TRUE(got.ok());
  EXPECT_EQ(computations_, before + 1);
  EXPECT_EQ(testing::ReadFile(*got), whole);
}

TEST_P(AverageCacheTest, ResultCutInTheSameProcessIsComputedAgain) {
  AverageCache cache(dir_.path() + "/cache", int64_t{1} << 30);
  Result<std::string> first = cache.Get({a_, b_}, nullptr);
  ASSERT_TRUE(first.ok()) << first.status().message();
  const std::string whole = testing::ReadFile(*first);
  ASSERT_EQ(::truncate(first->c_str(), static_cast<off_t>(whole.size() - 1)), 0);
  Result<std::string> got = cache.Get({a_, b_}, nullptr);
  ASSERT_TRUE(got.ok());
  EXPECT_EQ(testing::ReadFile(*got), whole);
}

INSTANTIATE_TEST_SUITE_P(Formats, AverageCacheTest,
                         ::testing::Values("state_dict_p2.pt", "small.safetensors"));

}  // namespace
}  // namespace ckptfs::core
