#include "fs/options.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <string>
#include <vector>

#include "test_util.h"

namespace ckptfs::fs {
namespace {

using testing::WriteFile;

class OptionsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    src_ = dir_.path() + "/src";
    mnt_ = dir_.path() + "/mnt";
    WriteFile(src_ + "/exp/CKPT+1/CKPT.yaml", "loss: 1\n");
    WriteFile(mnt_ + "/.keep", "");
  }

  core::Result<Options> Parse(std::vector<std::string> args, const std::string& argv0 = "ckptfs") {
    args.insert(args.begin(), argv0);
    std::vector<char*> argv;
    for (std::string& a : args) argv.push_back(a.data());
    return ParseOptions(static_cast<int>(argv.size()), argv.data());
  }

  std::string Config(const std::string& mount_json) {
    const std::string path = dir_.path() + "/ckptfs.json";
    WriteFile(path, "{\"mounts\": {\"exp\": " + mount_json + "}}");
    return path;
  }

  testing::TempDir dir_;
  std::string src_, mnt_;
};

TEST_F(OptionsTest, DashOSplitsCkptfsOptionsFromFuseOptions) {
  auto o = Parse({"mount", "-o",
                  "allow_other,keep_last=3,keep-best=min:loss:2,links,nofail,x-systemd.after=a",
                  "-oro", src_, mnt_});
  ASSERT_TRUE(o.ok()) << o.status().message();
  EXPECT_EQ(o->policy.keep_last, 3);
  ASSERT_EQ(o->policy.keep_best.size(), 1u);
  EXPECT_TRUE(o->links);
  EXPECT_EQ(o->fuse_options, (std::vector<std::string>{"allow_other", "ro"}));
  EXPECT_FALSE(Parse({"mount", "-o", "keep_last", src_, mnt_}).ok());  // needs =VALUE
  EXPECT_FALSE(Parse({"mount", "-o", "links=1", src_, mnt_}).ok());    // takes none
  EXPECT_FALSE(Parse({"mount", "-o", "keep_last=x", src_, mnt_}).ok());
}

TEST_F(OptionsTest, MountFuse3AndHelperForms) {
  auto o = Parse({src_, mnt_, "-o", "rw,keep_last=2"});
  ASSERT_TRUE(o.ok()) << o.status().message();
  EXPECT_EQ(o->command, Command::kMount);
  EXPECT_EQ(o->policy.keep_last, 2);
  EXPECT_EQ(o->fuse_options, (std::vector<std::string>{"rw"}));
  o = Parse({src_, mnt_, "-n", "-o", "keep_last=2", "-t", "fuse.ckptfs"},
            "/sbin/mount.fuse.ckptfs");
  ASSERT_TRUE(o.ok()) << o.status().message();
  EXPECT_EQ(o->command, Command::kMount);
  EXPECT_FALSE(o->foreground);
  // Not a directory: an unknown command, not a mount.
  EXPECT_FALSE(Parse({"lss", src_, mnt_}).ok());
}

TEST_F(OptionsTest, ConfigurationThenCommandLine) {
  const std::string config =
      Config("{\"source\": \"" + src_ + "\", \"mountpoint\": \"" + mnt_ +
             "\", \"commit_quiet\": 2.5, \"links\": true, \"log_level\": \"debug\","
             " \"fuse_options\": [\"allow_other\"],"
             " \"policy\": {\"keep_last\": 4, \"keep_best\": [\"min:loss:1\"]}}");
  auto o = Parse({"mount", "--config", config, "--name", "exp", "-o", "ro"});
  ASSERT_TRUE(o.ok()) << o.status().message();
  EXPECT_EQ(o->source, src_);
  EXPECT_EQ(o->name, "exp");
  EXPECT_DOUBLE_EQ(o->commit_quiet, 2.5);
  EXPECT_TRUE(o->links);
  EXPECT_EQ(o->log_level, core::LogLevel::kDebug);
  EXPECT_EQ(o->policy.keep_last, 4);
  EXPECT_EQ(o->fuse_options, (std::vector<std::string>{"allow_other", "ro"}));
  // Flags win; a policy on the command line replaces the configured one.
  o = Parse(
      {"mount", "--config", config, "--name", "exp", "--commit-quiet", "1", "--keep-last", "1"});
  ASSERT_TRUE(o.ok()) << o.status().message();
  EXPECT_DOUBLE_EQ(o->commit_quiet, 1);
  EXPECT_EQ(o->policy.keep_last, 1);
  EXPECT_TRUE(o->policy.keep_best.empty());
  // Operands on the command line win over the configured ones.
  o = Parse({"prune", "--config", config, "--name", "exp", dir_.path()});
  ASSERT_TRUE(o.ok()) << o.status().message();
  EXPECT_EQ(o->source, dir_.path());
  // Mount-only settings do not break other commands.
  o = Parse({"status", "--config", config, "--name", "exp"});
  ASSERT_TRUE(o.ok()) << o.status().message();
  EXPECT_EQ(o->mountpoint, mnt_);
}

