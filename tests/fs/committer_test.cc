#include "fs/committer.h"

#include <gtest/gtest.h>
#include <sys/stat.h>

#include <chrono>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "index/resolver.h"
#include "test_util.h"

namespace ckptfs::fs {
namespace {

using testing::ReadFile;
using testing::WriteFile;

bool Exists(const std::string& path) {
  struct stat st {};
  return ::lstat(path.c_str(), &st) == 0;
}

// A committer with no quiet period (every staged entry is a candidate at
// once) whose thread is never started: CommitReady runs in the test.
class CommitterTest : public ::testing::Test {
 protected:
  void SetUp() override {
    exp_ = dir_.path() + "/exp";
    staging_ = index::StagingDir(exp_);
    Committer::Settings settings;
    settings.quiet = std::chrono::milliseconds(0);
    committer_ = std::make_unique<Committer>(
        settings,
        [this](const std::string& e, const std::string& n) { committed_.emplace_back(e, n); });
  }

  // What a writer leaves in staging; the committer hears of it as the FUSE
  // threads would tell it.
  void Stage(const std::string& relative, const std::string& content) {
    WriteFile(staging_ + "/" + relative, content);
    committer_->Touched(staging_ + "/" + relative);
  }

  testing::TempDir dir_;
  std::string exp_;
  std::string staging_;
  std::unique_ptr<Committer> committer_;
  std::vector<std::pair<std::string, std::string>> committed_;
};

TEST_F(CommitterTest, CommitsAStagedCheckpoint) {
  Stage("CKPT+2/CKPT.yaml", "loss: 0.5\n");
  Stage("CKPT+2/notes.txt", "two");
  EXPECT_EQ(committer_->CommitReady(), 1);
  EXPECT_EQ(ReadFile(exp_ + "/CKPT+2/notes.txt"), "two");
  EXPECT_FALSE(Exists(staging_ + "/CKPT+2"));
  ASSERT_EQ(committed_.size(), 1u);
  EXPECT_EQ(committed_[0], std::make_pair(exp_, std::string("CKPT+2")));
}

// A single file written straight into the experiment after its namesake was
// staged: a plain rename would replace it without a word.
TEST_F(CommitterTest, NeverReplacesAFileWrittenDirectlyUnderTheSameName) {
  Stage("epoch=3-step=30.ckpt", "staged");
  WriteFile(exp_ + "/epoch=3-step=30.ckpt", "direct");
  EXPECT_EQ(committer_->CommitReady(), 0);
  EXPECT_EQ(ReadFile(exp_ + "/epoch=3-step=30.ckpt"), "direct");
  EXPECT_EQ(ReadFile(staging_ + "/epoch=3-step=30.ckpt"), "staged");  // waits in staging
  EXPECT_TRUE(committed_.empty());
  // Still refused on the next look; committed once the name is free.
  EXPECT_EQ(committer_->CommitReady(), 0);
  ASSERT_EQ(::unlink((exp_ + "/epoch=3-step=30.ckpt").c_str()), 0);
  EXPECT_EQ(committer_->CommitReady(), 1);
  EXPECT_EQ(ReadFile(exp_ + "/epoch=3-step=30.ckpt"), "staged");
  EXPECT_EQ(committed_.size(), 1u);
}

// An empty directory of the same name (a direct writer that has just made
// it): a plain rename replaces an empty directory too.
TEST_F(CommitterTest, NeverReplacesAnEmptyDirectoryCreatedDirectly) {
  Stage("CKPT+2/CKPT.yaml", "loss: 0.5\n");
  ASSERT_EQ(::mkdir((exp_ + "/CKPT+2").c_str(), 0755), 0);
  EXPECT_EQ(committer_->CommitReady(), 0);
  EXPECT_FALSE(Exists(exp_ + "/CKPT+2/CKPT.yaml"));
  EXPECT_EQ(ReadFile(staging_ + "/CKPT+2/CKPT.yaml"), "loss: 0.5\n");
  EXPECT_TRUE(committed_.empty());
}

}  // namespace
}  // namespace ckptfs::fs
