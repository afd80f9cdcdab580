#include "index/index.h"

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>

#include "core/beneath.h"
#include "index/pruner.h"
#include "test_util.h"

namespace ckptfs::index {
namespace {

// A copy of the whisper run has fresh mtimes in copy order; give its files
// their training order.
void SetWhisperMtimes(const std::string& src) {
  for (int step = 1000; step <= 5000; step += 1000) {
    for (const char* f : {"/trainer_state.json", "/config.json"}) {
      testing::SetMtime(src + "/checkpoint-" + std::to_string(step) + f, 1.7e9 + step);
    }
  }
}

using core::Order;
using core::Predicate;
using testing::TempDir;
using testing::WriteFile;

// A SpeechBrain checkpoint directory with the given CKPT.yaml body.
void AddSb(const std::string& exp, const std::string& name, const std::string& yaml) {
  WriteFile(exp + "/" + name + "/CKPT.yaml", yaml);
  WriteFile(exp + "/" + name + "/model.ckpt", "weights of " + name);
}

std::vector<std::string> Names(const std::vector<core::Checkpoint>& cs) {
  std::vector<std::string> out;
  for (const auto& c : cs) out.push_back(c.name);
  return out;
}

Predicate Pred(const std::string& text) { return *core::ParsePredicate(text); }

class IndexTest : public ::testing::Test {
 protected:
  void SetUp() override {
    exp_ = dir_.path() + "/src/exp";
    AddSb(exp_, "CKPT+1", "unixtime: 100\nloss: 0.5\nepoch: 1\nsplit: full\nend-of-epoch: true\n");
    AddSb(exp_, "CKPT+2", "unixtime: 200\nloss: 0.3\nepoch: 2\nsplit: quick\nend-of-epoch: true\n");
    AddSb(exp_, "CKPT+3", "unixtime: 300\nloss: 0.4\nepoch: 3\nsplit: full\nend-of-epoch: false\n");
    AddSb(exp_, "CKPT+4", "unixtime: 400\nepoch: 4\n");                     // no loss
    AddSb(exp_, "CKPT+5", "unixtime: 500\nloss: 0.1\n\n@ garbage (N,M){");  // invalid
    Open();
  }

  void Open() {
    index_.reset();
    auto idx = Index::Open(dir_.path() + "/src", dir_.path() + "/state/index.sqlite");
    ASSERT_TRUE(idx.ok()) << idx.status().message();
    index_ = std::move(*idx);
    auto scan = index_->Scan();
    ASSERT_TRUE(scan.ok()) << scan.status().message();
    last_scan_ = *scan;
  }

  std::vector<std::string> Select(const std::vector<Predicate>& where, bool ranked, Order order,
                                  const std::string& key, int limit = 10) {
    auto r = index_->Select(dir_.path() + "/src", where, ranked, order, key, limit);
    EXPECT_TRUE(r.ok()) << r.status().message();
    return r.ok() ? Names(*r) : std::vector<std::string>{};
  }