TEST_F(OptionsTest, BadConfigurationsNameTheFileAndTheProblem) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"{\"source\": 1}", "'source' must be a string"},
      {"{\"keep_last\": 3}", "'keep_last' is a retention rule: put it in \"policy\""},
      {"{\"keep_lats\": 3}", "unknown key 'keep_lats'"},
      {"{\"links\": \"yes\"}", "'links' must be true or false"},
      {"{\"policy\": {\"keep_lats\": 3}}", "unknown rule 'keep_lats'"},
      {"[]", "expected an object"},
  };
  for (const auto& [json, message] : cases) {
    const std::string config = Config(json);
    auto o = Parse({"ls", "--config", config, "--name", "exp", src_});
    ASSERT_FALSE(o.ok()) << json;
    EXPECT_NE(o.status().message().find(config), std::string::npos) << o.status().message();
    EXPECT_NE(o.status().message().find(message), std::string::npos) << o.status().message();
  }
  const std::string config = Config("{}");
  auto o = Parse({"ls", "--config", config, "--name", "other", src_});
  ASSERT_FALSE(o.ok());
  EXPECT_NE(o.status().message().find("no mount named 'other' (configured: exp)"),
            std::string::npos);
  EXPECT_FALSE(Parse({"ls", "--config", config, src_}).ok());  // which mount?
  WriteFile(config, "{not json");
  EXPECT_FALSE(Parse({"ls", "--config", config, "--name", "exp", src_}).ok());
}

TEST_F(OptionsTest, PollPeriod) {
  auto o = Parse({"mount", src_, mnt_});
  ASSERT_TRUE(o.ok()) << o.status().message();
  EXPECT_LT(o->poll, 0);  // not given: decided by the source's filesystem
  o = Parse({"mount", "--poll", "1.5", src_, mnt_});
  ASSERT_TRUE(o.ok()) << o.status().message();
  EXPECT_DOUBLE_EQ(o->poll, 1.5);
  o = Parse({"mount", src_, mnt_, "-o", "poll=0"});
  ASSERT_TRUE(o.ok()) << o.status().message();
  EXPECT_DOUBLE_EQ(o->poll, 0);
  for (const char* bad : {"-1", "x", "0.01", "4000", ""}) {
    o = Parse({"mount", "--poll", bad, src_, mnt_});
    ASSERT_FALSE(o.ok()) << bad;
    EXPECT_NE(o.status().message().find("--poll"), std::string::npos) << o.status().message();
  }
  EXPECT_FALSE(Parse({"ls", "--poll", "1", src_}).ok());  // a mount option only
}

}  // namespace
}  // namespace ckptfs::fs

namespace ckptfs::fs {
namespace {

// Relative --index and --avg-cache paths are made absolute when parsed: the
// daemon leaves its working directory, and a bare file name has no parent in
// its text (it used to become a directory, then SQLite could not open it).
TEST_F(OptionsTest, RelativeIndexAndCachePathsAreAbsolute) {
  char cwd[4096];
  ASSERT_NE(::getcwd(cwd, sizeof(cwd)), nullptr);
  ASSERT_EQ(::chdir(dir_.path().c_str()), 0);
  core::Result<Options> o =
      Parse({"cat", "--index", "idx.db", "--avg-cache", "c/avg", src_, "/exp/latest"});
  ASSERT_EQ(::chdir(cwd), 0);
  ASSERT_TRUE(o.ok()) << o.status().message();
  EXPECT_EQ(o->index_path, dir_.path() + "/idx.db");
  EXPECT_EQ(o->avg_cache, dir_.path() + "/c/avg");
}

}  // namespace
}  // namespace ckptfs::fs
