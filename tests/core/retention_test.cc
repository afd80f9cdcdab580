#include "core/retention.h"

#include <gtest/gtest.h>
#include <sys/stat.h>
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

std::vector<std::string> Deleted(const RetentionPolicy& p,
                                 const std::vector<RetentionCandidate>& cs) {
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
  return {Ckpt("c1", 100, {{"loss", 0.9}, {"epoch", 1}}),
          Ckpt("c2", 200, {{"loss", 0.2}, {"epoch", 2}}),
          Ckpt("c3", 300, {{"loss", 0.5}, {"epoch", 3}}),
          Ckpt("c4", 400, {{"epoch", 4}}),
          Ckpt("c5", 500, {{"loss", 0.3}, {"epoch", 5}}),
          Ckpt("c6", 600, {{"loss", 0.7}, {"epoch", 6}})};
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
  EXPECT_EQ(
      Deleted(Policy({{"--keep-last", "1"}, {"--keep-best", "min:loss:2"}}), SixCheckpoints()),
      (std::vector<std::string>{"c1", "c3", "c4"}));
  EXPECT_EQ(Deleted(Policy({{"--keep-last", "1"},
                            {"--keep-best", "min:loss:1"},
                            {"--keep-best", "max:epoch:2"}}),
                    SixCheckpoints()),
            (std::vector<std::string>{"c1", "c3", "c4"}));
}

TEST(RetentionPolicyTest, KeepEveryAndBuckets) {
  EXPECT_EQ(Deleted(Policy({{"--keep-every", "epoch:2"}}), SixCheckpoints()),
            (std::vector<std::string>{"c1", "c3", "c5"}));
  // Hourly buckets: c1..c6 at hours 0,0,1,1,2,2 (3600 s apart in pairs).
  std::vector<RetentionCandidate> hours = {Ckpt("h1", 10, {}),   Ckpt("h2", 20, {}),
                                           Ckpt("h3", 3610, {}), Ckpt("h4", 3620, {}),
                                           Ckpt("h5", 7210, {}), Ckpt("h6", 7220, {})};
  EXPECT_EQ(Deleted(Policy({{"--keep-hourly", "2"}}), hours),
            (std::vector<std::string>{"h1", "h2", "h3", "h5"}));
  EXPECT_EQ(Deleted(Policy({{"--keep-daily", "1"}}), hours),
            (std::vector<std::string>{"h1", "h2", "h3", "h4", "h5"}));
}