  TempDir dir_;
  std::string exp_;
  std::unique_ptr<Index> index_;
  ScanStats last_scan_;
};

TEST_F(IndexTest, ListsEveryCheckpointNewestFirstWithInvalidOnes) {
  auto all = index_->List(dir_.path() + "/src");
  ASSERT_TRUE(all.ok());
  EXPECT_EQ(Names(*all),
            (std::vector<std::string>{"CKPT+5", "CKPT+4", "CKPT+3", "CKPT+2", "CKPT+1"}));
  EXPECT_FALSE((*all)[0].valid);
  EXPECT_NE((*all)[0].error.find("CKPT+5/CKPT.yaml"), std::string::npos) << (*all)[0].error;
  EXPECT_EQ(*(*all)[1].meta.Number("epoch"), 4);
  EXPECT_EQ((*all)[1].files.size(), 2u);
  EXPECT_TRUE(index_->IsExperiment(exp_));
  EXPECT_FALSE(index_->IsExperiment(dir_.path() + "/src"));
}

TEST_F(IndexTest, SelectsLikeSpeechBrainFindCheckpoint) {
  // latest skips the invalid CKPT+5; best only among checkpoints having the key.
  EXPECT_EQ(Select({}, false, Order::kMin, "", 1), std::vector<std::string>{"CKPT+4"});
  EXPECT_EQ(Select({}, true, Order::kMin, "loss", 1), std::vector<std::string>{"CKPT+2"});
  EXPECT_EQ(Select({}, true, Order::kMax, "loss", 1), std::vector<std::string>{"CKPT+1"});
  EXPECT_EQ(Select({}, true, Order::kMin, "loss"),
            (std::vector<std::string>{"CKPT+2", "CKPT+3", "CKPT+1"}));
  EXPECT_EQ(Select({}, true, Order::kMax, "epoch"),
            (std::vector<std::string>{"CKPT+4", "CKPT+3", "CKPT+2", "CKPT+1"}));
  EXPECT_TRUE(Select({}, true, Order::kMin, "missing").empty());
  EXPECT_TRUE(Select({}, true, Order::kMin, "split").empty());  // strings do not compete
}

TEST_F(IndexTest, WhereWithEveryOperator) {
  EXPECT_EQ(Select({Pred("split=full")}, true, Order::kMin, "loss"),
            (std::vector<std::string>{"CKPT+3", "CKPT+1"}));
  EXPECT_EQ(Select({Pred("split!=full")}, false, Order::kMin, ""),
            std::vector<std::string>{"CKPT+2"});
  EXPECT_EQ(Select({Pred("epoch<2")}, false, Order::kMin, ""), std::vector<std::string>{"CKPT+1"});
  EXPECT_EQ(Select({Pred("epoch<=2")}, false, Order::kMin, ""),
            (std::vector<std::string>{"CKPT+2", "CKPT+1"}));
  EXPECT_EQ(Select({Pred("epoch>3")}, false, Order::kMin, ""), std::vector<std::string>{"CKPT+4"});
  EXPECT_EQ(Select({Pred("epoch>=3")}, false, Order::kMin, ""),
            (std::vector<std::string>{"CKPT+4", "CKPT+3"}));
  EXPECT_EQ(Select({Pred("end-of-epoch=true")}, true, Order::kMin, "loss"),
            (std::vector<std::string>{"CKPT+2", "CKPT+1"}));
  EXPECT_EQ(Select({Pred("epoch>=2"), Pred("split=full")}, false, Order::kMin, ""),
            std::vector<std::string>{"CKPT+3"});
  EXPECT_TRUE(Select({Pred("nokey=1")}, false, Order::kMin, "").empty());
}

TEST_F(IndexTest, HostileKeysAndValuesAreData) {
  AddSb(exp_, "CKPT+6", "unixtime: 50\n\"x'); DROP TABLE checkpoints; --\": 1\n");
  Open();
  EXPECT_EQ(Select({Pred("x'); DROP TABLE checkpoints; --=1")}, false, Order::kMin, ""),
            std::vector<std::string>{"CKPT+6"});
  EXPECT_EQ(Select({Pred("split=' OR 1=1 --")}, false, Order::kMin, "").size(), 0u);
  EXPECT_EQ(Select({}, false, Order::kMin, "", 100).size(), 5u);
}

TEST_F(IndexTest, RescanTouchesOnlyWhatChanged) {
  auto scan = index_->Scan();
  ASSERT_TRUE(scan.ok());
  EXPECT_EQ(scan->dirs_read, 0);
  EXPECT_EQ(scan->checkpoints_loaded, 0);

  AddSb(exp_, "CKPT+7", "unixtime: 700\nloss: 0.05\n");
  scan = index_->Scan();
  ASSERT_TRUE(scan.ok());
  EXPECT_EQ(scan->checkpoints_loaded, 1);
  EXPECT_EQ(scan->changed_experiments, std::vector<std::string>{exp_});
  EXPECT_EQ(Select({}, true, Order::kMin, "loss", 1), std::vector<std::string>{"CKPT+7"});

  // A meta file rewritten in place (directory mtime unchanged) is re-read.
  WriteFile(exp_ + "/CKPT+7/CKPT.yaml", "unixtime: 700\nloss: 0.9\n");
  testing::SetMtime(exp_ + "/CKPT+7/CKPT.yaml", 12345);
  scan = index_->Scan();
  ASSERT_TRUE(scan.ok());
  EXPECT_EQ(scan->checkpoints_loaded, 1);
  EXPECT_EQ(Select({}, true, Order::kMin, "loss", 1), std::vector<std::string>{"CKPT+2"});

  testing::RemoveTree(exp_ + "/CKPT+7");
  testing::RemoveTree(exp_ + "/CKPT+2");
  scan = index_->Scan();
  ASSERT_TRUE(scan.ok());
  EXPECT_EQ(scan->checkpoints_removed, 2);
  EXPECT_EQ(Select({}, true, Order::kMin, "loss", 1), std::vector<std::string>{"CKPT+3"});
}

TEST_F(IndexTest, TargetedScanTouchesOnlyTheNamedChanges) {
  AddSb(exp_, "CKPT+7", "unixtime: 700\nloss: 0.05\n");
  auto scan = index_->ScanChanges({{exp_, "CKPT+7"}});
  ASSERT_TRUE(scan.ok()) << scan.status().message();
  EXPECT_EQ(scan->checkpoints_loaded, 1);
  EXPECT_EQ(scan->dirs_visited, 1);
  EXPECT_EQ(scan->changed_experiments, std::vector<std::string>{exp_});
  EXPECT_EQ(Select({}, true, Order::kMin, "loss", 1), std::vector<std::string>{"CKPT+7"});

  // A change inside a checkpoint directory re-reads that checkpoint.
  WriteFile(exp_ + "/CKPT+7/CKPT.yaml", "unixtime: 700\nloss: 0.95\n");
  scan = index_->ScanChanges({{exp_ + "/CKPT+7", "CKPT.yaml"}});
  ASSERT_TRUE(scan.ok());
  EXPECT_EQ(scan->checkpoints_loaded, 1);
  EXPECT_EQ(Select({}, true, Order::kMin, "loss", 1), std::vector<std::string>{"CKPT+2"});

  // Removal, a single file, and a hidden directory.
  testing::RemoveTree(exp_ + "/CKPT+7");
  WriteFile(exp_ + "/epoch=9-loss=0.01.ckpt", "w");
  AddSb(exp_ + "/.staging", "CKPT+x", "loss: 0.0\n");
  scan = index_->ScanChanges({{exp_, "CKPT+7"},
                              {exp_ + "/CKPT+7", ""},
                              {exp_, "epoch=9-loss=0.01.ckpt"},
                              {exp_, ".staging"}});
  ASSERT_TRUE(scan.ok());
  EXPECT_EQ(scan->checkpoints_removed, 1);
  EXPECT_EQ(scan->checkpoints_loaded, 1);
  EXPECT_EQ(Select({}, true, Order::kMin, "loss", 1),
            std::vector<std::string>{"epoch=9-loss=0.01.ckpt"});
  ::unlink((exp_ + "/epoch=9-loss=0.01.ckpt").c_str());
  scan = index_->ScanChanges({{exp_, "epoch=9-loss=0.01.ckpt"}});
  EXPECT_EQ(scan->checkpoints_removed, 1);
  // A full scan agrees with what the targeted ones left.
  scan = index_->Scan();
  ASSERT_TRUE(scan.ok());
  EXPECT_EQ(scan->checkpoints_loaded, 0);
  EXPECT_EQ(scan->checkpoints_removed, 0);
}

// A watcher event may name a path whose directory another user has just
// swapped for a symbolic link (to a directory only the daemon's user can
// read): nothing beyond the link is read or indexed, by a targeted scan, a
// full scan or LoadCheckpoint beneath the source.
TEST_F(IndexTest, ADirectorySwappedForALinkIsNeverFollowed) {
  const std::string secret = dir_.path() + "/secret";
  AddSb(secret, "CKPT+9", "unixtime: 900\nloss: 0.001\n");
  const std::string linked = dir_.path() + "/src/linked";
  ASSERT_EQ(::symlink(secret.c_str(), linked.c_str()), 0);
  auto scan = index_->ScanChanges({{linked, "CKPT+9"}, {linked + "/CKPT+9", "CKPT.yaml"}});
  ASSERT_TRUE(scan.ok()) << scan.status().message();
  EXPECT_EQ(scan->checkpoints_loaded, 0);
  scan = index_->Scan();
  ASSERT_TRUE(scan.ok()) << scan.status().message();
  EXPECT_EQ(scan->checkpoints_loaded, 0);
  EXPECT_EQ(Select({}, true, Order::kMin, "loss", 1), std::vector<std::string>{"CKPT+2"});

  auto source = core::Beneath::Open(dir_.path() + "/src");
  ASSERT_TRUE(source.ok());
  auto c = core::LoadCheckpoint(*source, linked + "/CKPT+9", core::Layout::kSpeechBrain);
  ASSERT_FALSE(c.ok());
  EXPECT_NE(c.status().message().find("symbolic link"), std::string::npos) << c.status().message();
  // The checkpoint directory itself, or its meta file, as a link.
  ASSERT_EQ(::symlink((secret + "/CKPT+9").c_str(), (exp_ + "/CKPT+8").c_str()), 0);
  EXPECT_FALSE(core::LoadCheckpoint(*source, exp_ + "/CKPT+8", core::Layout::kSpeechBrain).ok());
  testing::MakeDirs(exp_ + "/CKPT+7");
  ASSERT_EQ(::symlink((secret + "/CKPT+9/CKPT.yaml").c_str(), (exp_ + "/CKPT+7/CKPT.yaml").c_str()),
            0);
  c = core::LoadCheckpoint(*source, exp_ + "/CKPT+7", core::Layout::kSpeechBrain);
  ASSERT_TRUE(c.ok()) << c.status().message();
  EXPECT_FALSE(c->valid);
  EXPECT_TRUE(c->meta.entries.empty());
}

TEST_F(IndexTest, CorruptOrForeignIndexIsRebuilt) {
  index_.reset();
  WriteFile(dir_.path() + "/state/index.sqlite", std::string(8192, 'x'));
  ::unlink((dir_.path() + "/state/index.sqlite-wal").c_str());
  ::unlink((dir_.path() + "/state/index.sqlite-shm").c_str());
  Open();
  EXPECT_EQ(last_scan_.checkpoints_loaded, 5);
  EXPECT_EQ(Select({}, true, Order::kMin, "loss", 1), std::vector<std::string>{"CKPT+2"});

  // The same file opened for another source starts over.
  index_.reset();
  testing::MakeDirs(dir_.path() + "/other");
  auto other = Index::Open(dir_.path() + "/other", dir_.path() + "/state/index.sqlite");
  ASSERT_TRUE(other.ok());
  ASSERT_TRUE((*other)->Scan().ok());
  EXPECT_TRUE((*other)->List(dir_.path() + "/other")->empty());
}

TEST_F(IndexTest, TreeOfExperimentsAndLayouts) {
  const std::string src = dir_.path() + "/src";
  WriteFile(src + "/group/hf/checkpoint-500/trainer_state.json",
            R"({"global_step": 500, "log_history": [{"step": 500, "eval_loss": 0.2}]})");
  WriteFile(src + "/group/hf/checkpoint-500/model.safetensors", "w");
  WriteFile(src + "/group/hf/checkpoint-1000/trainer_state.json",
            R"({"global_step": 1000, "log_history": [{"step": 1000, "eval_loss": 0.01}]})");
  WriteFile(src + "/pl/epoch=1-step=10-val_loss=0.7.ckpt", "w");
  WriteFile(src + "/pl/epoch=2-step=20-val_loss=0.6.ckpt", "w");
  WriteFile(src + "/pl/last.ckpt", "w");
  WriteFile(src + "/native/run1/meta.json", R"({"loss": 0.02, "unixtime": 10})");
  WriteFile(src + "/.hidden/CKPT+1/CKPT.yaml", "loss: 0.0\n");
  Open();
  EXPECT_EQ(Select({}, true, Order::kMin, "eval_loss", 1),
            std::vector<std::string>{"checkpoint-1000"});
  EXPECT_EQ(Select({}, true, Order::kMin, "val_loss", 1),
            std::vector<std::string>{"epoch=2-step=20-val_loss=0.6.ckpt"});
  auto loss = index_->Select(src, {}, true, Order::kMin, "loss", 1);
  ASSERT_TRUE(loss.ok());
  EXPECT_EQ((*loss)[0].path, src + "/native/run1");  // across experiments, not .hidden
  auto in_exp = index_->Select(exp_, {}, true, Order::kMin, "loss", 1);
  EXPECT_EQ(Names(*in_exp), std::vector<std::string>{"CKPT+2"});
  EXPECT_EQ(index_->List(src + "/pl")->size(), 2u);  // last.ckpt is not a checkpoint
  EXPECT_EQ(index_->List(src + "/group")->size(), 2u);
  EXPECT_EQ(index_->List(src + "/gro")->size(), 0u);  // a prefix of a name is not a subtree
  auto keys = index_->NumericKeys(src, {});
  ASSERT_TRUE(keys.ok());
  EXPECT_NE(std::find(keys->begin(), keys->end(), "val_loss"), keys->end());
}

TEST_F(IndexTest, NanNeverCompetes) {
  AddSb(exp_, "CKPT+8", "unixtime: 800\nloss: .nan\n");
  Open();
  EXPECT_EQ(Select({}, true, Order::kMin, "loss", 1), std::vector<std::string>{"CKPT+2"});
  EXPECT_EQ(Select({}, true, Order::kMax, "loss", 1), std::vector<std::string>{"CKPT+1"});
}

TEST_F(IndexTest, TiesBreakByRecencyThenName) {
  const std::string hf = dir_.path() + "/src/hf";
  for (const char* step : {"5000", "10000"}) {
    WriteFile(hf + "/checkpoint-" + step + "/trainer_state.json",
              R"({"global_step": 7, "log_history": [{"step": 7, "eval_loss": 0.5}]})");
    testing::SetMtime(hf + "/checkpoint-" + step + "/trainer_state.json", 1000);
  }
  Open();
  auto latest = index_->Select(hf, {}, false, Order::kMin, "", 2);
  EXPECT_EQ(Names(*latest), (std::vector<std::string>{"checkpoint-10000", "checkpoint-5000"}));
  auto best = index_->Select(hf, {}, true, Order::kMin, "eval_loss", 1);
  EXPECT_EQ(Names(*best), std::vector<std::string>{"checkpoint-10000"});
}

// tests/fixtures/wild, as real training runs wrote them.
TEST(WildFixturesTest, HuggingFaceWhisperRunAgreesWithTheTrainer) {
  TempDir dir;
  const std::string src = dir.path() + "/whisper";
  std::filesystem::copy(CKPTFS_WILD_FIXTURES "/hf-whisper-ja", src,
                        std::filesystem::copy_options::recursive);
  SetWhisperMtimes(src);
  auto idx = Index::Open(src, dir.path() + "/i.sqlite");
  ASSERT_TRUE(idx.ok());
  ASSERT_TRUE((*idx)->Scan().ok());
  auto wer = (*idx)->Select(src, {}, true, Order::kMin, "eval_wer", 1);
  ASSERT_TRUE(wer.ok());
  EXPECT_EQ(Names(*wer), std::vector<std::string>{"checkpoint-3000"});
  auto loss = (*idx)->Select(src, {}, true, Order::kMin, "eval_loss", 1);
  EXPECT_EQ(Names(*loss), std::vector<std::string>{"checkpoint-1000"});
  auto latest = (*idx)->Select(src, {}, false, Order::kMin, "", 1);
  EXPECT_EQ(Names(*latest), std::vector<std::string>{"checkpoint-5000"});
  EXPECT_NEAR(*(*loss)[0].meta.Number("eval_loss"), 0.3210, 1e-4);
}

TEST(WildFixturesTest, SpeechBrainMetaWithTrailingGarbageIsInvalidOthersServe) {
  TempDir dir;
  const std::string src = dir.path() + "/sb";
  const std::string wild = CKPTFS_WILD_FIXTURES "/speechbrain-meta/";
  testing::CopyFile(wild + "s2st-epoch29.CKPT.yaml", src + "/CKPT+s2st/CKPT.yaml");
  testing::CopyFile(wild + "intra-epoch.CKPT.yaml", src + "/CKPT+intra/CKPT.yaml");
  testing::CopyFile(wild + "trailing-garbage.CKPT.yaml", src + "/CKPT+garbage/CKPT.yaml");
  auto idx = Index::Open(src, dir.path() + "/i.sqlite");
  ASSERT_TRUE(idx.ok());
  ASSERT_TRUE((*idx)->Scan().ok());
  auto all = (*idx)->List(src);
  ASSERT_TRUE(all.ok());
  ASSERT_EQ(all->size(), 3u);
  for (const auto& c : *all) {
    if (c.name == "CKPT+garbage") {
      EXPECT_FALSE(c.valid);
      EXPECT_NE(c.error.find("CKPT+garbage/CKPT.yaml"), std::string::npos) << c.error;
    } else {
      EXPECT_TRUE(c.valid) << c.name << ": " << c.error;
    }
  }
  // Newest by unixtime: s2st (2024) over intra-epoch (2023); garbage never.
  auto latest = (*idx)->Select(src, {}, false, Order::kMin, "", 5);
  EXPECT_EQ(Names(*latest), (std::vector<std::string>{"CKPT+s2st", "CKPT+intra"}));
  auto best = (*idx)->Select(src, {}, true, Order::kMax, "BLEU", 1);
  EXPECT_EQ(Names(*best), std::vector<std::string>{"CKPT+s2st"});
  EXPECT_TRUE((*idx)->Select(src, {}, true, Order::kMin, "loss", 1)->empty());
}

// The derived fixture: checkpoint-3000 as a newer transformers writes it,
// with NaN and Infinity grad_norm values (tests/fixtures/wild/README.md).
TEST(WildFixturesTest, HuggingFaceRunWithNanGradNormStaysValidAndBest) {
  TempDir dir;
  const std::string src = dir.path() + "/whisper";
  std::filesystem::copy(CKPTFS_WILD_FIXTURES "/hf-whisper-ja", src,
                        std::filesystem::copy_options::recursive);
  testing::CopyFile(CKPTFS_WILD_FIXTURES "/hf-whisper-ja-nan/checkpoint-3000/trainer_state.json",
                    src + "/checkpoint-3000/trainer_state.json");
  ASSERT_NE(testing::ReadFile(src + "/checkpoint-3000/trainer_state.json").find("NaN"),
            std::string::npos);
  // checkpoint-1000, the best by eval_loss, overflowed in its evaluation.
  std::string first = testing::ReadFile(src + "/checkpoint-1000/trainer_state.json");
  const std::string loss = "\"eval_loss\": 0.320997953414917";
  ASSERT_NE(first.find(loss), std::string::npos);
  first.replace(first.find(loss), loss.size(), "\"eval_loss\": NaN");
  WriteFile(src + "/checkpoint-1000/trainer_state.json", first);
  SetWhisperMtimes(src);
  auto idx = Index::Open(src, dir.path() + "/i.sqlite");
  ASSERT_TRUE(idx.ok());
  ASSERT_TRUE((*idx)->Scan().ok());
  auto all = (*idx)->List(src);
  ASSERT_TRUE(all.ok());
  ASSERT_EQ(all->size(), 5u);
  for (const auto& c : *all) EXPECT_TRUE(c.valid) << c.name << ": " << c.error;
  auto wer = (*idx)->Select(src, {}, true, Order::kMin, "eval_wer", 1);
  EXPECT_EQ(Names(*wer), std::vector<std::string>{"checkpoint-3000"});
  // A NaN never competes, for min or max; the rest of that meta still counts.
  auto min_loss = (*idx)->Select(src, {}, true, Order::kMin, "eval_loss", 5);
  EXPECT_EQ(Names(*min_loss), (std::vector<std::string>{"checkpoint-2000", "checkpoint-3000",
                                                        "checkpoint-4000", "checkpoint-5000"}));
  auto max_loss = (*idx)->Select(src, {}, true, Order::kMax, "eval_loss", 1);
  EXPECT_EQ(Names(*max_loss), std::vector<std::string>{"checkpoint-5000"});
  auto wer1000 = (*idx)->Select(src, {Pred("eval_wer>0.78")}, false, Order::kMin, "", 5);
  EXPECT_EQ(Names(*wer1000), std::vector<std::string>{"checkpoint-1000"});
  auto latest = (*idx)->Select(src, {}, false, Order::kMin, "", 1);
  EXPECT_EQ(Names(*latest), std::vector<std::string>{"checkpoint-5000"});
}

// A meta file past its budget, or one PyYAML refuses, makes its checkpoint
// invalid with the reason; the scan goes on and the others serve.
TEST(ScannerTest, MetaBeyondItsBudgetOrRefusedByPyYamlIsInvalid) {
  TempDir dir;
  const std::string exp = dir.path() + "/src/exp";
  AddSb(exp, "CKPT+1", "unixtime: 100\nloss: 0.5\n");
  AddSb(exp, "CKPT+2", "unixtime: 200\nloss: 0.1\n" + std::string(core::kMaxYamlMetaBytes, '#'));
  AddSb(exp, "CKPT+3", "unixtime: 300\nloss: 0.2\n...\nloss: 0.0\n");
  AddSb(exp, "CKPT+4", "unixtime: 400\nloss: 0.3\n...\n# saved by hand\n");
  AddSb(exp, "CKPT+5", "unixtime: 500\nloss: 0.4\n---\nloss: 0.0\n");
  WriteFile(exp + "/big/meta.json", "{\"loss\": 0.05}");
  ASSERT_EQ(
      ::truncate((exp + "/big/meta.json").c_str(), static_cast<off_t>(core::kMaxJsonMetaBytes) + 1),
      0);  // sparse: costs no disk
  auto idx = Index::Open(dir.path() + "/src", dir.path() + "/i.sqlite");
  ASSERT_TRUE(idx.ok());
  ASSERT_TRUE((*idx)->Scan().ok());
  auto all = (*idx)->List(exp);
  ASSERT_TRUE(all.ok());
  ASSERT_EQ(all->size(), 6u);
  for (const auto& c : *all) {
    const bool valid = c.name == "CKPT+1" || c.name == "CKPT+4";
    EXPECT_EQ(c.valid, valid) << c.name << ": " << c.error;
    if (!valid) {
      EXPECT_NE(c.error.find(c.path), std::string::npos) << c.error;
    }
  }
  for (const auto& c : *all) {
    if (c.name == "CKPT+2") {
      EXPECT_NE(c.error.find(std::to_string(core::kMaxYamlMetaBytes) + "-byte budget"),
                std::string::npos)
          << c.error;
    }
    if (c.name == "big") {
      EXPECT_NE(c.error.find(std::to_string(core::kMaxJsonMetaBytes) + "-byte budget"),
                std::string::npos)
          << c.error;
    }
  }
  auto best = (*idx)->Select(exp, {}, true, Order::kMin, "loss", 1);
  EXPECT_EQ(Names(*best), std::vector<std::string>{"CKPT+4"});
}

// Attack B: in a shared experiment another user adds checkpoints claiming
// to be the newest. Retention neither counts them (root's newest stay) nor
// deletes them (they are not the experiment owner's to delete).
TEST(PrunerTest, RanksAndDeletesOnlyTheExperimentOwnersCheckpoints) {
  if (::geteuid() != 0) GTEST_SKIP() << "another owner needs root to chown";
  TempDir dir;
  const std::string src = dir.path() + "/src", exp = src + "/exp";
  AddSb(exp, "CKPT+1", "unixtime: 100\n");
  AddSb(exp, "CKPT+2", "unixtime: 200\n");
  AddSb(exp, "CKPT+3", "unixtime: 300\n");
  AddSb(exp, "CKPT+8", "unixtime: 9999999999\n");
  AddSb(exp, "CKPT+9", "unixtime: 9999999999\n");
  for (const char* fake : {"CKPT+8", "CKPT+9"}) {
    ASSERT_EQ(::chown((exp + "/" + fake).c_str(), 65534, 65534), 0);
  }
  auto idx = Index::Open(src, dir.path() + "/index.sqlite");
  ASSERT_TRUE(idx.ok()) << idx.status().message();
  ASSERT_TRUE((*idx)->Scan().ok());
  auto source = core::Beneath::Open(src);
  ASSERT_TRUE(source.ok());
  core::RetentionPolicy policy;
  policy.keep_last = 2;
  auto report = Prune(idx->get(), *source, policy, {}, false, nullptr);
  ASSERT_TRUE(report.ok()) << report.status().message();
  EXPECT_EQ(report->deleted, 1);
  EXPECT_TRUE(report->refused.empty());
  auto exists = [&](const std::string& n) { return ::access((exp + "/" + n).c_str(), F_OK) == 0; };
  EXPECT_FALSE(exists("CKPT+1"));  // the policy's own decision
  EXPECT_TRUE(exists("CKPT+2"));
  EXPECT_TRUE(exists("CKPT+3"));
  EXPECT_TRUE(exists("CKPT+8"));
  EXPECT_TRUE(exists("CKPT+9"));
  int ignored = 0;
  for (const PruneEntry& e : report->entries) {
    if (e.checkpoint.name == "CKPT+8" || e.checkpoint.name == "CKPT+9") {
      EXPECT_TRUE(e.decision.keep);
      EXPECT_NE(e.decision.why.find("owned by uid 65534"), std::string::npos) << e.decision.why;
      ++ignored;
    }
  }
  EXPECT_EQ(ignored, 2);
}

// Attack A through `ckptfs prune`: a symbolic link named .ckptfs-trash makes
// the experiment's retention stop, naming it; nothing is deleted anywhere.
TEST(PrunerTest, SkipsAnExperimentWhoseTrashIsRefused) {
  TempDir dir;
  const std::string src = dir.path() + "/src", exp = src + "/exp";
  const std::string victim = dir.path() + "/victim";
  AddSb(exp, "CKPT+1", "unixtime: 100\n");
  AddSb(exp, "CKPT+2", "unixtime: 200\n");
  WriteFile(victim + "/precious.txt", "keep me");
  ASSERT_EQ(::symlink(victim.c_str(), (exp + "/" + core::kTrashDir).c_str()), 0);
  auto idx = Index::Open(src, dir.path() + "/index.sqlite");
  ASSERT_TRUE(idx.ok()) << idx.status().message();
  ASSERT_TRUE((*idx)->Scan().ok());
  auto source = core::Beneath::Open(src);
  ASSERT_TRUE(source.ok());
  core::RetentionPolicy policy;
  policy.keep_last = 1;
  for (bool dry_run : {true, false}) {
    auto report = Prune(idx->get(), *source, policy, {}, dry_run, nullptr);
    ASSERT_TRUE(report.ok()) << report.status().message();
    ASSERT_EQ(report->refused.size(), 1u);
    EXPECT_NE(report->refused[0].find(exp + "/" + core::kTrashDir), std::string::npos)
        << report->refused[0];
    EXPECT_EQ(report->deleted, 0);
  }
  EXPECT_EQ(::access((exp + "/CKPT+1").c_str(), F_OK), 0);
  EXPECT_EQ(testing::ReadFile(victim + "/precious.txt"), "keep me");
}

// Another node's pruner (or a user) deleted checkpoints first: one before
// this run looked at it, one between the decision and the deletion. Neither
// is an error; both leave the index.
TEST(PrunerTest, ACheckpointDeletedElsewhereIsNotAnError) {
  TempDir dir;
  const std::string src = dir.path() + "/src", exp = src + "/exp";
  AddSb(exp, "CKPT+1", "unixtime: 100\n");
  AddSb(exp, "CKPT+2", "unixtime: 200\n");
  AddSb(exp, "CKPT+3", "unixtime: 300\n");
  auto idx = Index::Open(src, dir.path() + "/index.sqlite");
  ASSERT_TRUE(idx.ok()) << idx.status().message();
  ASSERT_TRUE((*idx)->Scan().ok());
  auto source = core::Beneath::Open(src);
  ASSERT_TRUE(source.ok());
  testing::RemoveTree(exp + "/CKPT+2");
  core::RetentionPolicy policy;
  policy.keep_last = 1;
  auto report = Prune(idx->get(), *source, policy, {}, false, [&](const std::string& path) {
    if (path == exp + "/CKPT+1") testing::RemoveTree(path);  // after the look, before the deletion
    return false;
  });
  ASSERT_TRUE(report.ok()) << report.status().message();
  EXPECT_EQ(report->failed, 0);
  EXPECT_EQ(report->deleted, 0);
  for (const PruneEntry& e : report->entries) EXPECT_EQ(e.error, "") << e.checkpoint.path;
  auto all = (*idx)->List(exp);
  ASSERT_TRUE(all.ok());
  ASSERT_EQ(all->size(), 1u);
  EXPECT_EQ((*all)[0].name, "CKPT+3");
}

}  // namespace
}  // namespace ckptfs::index
