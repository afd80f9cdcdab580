#include "fs/committer.h"

#include <gtest/gtest.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <memory>
#include <optional>
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

// A write into a committed checkpoint: a new version in staging whose files
// are links to the committed ones until written. Readers keep the old
// version whole (an open descriptor keeps its data); the commit swaps the
// two in one step and the files nobody rewrote carry over.
TEST_F(CommitterTest, ANewVersionReplacesTheCommittedOneWhole) {
  WriteFile(exp_ + "/CKPT+3/CKPT.yaml", "loss: 0.5\n");
  WriteFile(exp_ + "/CKPT+3/model.ckpt", "old weights");
  WriteFile(exp_ + "/CKPT+3/sub/extra.txt", "kept");
  const int reader = ::open((exp_ + "/CKPT+3/model.ckpt").c_str(), O_RDONLY);
  ASSERT_GE(reader, 0);
  ASSERT_TRUE(committer_->BeginVersion(exp_, "CKPT+3").ok());
  struct stat st {};
  ASSERT_EQ(::stat((staging_ + "/CKPT+3/model.ckpt").c_str(), &st), 0);
  EXPECT_EQ(st.st_nlink, 2u);  // a link to the committed file, not a copy
  ASSERT_TRUE(committer_->BreakLink(staging_ + "/CKPT+3/model.ckpt", /*truncate=*/true).ok());
  ASSERT_EQ(::stat((staging_ + "/CKPT+3/model.ckpt").c_str(), &st), 0);
  EXPECT_EQ(st.st_size, 0);
  EXPECT_EQ(ReadFile(exp_ + "/CKPT+3/model.ckpt"), "old weights");  // readers: old version
  Stage("CKPT+3/model.ckpt", "new weights");
  // CKPT.yaml is still the committed file (a slow save between two files):
  // quiet is not enough.
  EXPECT_EQ(committer_->CommitReady(), 0);
  ASSERT_TRUE(committer_->BreakLink(staging_ + "/CKPT+3/CKPT.yaml", /*truncate=*/true).ok());
  Stage("CKPT+3/CKPT.yaml", "loss: 0.25\n");
  EXPECT_EQ(ReadFile(exp_ + "/CKPT+3/CKPT.yaml"), "loss: 0.5\n");
  EXPECT_EQ(committer_->CommitReady(), 1);
  EXPECT_EQ(ReadFile(exp_ + "/CKPT+3/model.ckpt"), "new weights");
  EXPECT_EQ(ReadFile(exp_ + "/CKPT+3/CKPT.yaml"), "loss: 0.25\n");
  EXPECT_EQ(ReadFile(exp_ + "/CKPT+3/sub/extra.txt"), "kept");
  EXPECT_FALSE(Exists(staging_ + "/CKPT+3"));
  char buf[32] = {};
  EXPECT_EQ(::pread(reader, buf, sizeof(buf) - 1, 0), 11);
  EXPECT_STREQ(buf, "old weights");
  ::close(reader);
}

// The experiment's entry replaced by someone else while the new version was
// written: the exchange is undone, nothing is lost, the version stays staged.
TEST_F(CommitterTest, ANewVersionNeverReplacesAnEntryThatChangedMeanwhile) {
  WriteFile(exp_ + "/CKPT+3/CKPT.yaml", "loss: 0.5\n");
  ASSERT_TRUE(committer_->BeginVersion(exp_, "CKPT+3").ok());
  testing::RemoveTree(exp_ + "/CKPT+3");
  WriteFile(exp_ + "/CKPT+3/CKPT.yaml", "loss: 0.1\n");  // written directly
  ASSERT_TRUE(committer_->BreakLink(staging_ + "/CKPT+3/CKPT.yaml", /*truncate=*/true).ok());
  Stage("CKPT+3/CKPT.yaml", "loss: 0.25\n");
  EXPECT_EQ(committer_->CommitReady(), 0);
  EXPECT_EQ(ReadFile(exp_ + "/CKPT+3/CKPT.yaml"), "loss: 0.1\n");
  EXPECT_TRUE(Exists(staging_ + "/CKPT+3/CKPT.yaml"));
}

