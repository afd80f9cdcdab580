#include "core/averaging.h"

#include <dirent.h>
#include <gtest/gtest.h>
#include <sys/mount.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <thread>

#include "core/average_cache.h"
#include "core/cancel.h"
#include "test_util.h"

namespace ckptfs::core {
namespace {

using testing::TempDir;

std::string Fixture(const std::string& name) {
  return std::string(CKPTFS_TENSOR_FIXTURES) + "/" + name;
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
  return names;
}

// A safetensors file of one F32 tensor "w" of n elements, all `value`, and
// an I64 "step".
std::string Safetensors(const std::string& path, size_t n, float value) {
  const std::string json = "{\"w\":{\"dtype\":\"F32\",\"shape\":[" + std::to_string(n) +
                           "],\"data_offsets\":[0," + std::to_string(4 * n) +
                           "]},\"step\":{\"dtype\":\"I64\",\"shape\":[1],\"data_offsets\":[" +
                           std::to_string(4 * n) + "," + std::to_string(4 * n + 8) + "]}}";
  std::string bytes(8, '\0');
  for (int i = 0; i < 8; ++i) bytes[i] = static_cast<char>(json.size() >> (8 * i));
  bytes += json;
  std::vector<float> w(n, value);
  bytes.append(reinterpret_cast<const char*>(w.data()), 4 * n);
  bytes.append(8, '\x01');
  testing::WriteFile(path, bytes);
  return path;
}

// torch.save(EXPR, path) by Debian's python3-torch; false when unavailable.
bool TorchSave(const std::string& expr, const std::string& path) {
  const std::string cmd = "/usr/bin/python3 -c 'import sys, torch; torch.save(" + expr +
                          ", sys.argv[1])' '" + path + "' 2>/dev/null";
  return std::system(cmd.c_str()) == 0;
}

// Installs a cancellation check for the test's scope.
class ScopedCancelCheck {
 public:
  ScopedCancelCheck(CancelCheck check, void* arg) { SetCancelCheck(check, arg); }
  ~ScopedCancelCheck() { SetCancelCheck(nullptr, nullptr); }
};

class AveragingTest : public ::testing::Test {
 protected:
  std::string Copy(const std::string& name, const std::string& as) {
    std::string to = dir_.path() + "/" + as;
    testing::CopyFile(Fixture(name), to);
    return to;
  }
  // Only the named files are left in the test's directory: no output, no
  // temporary file.
  void ExpectOnly(const std::vector<std::string>& names) {
    std::vector<std::string> got = Listing(dir_.path()), want = names;
    std::sort(got.begin(), got.end());
    std::sort(want.begin(), want.end());
    EXPECT_EQ(got, want);
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

TEST_F(AveragingTest, MemberTruncatedWhileReadFailsNamingIt) {
  // Truncated between two reads (from the progress callback, which runs
  // between storages): a read error naming the file, never SIGBUS.
  struct Case {
    std::string fixture, ext;
    size_t victim;  // the member truncated
  } cases[] = {{"lightning.ckpt", ".ckpt", 1}, {"small.safetensors", ".safetensors", 0}};
  for (const Case& c : cases) {
    std::string a = Copy(c.fixture, "a" + c.ext), b = Copy(c.fixture, "b" + c.ext);
    const std::string victim = c.victim == 0 ? a : b;
    bool truncated = false;
    Result<AverageResult> r =
        AverageFiles({a, b}, dir_.path() + "/out" + c.ext, [&](const AverageProgress& p) {
          if (!truncated && std::string(p.stage) == "averaging" && p.done > 0) {
            ASSERT_EQ(::truncate(victim.c_str(), 0), 0);
            truncated = true;
          }
        });
    ASSERT_TRUE(truncated) << c.fixture;
    ASSERT_FALSE(r.ok()) << c.fixture;
    EXPECT_EQ(r.status().code(), StatusCode::kCorrupt) << r.status().message();
    EXPECT_NE(r.status().message().find(victim + ": ends at"), std::string::npos)
        << r.status().message();
    EXPECT_NE(r.status().message().find("truncated while being read"), std::string::npos)
        << r.status().message();
    ExpectOnly({"a" + c.ext, "b" + c.ext});
    ::unlink(a.c_str());
    ::unlink(b.c_str());
  }
}

TEST_F(AveragingTest, MemberChangedWhileReadFailsNamingIt) {
  struct Case {
    std::string fixture, ext;
    bool replace;  // renamed over, else touched
    const char* says;
  } cases[] = {{"lightning.ckpt", ".ckpt", false, "modified"},
               {"lightning.ckpt", ".ckpt", true, "replaced by another file"},
               {"small.safetensors", ".safetensors", false, "modified"},
               {"small.safetensors", ".safetensors", true, "replaced by another file"}};
  for (const Case& c : cases) {
    std::string a = Copy(c.fixture, "a" + c.ext), b = Copy(c.fixture, "b" + c.ext);
    bool changed = false;
    Result<AverageResult> r =
        AverageFiles({a, b}, dir_.path() + "/out" + c.ext, [&](const AverageProgress& p) {
          if (changed || std::string(p.stage) != "averaging") return;
          if (c.replace) {
            testing::CopyFile(b, b + ".new");
            ASSERT_EQ(::rename((b + ".new").c_str(), b.c_str()), 0);
          } else {
            testing::SetMtime(b, 12345);
          }
          changed = true;
        });
    ASSERT_FALSE(r.ok()) << c.fixture << " " << c.says;
    EXPECT_EQ(r.status().message(), b + ": changed while it was read (" + c.says + ")");
    ExpectOnly({"a" + c.ext, "b" + c.ext});
    ::unlink(a.c_str());
    ::unlink(b.c_str());
  }
}

TEST_F(AveragingTest, CancellationStopsAnAverageWithinATensor) {
  // One tensor of 16 MiB: several pieces per member. Cancelled at the third
  // poll, the average stops before that tensor is done (pieces are averaged
  // by several threads, each polling: at least three polls).
  std::string a = Safetensors(dir_.path() + "/a.safetensors", 4 << 20, 1.0f);
  std::string b = Safetensors(dir_.path() + "/b.safetensors", 4 << 20, 3.0f);
  std::vector<std::string> inputs = {"a.safetensors", "b.safetensors"};
  std::string big = dir_.path() + "/big.pt";
  if (TorchSave("{\"w\": torch.ones(4 << 20)}", big)) inputs.push_back("big.pt");
  struct Poll {
    std::atomic<int> polls{0};
  } poll;
  ScopedCancelCheck check([](void* arg) { return ++static_cast<Poll*>(arg)->polls >= 3; }, &poll);
  std::vector<std::vector<std::string>> runs = {{a, b}};
  if (inputs.size() == 3) runs.push_back({big, big});
  for (const auto& members : runs) {
    poll.polls = 0;
    int64_t done = 0;
    Result<AverageResult> r =
        AverageFiles(members, members[0] + ".out",
                     [&](const AverageProgress& p) { done = std::max(done, p.done); });
    ASSERT_FALSE(r.ok()) << members[0];
    EXPECT_EQ(r.status().sys_errno(), ECANCELED) << r.status().message();
    EXPECT_NE(r.status().message().find("cancelled (ckptfs is stopping)"), std::string::npos);
    EXPECT_LT(done, int64_t{16} << 20) << "stopped within the first tensor";
    EXPECT_GE(poll.polls.load(), 3);
    ExpectOnly(inputs);
  }
  if (inputs.size() == 2) GTEST_SKIP() << "torch part skipped: no /usr/bin/python3 with torch";
}

TEST_F(AveragingTest, CacheOnAFullDiskFailsAndLeavesNothing) {
  // A real ENOSPC: the cache on a 1 MiB tmpfs, outputs of 8 MiB. libtorch's
  // writer must not throw from its destructor (std::terminate), and the
  // temporary file must go.
  const std::string cache = dir_.path() + "/cache";
  testing::MakeDirs(cache);
  if (::mount("tmpfs", cache.c_str(), "tmpfs", 0, "size=1m") != 0) {
    GTEST_SKIP() << "cannot mount a tmpfs for the cache (needs root): " << std::strerror(errno);
  }
  struct Unmount {
    std::string dir;
    ~Unmount() { ::umount2(dir.c_str(), MNT_DETACH); }
  } unmount{cache};
  std::vector<std::vector<std::string>> runs;
  runs.push_back({Safetensors(dir_.path() + "/a.safetensors", 2 << 20, 1.0f),
                  Safetensors(dir_.path() + "/b.safetensors", 2 << 20, 2.0f)});
  const std::string t = dir_.path() + "/t.pt";
  if (TorchSave("{\"a\": torch.ones(1 << 20), \"b\": torch.ones(1 << 20)}", t))
    runs.push_back({t, t});
  AverageCache averages(cache, int64_t{1} << 30);
  for (const auto& members : runs) {
    Result<std::string> r = averages.Get(members, nullptr);
    ASSERT_FALSE(r.ok()) << members[0];
    EXPECT_EQ(r.status().sys_errno(), ENOSPC) << r.status().message();
    EXPECT_NE(r.status().message().find(cache + "/"), std::string::npos) << r.status().message();
    EXPECT_EQ(Listing(cache), std::vector<std::string>{}) << "the temporary file is removed";
  }
  if (runs.size() == 1) GTEST_SKIP() << "torch part skipped: no /usr/bin/python3 with torch";
}

TEST_F(AveragingTest, SafetensorsWhoseSizesOverflowAreCorrupt) {
  const std::string corpus =
      std::string(CKPTFS_TENSOR_FIXTURES) + "/../../fuzz/corpus/safetensors/";
  for (const char* name : {"overflow_shape.safetensors", "overflow_numel.safetensors"}) {
    Result<AverageResult> r =
        AverageFiles({corpus + name, corpus + name}, dir_.path() + "/out", nullptr);
    ASSERT_FALSE(r.ok()) << name;
    EXPECT_EQ(r.status().code(), StatusCode::kCorrupt);
    EXPECT_NE(r.status().message().find(name), std::string::npos) << r.status().message();
    EXPECT_NE(r.status().message().find("shape overflows"), std::string::npos)
        << r.status().message();
  }
}

}  // namespace
}  // namespace ckptfs::core
