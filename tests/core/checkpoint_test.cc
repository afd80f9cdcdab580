#include "core/checkpoint.h"

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>

#include "test_util.h"

namespace ckptfs::core {
namespace {

TEST(CheckpointTest, NaturalSortKeyOrdersNumbersByValue) {
  std::vector<std::string> names = {
      "checkpoint-10000", "checkpoint-5000", "checkpoint-500", "a10", "a2", "a02b", "b"};
  std::sort(names.begin(), names.end(), [](const std::string& a, const std::string& b) {
    return NaturalSortKey(a) < NaturalSortKey(b);
  });
  EXPECT_EQ(names, (std::vector<std::string>{"a2", "a02b", "a10", "b", "checkpoint-500",
                                             "checkpoint-5000", "checkpoint-10000"}));
}

TEST(CheckpointTest, DirectoryLayouts) {
  EXPECT_EQ(DirectoryLayout("CKPT+2024-01-01+00-00-00+00", true, false, false),
            Layout::kSpeechBrain);
  EXPECT_EQ(DirectoryLayout("anything", false, true, false), Layout::kNative);
  EXPECT_EQ(DirectoryLayout("checkpoint-500", false, false, true), Layout::kHuggingFace);
  EXPECT_FALSE(DirectoryLayout("checkpoint-", false, false, true).has_value());
  EXPECT_FALSE(DirectoryLayout("checkpoint-5a", false, false, true).has_value());
  EXPECT_FALSE(DirectoryLayout("CKPT+x", false, false, false).has_value());
  EXPECT_FALSE(DirectoryLayout("save", true, false, false).has_value());
}

TEST(CheckpointTest, NewerByRecencyThenStepThenName) {
  Checkpoint a, b;
  a.name = "checkpoint-10000", b.name = "checkpoint-5000";
  a.recency = b.recency = 100;
  EXPECT_TRUE(IsNewer(a, b));  // name, naturally
  b.step = 5;
  EXPECT_TRUE(IsNewer(b, a));  // a step beats none
  a.step = 6;
  EXPECT_TRUE(IsNewer(a, b));
  b.recency = 101;
  EXPECT_TRUE(IsNewer(b, a));
}

TEST(CheckpointTest, MetaFileBeyondItsBudgetIsInvalidNotRead) {
  testing::TempDir dir;
  const std::string sb = dir.path() + "/CKPT+1";
  testing::WriteFile(sb + "/CKPT.yaml", "loss: 0.5\n");
  ASSERT_EQ(::truncate((sb + "/CKPT.yaml").c_str(), static_cast<off_t>(kMaxYamlMetaBytes) + 1), 0);
  Result<Checkpoint> c = LoadCheckpoint(sb, Layout::kSpeechBrain);
  ASSERT_TRUE(c.ok()) << c.status().message();
  EXPECT_FALSE(c->valid);
  EXPECT_NE(c->error.find(sb + "/CKPT.yaml"), std::string::npos) << c->error;
  EXPECT_NE(c->error.find(std::to_string(kMaxYamlMetaBytes) + "-byte budget"), std::string::npos)
      << c->error;

  // The same size is fine for JSON, whose budget is larger.
  const std::string hf = dir.path() + "/checkpoint-7";
  std::string state = R"({"global_step": 7, "log_history": [{"eval_loss": NaN, "step": 7}]})";
  state += std::string(kMaxYamlMetaBytes + 1 - state.size(), ' ');
  testing::WriteFile(hf + "/trainer_state.json", state);
  c = LoadCheckpoint(hf, Layout::kHuggingFace);
  ASSERT_TRUE(c.ok());
  EXPECT_TRUE(c->valid) << c->error;
  EXPECT_EQ(*c->step, 7);
  EXPECT_FALSE(c->meta.Number("eval_loss").has_value());
}

TEST(CheckpointTest, FifoInPlaceOfTheMetaFileDoesNotHang) {
  testing::TempDir dir;
  const std::string sb = dir.path() + "/CKPT+1";
  testing::MakeDirs(sb);
  ASSERT_EQ(::mkfifo((sb + "/CKPT.yaml").c_str(), 0600), 0);
  Result<Checkpoint> c = LoadCheckpoint(sb, Layout::kSpeechBrain);  // blocked in open() before
  ASSERT_TRUE(c.ok()) << c.status().message();
  EXPECT_FALSE(c->valid);
  EXPECT_NE(c->error.find("not a regular file"), std::string::npos) << c->error;
}

TEST(CheckpointTest, StepPrefersGlobalStep) {
  Meta m;
  m.Set("epoch", MetaValue::Number(3));
  m.Set("global_step", MetaValue::Number(300));
  EXPECT_EQ(*StepOf(m), 300);
  EXPECT_EQ(SingleFileAlias("epoch=3-step=1.ckpt"), "checkpoint.ckpt");
}

}  // namespace
}  // namespace ckptfs::core