// A single-file checkpoint (Lightning's last.ckpt) rewritten: the version
// starts empty (a truncating open) or as a copy.
TEST_F(CommitterTest, ANewVersionOfASingleFile) {
  WriteFile(exp_ + "/last.ckpt", "epoch 1");
  ASSERT_TRUE(committer_->BeginVersion(exp_, "last.ckpt", /*truncate_file=*/false).ok());
  EXPECT_EQ(ReadFile(staging_ + "/last.ckpt"), "epoch 1");
  Stage("last.ckpt", "epoch 2");
  EXPECT_EQ(ReadFile(exp_ + "/last.ckpt"), "epoch 1");
  EXPECT_EQ(committer_->CommitReady(), 1);
  EXPECT_EQ(ReadFile(exp_ + "/last.ckpt"), "epoch 2");
}

// rmtree through new/: the first unlink moves the whole checkpoint to the
// trash; new/NAME then stands for that copy until its rmdir. Pinned: EPERM.
TEST_F(CommitterTest, DeletingThroughNewIsOneRenameAndPinnedStay) {
  WriteFile(exp_ + "/CKPT+3/CKPT.yaml", "loss: 0.5\n");
  WriteFile(exp_ + "/CKPT+4/CKPT.yaml", "loss: 0.5\n");
  WriteFile(exp_ + "/CKPT+4/.keep", "");
  WriteFile(exp_ + "/epoch=1.ckpt", "w");
  std::vector<std::string> deleted;
  committer_->set_on_deleted(
      [&](const std::string&, const std::string& n) { deleted.push_back(n); });
  ASSERT_TRUE(committer_->DeleteThroughNew(exp_, "CKPT+3", 0).ok());
  EXPECT_FALSE(Exists(exp_ + "/CKPT+3"));
  std::optional<std::string> copy = committer_->Deleting(exp_, "CKPT+3");
  ASSERT_TRUE(copy.has_value());
  EXPECT_EQ(ReadFile(*copy + "/CKPT.yaml"), "loss: 0.5\n");
  core::Status pinned = committer_->DeleteThroughNew(exp_, "CKPT+4", 0);
  EXPECT_EQ(pinned.sys_errno(), EPERM) << pinned.message();
  EXPECT_TRUE(Exists(exp_ + "/CKPT+4/CKPT.yaml"));
  ASSERT_TRUE(committer_->DeleteThroughNew(exp_, "epoch=1.ckpt", 0).ok());
  EXPECT_FALSE(Exists(exp_ + "/epoch=1.ckpt"));
  EXPECT_FALSE(committer_->Deleting(exp_, "epoch=1.ckpt").has_value());  // a file: gone at once
  EXPECT_EQ(deleted, (std::vector<std::string>{"CKPT+3", "epoch=1.ckpt"}));
  // An rmtree that never finished: its copy goes when the committer stops.
  committer_->StopAndCommit();
  EXPECT_FALSE(Exists(*copy));
  EXPECT_FALSE(committer_->Deleting(exp_, "CKPT+3").has_value());
}

// Completeness: quiet is not enough while a file of the predecessor is
// missing (a slow save hook between two files); a stop commits only what is
// whole.
TEST_F(CommitterTest, WaitsForEveryFileOfThePredecessor) {
  committer_->set_previous_files(
      [](const std::string&, const std::string&, const std::string& meta)
          -> std::optional<std::vector<std::string>> {
        if (meta != "CKPT.yaml") return std::nullopt;
        return std::vector<std::string>{"CKPT.yaml", "counter.ckpt", "model.ckpt"};
      });
  Stage("CKPT+4/CKPT.yaml", "loss: 0.5\n");
  Stage("CKPT+4/model.ckpt", "w");
  Stage("CKPT+5/CKPT.yaml", "loss: 0.5\n");
  EXPECT_EQ(committer_->CommitReady(), 0);  // the default --commit-wait is 30 s
  Stage("CKPT+4/counter.ckpt", "4");
  EXPECT_EQ(committer_->CommitReady(), 1);
  EXPECT_TRUE(Exists(exp_ + "/CKPT+4/counter.ckpt"));
  EXPECT_EQ(committer_->StopAndCommit(), 0);  // CKPT+5 is not whole: it stays staged
  EXPECT_FALSE(Exists(exp_ + "/CKPT+5"));
  EXPECT_TRUE(Exists(staging_ + "/CKPT+5/CKPT.yaml"));
}

}  // namespace
}  // namespace ckptfs::fs
