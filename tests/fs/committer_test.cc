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
    testing::MakeDirs(exp_);
    auto source = core::Beneath::Open(dir_.path());
    ASSERT_TRUE(source.ok()) << source.status().message();
    source_ = std::move(*source);
    Committer::Settings settings;
    settings.quiet = std::chrono::milliseconds(0);
    committer_ = std::make_unique<Committer>(
        &source_, settings,
        [this](const std::string& e, const std::string& n) { committed_.emplace_back(e, n); });
  }

  // What a writer leaves in staging; the committer hears of it as the FUSE
  // threads would tell it.
  void Stage(const std::string& relative, const std::string& content) {
    WriteFile(staging_ + "/" + relative, content);
    committer_->Touched(staging_ + "/" + relative);
  }

  testing::TempDir dir_;
  core::Beneath source_;
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

// Attack A on new/: `.ckptfs-staging` a link to a victim's directory. The
// committer must neither commit from it nor move anything out of it.
TEST_F(CommitterTest, RefusesASymlinkedStagingDirectory) {
  const std::string victim = dir_.path() + "/victim";
  WriteFile(victim + "/CKPT+7/CKPT.yaml", "loss: 0.1\n");
  ASSERT_EQ(::symlink(victim.c_str(), staging_.c_str()), 0);
  committer_->Touched(staging_ + "/CKPT+7/CKPT.yaml");
  EXPECT_EQ(committer_->CommitReady(), 0);
  EXPECT_FALSE(Exists(exp_ + "/CKPT+7"));
  EXPECT_EQ(ReadFile(victim + "/CKPT+7/CKPT.yaml"), "loss: 0.1\n");
  EXPECT_TRUE(committed_.empty());
  auto opened = committer_->OpenStaging(exp_, true);
  EXPECT_EQ(opened.status().code(), core::StatusCode::kPermission);
  EXPECT_NE(opened.status().message().find(staging_), std::string::npos);

  EXPECT_TRUE(Committer::RecoverStaging(source_, exp_).empty());
  EXPECT_TRUE(Exists(victim + "/CKPT+7/CKPT.yaml"));
  EXPECT_FALSE(Exists(exp_ + "/" + core::kAbandonedDir));
}

// A restarted daemon moves leftovers to .ckptfs-abandoned, but never into an
// abandoned directory someone else made (or one others can write).
TEST_F(CommitterTest, RecoveryRefusesAnAbandonedDirectoryThatIsNotItsOwn) {
  Stage("CKPT+3/CKPT.yaml", "loss: 0.5\n");
  const std::string abandoned = exp_ + "/" + core::kAbandonedDir;
  ASSERT_EQ(::mkdir(abandoned.c_str(), 0777), 0);
  ASSERT_EQ(::chmod(abandoned.c_str(), 0777), 0);
  EXPECT_TRUE(Committer::RecoverStaging(source_, exp_).empty());
  EXPECT_TRUE(Exists(staging_ + "/CKPT+3/CKPT.yaml"));  // stays where it was
  EXPECT_FALSE(Exists(abandoned + "/CKPT+3"));
  // Its own abandoned directory: moved, and staging removed.
  ASSERT_EQ(::rmdir(abandoned.c_str()), 0);
  std::vector<std::string> moved = Committer::RecoverStaging(source_, exp_);
  ASSERT_EQ(moved.size(), 1u);
  EXPECT_EQ(ReadFile(moved[0] + "/CKPT.yaml"), "loss: 0.5\n");
  EXPECT_FALSE(Exists(staging_));
}

// A symbolic link planted inside a staged checkpoint is never followed by
// the fsync walk, and the checkpoint is not committed.
TEST_F(CommitterTest, ALinkInsideAStagedCheckpointIsNotCommitted) {
  Stage("CKPT+4/CKPT.yaml", "loss: 0.5\n");
  ASSERT_EQ(::symlink("/etc", (staging_ + "/CKPT+4/etc").c_str()), 0);
  EXPECT_EQ(committer_->CommitReady(), 0);
  EXPECT_FALSE(Exists(exp_ + "/CKPT+4"));
}

TEST_F(CommitterTest, RefusesAStagingDirectoryOfAnotherUser) {
  if (::geteuid() != 0) GTEST_SKIP() << "another owner needs root to chown";
  Stage("CKPT+5/CKPT.yaml", "loss: 0.5\n");
  ASSERT_EQ(::chown(staging_.c_str(), 65534, 65534), 0);
  EXPECT_EQ(committer_->CommitReady(), 0);
  EXPECT_FALSE(Exists(exp_ + "/CKPT+5"));
  EXPECT_TRUE(Exists(staging_ + "/CKPT+5/CKPT.yaml"));
}

}  // namespace
}  // namespace ckptfs::fs
