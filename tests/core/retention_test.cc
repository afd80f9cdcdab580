#include "core/retention.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include "test_util.h"

namespace ckptfs::core {
namespace {

RetentionCandidate Ckpt(const std::string& name, double unixtime,
                        std::vector<std::pair<std::string, double>> meta, int64_t bytes = 100) {
  RetentionCandidate c;
  c.checkpoint.name = name;
  c.checkpoint.path = "/exp/" + name;
  c.checkpoint.experiment = "/exp";
  c.checkpoint.recency = unixtime;
  for (auto& [k, v] : meta) c.checkpoint.meta.Set(k, MetaValue::Number(v));
  c.bytes = bytes;
  return c;
}

std::vector<std::string> Deleted(const RetentionPolicy& p, const std::vector<RetentionCandidate>& cs) {
  std::vector<std::string> out;
  std::vector<RetentionDecision> d = DecideRetention(p, cs);
  for (size_t i = 0; i < d.size(); ++i) {
    if (!d[i].keep) out.push_back(cs[i].checkpoint.name);
  }
  return out;
}

RetentionPolicy Policy(std::vector<std::pair<std::string, std::string>> options) {
  RetentionPolicy p;
  for (auto& [k, v] : options) EXPECT_TRUE(AddPolicyOption(k, v, &p).ok()) << k << " " << v;
  return p;
}

// A run of six checkpoints: c6 is newest; c4 has no loss.
std::vector<RetentionCandidate> SixCheckpoints() {
  return {Ckpt("c1", 100, {{"loss", 0.9}, {"epoch", 1}}), Ckpt("c2", 200, {{"loss", 0.2}, {"epoch", 2}}),
          Ckpt("c3", 300, {{"loss", 0.5}, {"epoch", 3}}), Ckpt("c4", 400, {{"epoch", 4}}),
          Ckpt("c5", 500, {{"loss", 0.3}, {"epoch", 5}}), Ckpt("c6", 600, {{"loss", 0.7}, {"epoch", 6}})};
}

// SpeechBrain: delete_checkpoints(num_to_keep=N, min_keys=..., max_keys=...,
// importance_keys=[ckpt_recency]) keeps the N most recent and the N best by
// each key, and only deletes checkpoints some key ranks.
TEST(RetentionPolicyTest, SpeechBrainKeepLast) {
  EXPECT_EQ(Deleted(Policy({{"--keep-last", "2"}}), SixCheckpoints()),
            (std::vector<std::string>{"c1", "c2", "c3", "c4"}));
}

TEST(RetentionPolicyTest, SpeechBrainKeepBestPerKeyWithoutTheKeyIsNoCandidate) {
  // Only keep_best: c4 lacks loss, so no rule ranks it and it stays; the
  // newest (c6) is never deleted.
  EXPECT_EQ(Deleted(Policy({{"--keep-best", "min:loss:2"}}), SixCheckpoints()),
            (std::vector<std::string>{"c1", "c3"}));
  EXPECT_EQ(Deleted(Policy({{"--keep-best", "max:loss:1"}}), SixCheckpoints()),
            (std::vector<std::string>{"c2", "c3", "c5"}));
}

TEST(RetentionPolicyTest, SpeechBrainUnionOfKeepLastAndKeepBest) {
  EXPECT_EQ(Deleted(Policy({{"--keep-last", "1"}, {"--keep-best", "min:loss:2"}}), SixCheckpoints()),
            (std::vector<std::string>{"c1", "c3", "c4"}));
  EXPECT_EQ(Deleted(Policy({{"--keep-last", "1"}, {"--keep-best", "min:loss:1"},
                            {"--keep-best", "max:epoch:2"}}),
                    SixCheckpoints()),
            (std::vector<std::string>{"c1", "c3", "c4"}));
}

TEST(RetentionPolicyTest, KeepEveryAndBuckets) {
  EXPECT_EQ(Deleted(Policy({{"--keep-every", "epoch:2"}}), SixCheckpoints()), (std::vector<std::string>{"c1", "c3", "c5"}));
  // Hourly buckets: c1..c6 at hours 0,0,1,1,2,2 (3600 s apart in pairs).
  std::vector<RetentionCandidate> hours = {Ckpt("h1", 10, {}), Ckpt("h2", 20, {}), Ckpt("h3", 3610, {}),
                                           Ckpt("h4", 3620, {}), Ckpt("h5", 7210, {}), Ckpt("h6", 7220, {})};
  EXPECT_EQ(Deleted(Policy({{"--keep-hourly", "2"}}), hours), (std::vector<std::string>{"h1", "h2", "h3", "h5"}));
  EXPECT_EQ(Deleted(Policy({{"--keep-daily", "1"}}), hours),
            (std::vector<std::string>{"h1", "h2", "h3", "h4", "h5"}));
}

TEST(RetentionPolicyTest, SizeBudgetKeepsTheNewestThatFit) {
  std::vector<RetentionCandidate> cs = SixCheckpoints();
  EXPECT_EQ(Deleted(Policy({{"--max-bytes", "250"}}), cs), (std::vector<std::string>{"c1", "c2", "c3", "c4"}));
  EXPECT_EQ(Deleted(Policy({{"--max-bytes", "1K"}}), cs), std::vector<std::string>{});
}

TEST(RetentionPolicyTest, NeverDeletesNewestPinnedInvalidOrOpen) {
  std::vector<RetentionCandidate> cs = SixCheckpoints();
  cs[0].pinned = true;
  cs[1].open = true;
  cs[2].checkpoint.valid = false;
  std::vector<RetentionDecision> d = DecideRetention(Policy({{"--keep-last", "1"}}), cs);
  EXPECT_TRUE(d[0].keep);
  EXPECT_NE(d[0].why.find("pinned"), std::string::npos);
  EXPECT_TRUE(d[1].keep);
  EXPECT_NE(d[1].why.find("open"), std::string::npos);
  EXPECT_TRUE(d[2].keep);
  EXPECT_FALSE(d[3].keep);
  EXPECT_NE(d[3].why.find("keep_last=1"), std::string::npos);
  EXPECT_TRUE(d[5].keep);
  EXPECT_EQ(d[5].why, "newest");
  // An empty policy decides nothing.
  for (const RetentionDecision& x : DecideRetention(RetentionPolicy{}, cs)) EXPECT_TRUE(x.keep);
}

TEST(RetentionPolicyTest, OptionsAndJson) {
  RetentionPolicy p;
  for (auto [k, v] : std::vector<std::pair<std::string, std::string>>{
           {"--keep-last", "0"}, {"--keep-last", "x"}, {"--keep-best", "mid:loss:2"},
           {"--keep-best", "min::2"}, {"--keep-best", "min:loss"}, {"--keep-every", "epoch"},
           {"--max-bytes", "12Q"}, {"--keep-daily", "-1"}}) {
    Status s = AddPolicyOption(k, v, &p);
    EXPECT_FALSE(s.ok()) << k << " " << v;
    EXPECT_NE(s.message().find(k), std::string::npos) << s.message();
  }
  Result<RetentionPolicy> j = ParsePolicyJson(
      R"({"keep_last": 3, "keep_best": ["min:loss:2", "max:acc:1"], "keep_every": "epoch:10", "max_bytes": "2G"})",
      "p.json");
  ASSERT_TRUE(j.ok()) << j.status().message();
  EXPECT_EQ(j->keep_last, 3);
  EXPECT_EQ(j->keep_best.size(), 2u);
  EXPECT_EQ(j->keep_every[0].n, 10);
  EXPECT_EQ(j->max_bytes, int64_t{2} << 30);
  EXPECT_FALSE(ParsePolicyJson(R"({"keep_forever": 1})", "p.json").ok());
  EXPECT_FALSE(ParsePolicyJson(R"([1])", "p.json").ok());
  EXPECT_FALSE(ParsePolicyJson(R"({"keep_last": -2})", "p.json").ok());
}

TEST(RetentionDeleteTest, MovesOutThenRemovesAndRefusesWhatIsNotACheckpoint) {
  testing::TempDir dir;
  const std::string exp = dir.path() + "/exp";
  testing::WriteFile(exp + "/CKPT+1/CKPT.yaml", "loss: 1\n");
  testing::WriteFile(exp + "/CKPT+1/model.ckpt", "w");
  testing::WriteFile(exp + "/CKPT+2/model.ckpt", "w");  // no meta file any more
  testing::WriteFile(exp + "/CKPT+3/CKPT.yaml", "loss: 1\n");
  testing::WriteFile(exp + "/CKPT+3/.keep", "");
  auto at = [&](const std::string& name) {
    Checkpoint c;
    c.name = name, c.path = exp + "/" + name, c.experiment = exp, c.layout = Layout::kSpeechBrain;
    return c;
  };
  EXPECT_TRUE(DeleteCheckpoint(at("CKPT+1")).ok());
  EXPECT_NE(::access((exp + "/CKPT+1").c_str(), F_OK), 0);
  EXPECT_FALSE(DeleteCheckpoint(at("CKPT+2")).ok());
  EXPECT_EQ(::access((exp + "/CKPT+2/model.ckpt").c_str(), F_OK), 0);
  EXPECT_TRUE(IsPinned(at("CKPT+3")));
  EXPECT_FALSE(DeleteCheckpoint(at("CKPT+3")).ok());
  // A crash between the rename and the removal leaves the trash; it is finished later.
  testing::WriteFile(exp + "/" + kTrashDir + "/CKPT+0.123/model.ckpt", "w");
  RemoveTrash(exp);
  EXPECT_NE(::access((exp + "/" + kTrashDir).c_str(), F_OK), 0);
}

}  // namespace
}  // namespace ckptfs::core