TEST(RetentionPolicyTest, SizeBudgetKeepsTheNewestThatFit) {
  std::vector<RetentionCandidate> cs = SixCheckpoints();
  EXPECT_EQ(Deleted(Policy({{"--max-bytes", "250"}}), cs),
            (std::vector<std::string>{"c1", "c2", "c3", "c4"}));
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
  for (auto [k, v] : std::vector<std::pair<std::string, std::string>>{{"--keep-last", "0"},
                                                                      {"--keep-last", "x"},
                                                                      {"--keep-best", "mid:loss:2"},
                                                                      {"--keep-best", "min::2"},
                                                                      {"--keep-best", "min:loss"},
                                                                      {"--keep-every", "epoch"},
                                                                      {"--max-bytes", "12Q"},
                                                                      {"--keep-daily", "-1"}}) {
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

Checkpoint At(const std::string& exp, const std::string& name) {
  Checkpoint c;
  c.name = name, c.path = exp + "/" + name, c.experiment = exp, c.layout = Layout::kSpeechBrain;
  return c;
}

bool Exists(const std::string& path) { return ::access(path.c_str(), F_OK) == 0; }

TEST(RetentionDeleteTest, MovesOutThenRemovesAndRefusesWhatIsNotACheckpoint) {
  testing::TempDir dir;
  const std::string exp = dir.path() + "/exp";
  testing::WriteFile(exp + "/CKPT+1/CKPT.yaml", "loss: 1\n");
  testing::WriteFile(exp + "/CKPT+1/model.ckpt", "w");
  testing::WriteFile(exp + "/CKPT+2/model.ckpt", "w");  // no meta file any more
  testing::WriteFile(exp + "/CKPT+3/CKPT.yaml", "loss: 1\n");
  testing::WriteFile(exp + "/CKPT+3/.keep", "");
  Result<Beneath> src = Beneath::Open(dir.path());
  ASSERT_TRUE(src.ok());
  EXPECT_TRUE(DeleteCheckpoint(*src, At(exp, "CKPT+1")).ok());
  EXPECT_FALSE(Exists(exp + "/CKPT+1"));
  EXPECT_FALSE(DeleteCheckpoint(*src, At(exp, "CKPT+2")).ok());
  EXPECT_TRUE(Exists(exp + "/CKPT+2/model.ckpt"));
  EXPECT_TRUE(IsPinned(*src, At(exp, "CKPT+3")));
  EXPECT_FALSE(DeleteCheckpoint(*src, At(exp, "CKPT+3")).ok());
  // A crash between the rename and the removal leaves the trash; it is finished later.
  struct stat st {};
  ASSERT_EQ(::lstat((exp + "/" + kTrashDir).c_str(), &st), 0);  // made by the deletion
  EXPECT_EQ(st.st_mode & 07777, 0700u);
  testing::WriteFile(exp + "/" + kTrashDir + "/CKPT+0.123/model.ckpt", "w");
  EXPECT_TRUE(RemoveTrash(*src, exp).ok());
  EXPECT_FALSE(Exists(exp + "/" + kTrashDir));
}

// Attack A: `ln -s /victim EXP/.ckptfs-trash` must not make retention delete
// (or move anything into) /victim.
TEST(RetentionDeleteTest, RefusesASymlinkedTrashAndLeavesItsTargetAlone) {
  testing::TempDir dir;
  const std::string exp = dir.path() + "/src/exp";
  const std::string victim = dir.path() + "/victim";
  testing::WriteFile(exp + "/CKPT+1/CKPT.yaml", "loss: 1\n");
  testing::WriteFile(victim + "/precious.txt", "keep me");
  testing::WriteFile(victim + "/sub/also.txt", "and me");
  ASSERT_EQ(::symlink(victim.c_str(), (exp + "/" + kTrashDir).c_str()), 0);
  Result<Beneath> src = Beneath::Open(dir.path() + "/src");
  ASSERT_TRUE(src.ok());

  Status cleanup = RemoveTrash(*src, exp);
  EXPECT_EQ(cleanup.code(), StatusCode::kPermission);
  EXPECT_NE(cleanup.message().find(exp + "/" + kTrashDir), std::string::npos) << cleanup.message();
  EXPECT_NE(cleanup.message().find("symbolic link"), std::string::npos) << cleanup.message();

  Status del = DeleteCheckpoint(*src, At(exp, "CKPT+1"));
  EXPECT_EQ(del.code(), StatusCode::kPermission) << del.message();
  EXPECT_TRUE(Exists(exp + "/CKPT+1/CKPT.yaml"));  // not moved anywhere
  EXPECT_EQ(testing::ReadFile(victim + "/precious.txt"), "keep me");
  EXPECT_EQ(testing::ReadFile(victim + "/sub/also.txt"), "and me");
  struct stat st {};
  ASSERT_EQ(::lstat((exp + "/" + kTrashDir).c_str(), &st), 0);
  EXPECT_TRUE(S_ISLNK(st.st_mode));  // left as found
}

TEST(RetentionDeleteTest, RefusesATrashOthersCanWriteOrAnotherUserOwns) {
  testing::TempDir dir;
  const std::string exp = dir.path() + "/exp";
  testing::WriteFile(exp + "/CKPT+1/CKPT.yaml", "loss: 1\n");
  const std::string trash = exp + "/" + kTrashDir;
  ASSERT_EQ(::mkdir(trash.c_str(), 0700), 0);
  ASSERT_EQ(::chmod(trash.c_str(), 0777), 0);
  testing::WriteFile(trash + "/theirs.txt", "planted");
  Result<Beneath> src = Beneath::Open(dir.path());
  ASSERT_TRUE(src.ok());
  EXPECT_EQ(RemoveTrash(*src, exp).code(), StatusCode::kPermission);
  EXPECT_EQ(DeleteCheckpoint(*src, At(exp, "CKPT+1")).code(), StatusCode::kPermission);
  EXPECT_TRUE(Exists(trash + "/theirs.txt"));
  EXPECT_TRUE(Exists(exp + "/CKPT+1/CKPT.yaml"));
  if (::geteuid() != 0) GTEST_SKIP() << "another owner needs root to chown";
  ASSERT_EQ(::chmod(trash.c_str(), 0700), 0);
  ASSERT_EQ(::chown(trash.c_str(), 65534, 65534), 0);
  Status s = RemoveTrash(*src, exp);
  EXPECT_EQ(s.code(), StatusCode::kPermission);
  EXPECT_NE(s.message().find("owned by uid 65534"), std::string::npos) << s.message();
  EXPECT_EQ(DeleteCheckpoint(*src, At(exp, "CKPT+1")).code(), StatusCode::kPermission);
  EXPECT_TRUE(Exists(trash + "/theirs.txt"));
  EXPECT_TRUE(Exists(exp + "/CKPT+1/CKPT.yaml"));
}

// Attack B's last line of defence: even if asked, retention does not delete
// a checkpoint owned by someone other than the experiment's owner.
TEST(RetentionDeleteTest, NeverDeletesACheckpointOfAnotherOwner) {
  if (::geteuid() != 0) GTEST_SKIP() << "another owner needs root to chown";
  testing::TempDir dir;
  const std::string exp = dir.path() + "/exp";
  testing::WriteFile(exp + "/CKPT+9/CKPT.yaml", "unixtime: 9999999999\n");
  ASSERT_EQ(::chown((exp + "/CKPT+9").c_str(), 65534, 65534), 0);
  Result<Beneath> src = Beneath::Open(dir.path());
  ASSERT_TRUE(src.ok());
  Status s = DeleteCheckpoint(*src, At(exp, "CKPT+9"));
  EXPECT_EQ(s.code(), StatusCode::kPermission);
  EXPECT_NE(s.message().find("not the experiment's owner"), std::string::npos) << s.message();
  EXPECT_TRUE(Exists(exp + "/CKPT+9/CKPT.yaml"));
}

TEST(RetentionOwnershipTest, OnlyTheExperimentOwnersCheckpointsCount) {
  EXPECT_TRUE(CountsForRetention(1000, 1000));
  EXPECT_FALSE(CountsForRetention(1000, 65534));
  EXPECT_FALSE(CountsForRetention(0, 1000));
}

TEST(RecencyTest, AUnixtimeMoreThanADayAheadFallsBackToTheNewestMtime) {
  const double now = 1.7e9;
  EXPECT_EQ(RecencyOf("/e/CKPT+1", 1.6e9, 5.0, now), 1.6e9);
  EXPECT_EQ(RecencyOf("/e/CKPT+2", std::nullopt, 5.0, now), 5.0);
  EXPECT_EQ(RecencyOf("/e/CKPT+3", now + kMaxFutureUnixtimeSeconds - 1, 5.0, now),
            now + kMaxFutureUnixtimeSeconds - 1);
  EXPECT_EQ(RecencyOf("/e/CKPT+4", 9999999999.0, 5.0, now), 5.0);
  EXPECT_EQ(RecencyOf("/e/CKPT+4", 9999999999.0, 6.0, now), 6.0);  // logged once, same answer
}

TEST(RecencyTest, LoadCheckpointDoesNotTrustAFutureUnixtime) {
  testing::TempDir dir;
  const std::string ckpt = dir.path() + "/CKPT+1";
  testing::WriteFile(ckpt + "/CKPT.yaml", "unixtime: 9999999999\n");
  testing::WriteFile(ckpt + "/model.ckpt", "w");
  testing::SetMtime(ckpt + "/CKPT.yaml", 1000);
  testing::SetMtime(ckpt + "/model.ckpt", 2000);
  Result<Checkpoint> c = LoadCheckpoint(ckpt, Layout::kSpeechBrain);
  ASSERT_TRUE(c.ok()) << c.status().message();
  EXPECT_DOUBLE_EQ(c->recency, 2000);
}

}  // namespace
}  // namespace ckptfs::core
