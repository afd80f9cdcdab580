#include "index/resolver.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>

#include "test_util.h"

namespace ckptfs::index {
namespace {

using core::StatusCode;
using testing::WriteFile;

class ResolverTest : public ::testing::Test {
 protected:
  void SetUp() override {
    src_ = dir_.path() + "/src";
    exp_ = src_ + "/exp";
    WriteFile(exp_ + "/CKPT+1/CKPT.yaml", "unixtime: 100\nloss: 0.5\nsplit: full\n");
    WriteFile(exp_ + "/CKPT+1/mdl.ckpt", "one");
    WriteFile(exp_ + "/CKPT+2/CKPT.yaml", "unixtime: 200\nloss: 0.3\nsplit: quick\n");
    WriteFile(exp_ + "/CKPT+2/mdl.ckpt", "two");
    WriteFile(exp_ + "/CKPT+2/opt.ckpt", "opt");
    WriteFile(exp_ + "/CKPT+3/CKPT.yaml", "unixtime: 300\nloss: 0.4\nsplit: full\n");
    WriteFile(exp_ + "/CKPT+3/mdl.ckpt", "three");
    WriteFile(exp_ + "/CKPT+3/sub/deep.txt", "deep");
    WriteFile(exp_ + "/train_log.txt", "log");
    WriteFile(src_ + "/pl/epoch=1-step=10-val_loss=0.7.ckpt", "a");
    WriteFile(src_ + "/pl/epoch=2-step=20-val_loss=0.6.ckpt", "b");
    WriteFile(src_ + "/pl/epoch=3-step=30-val_loss=0.9.ckpt", "c");
    WriteFile(dir_.path() + "/outside/secret", "secret");
    ASSERT_EQ(::symlink((dir_.path() + "/outside").c_str(), (exp_ + "/escape").c_str()), 0);
    auto idx = Index::Open(src_, dir_.path() + "/index.sqlite");
    ASSERT_TRUE(idx.ok());
    index_ = std::move(*idx);
    ASSERT_TRUE(index_->Scan().ok());
  }

  std::string Real(const std::string& vpath) {
    auto r = Resolver(index_.get()).Resolve(vpath);
    EXPECT_TRUE(r.ok()) << vpath << ": " << r.status().message();
    return r.ok() ? r->real_path : "";
  }

  StatusCode Code(const std::string& vpath) {
    return Resolver(index_.get()).Resolve(vpath).status().code();
  }

  std::vector<std::string> ListNames(const std::string& vpath) {
    Resolver resolver(index_.get());
    auto r = resolver.Resolve(vpath);
    EXPECT_TRUE(r.ok()) << vpath;
    if (!r.ok()) return {};
    auto entries = resolver.List(*r);
    EXPECT_TRUE(entries.ok()) << vpath;
    std::vector<std::string> names;
    for (const auto& e : *entries) names.push_back(e.name);
    std::sort(names.begin(), names.end());
    return names;
  }

  testing::TempDir dir_;
  std::string src_, exp_;
  std::unique_ptr<Index> index_;
};

TEST_F(ResolverTest, SelectorsResolveToRealPaths) {
  EXPECT_EQ(Real("/exp/latest"), exp_ + "/CKPT+3");
  EXPECT_EQ(Real("/exp/latest/mdl.ckpt"), exp_ + "/CKPT+3/mdl.ckpt");
  EXPECT_EQ(Real("/exp/latest/sub/deep.txt"), exp_ + "/CKPT+3/sub/deep.txt");
  EXPECT_EQ(Real("/exp/best/min/loss/mdl.ckpt"), exp_ + "/CKPT+2/mdl.ckpt");
  EXPECT_EQ(Real("/exp/best/max/loss"), exp_ + "/CKPT+1");
  EXPECT_EQ(Real("/exp/top/3/min/loss/2/mdl.ckpt"), exp_ + "/CKPT+3/mdl.ckpt");
  EXPECT_EQ(Real("/exp/where/split=full/best/min/loss/mdl.ckpt"), exp_ + "/CKPT+3/mdl.ckpt");
  EXPECT_EQ(Real("/exp/where/split=full/where/loss>0.45/latest"), exp_ + "/CKPT+1");
  // The top of the tree answers across experiments.
  EXPECT_EQ(Real("/best/min/loss"), exp_ + "/CKPT+2");
  EXPECT_EQ(Real("/best/min/val_loss/checkpoint.ckpt"), src_ + "/pl/epoch=2-step=20-val_loss=0.6.ckpt");
  EXPECT_EQ(Real("/pl/latest/epoch=3-step=30-val_loss=0.9.ckpt"),
            src_ + "/pl/epoch=3-step=30-val_loss=0.9.ckpt");
  // Real entries pass through.
  EXPECT_EQ(Real("/exp/train_log.txt"), exp_ + "/train_log.txt");
  EXPECT_EQ(Real("/exp/CKPT+1/mdl.ckpt"), exp_ + "/CKPT+1/mdl.ckpt");
  EXPECT_EQ(Real("/"), src_);
}

TEST_F(ResolverTest, NothingMatchesIsNotFoundMalformedIsInvalid) {
  EXPECT_EQ(Code("/exp/best/min/nokey"), StatusCode::kNotFound);
  EXPECT_EQ(Code("/exp/where/split=none/latest"), StatusCode::kNotFound);
  EXPECT_EQ(Code("/exp/latest/nofile"), StatusCode::kIoError);  // ENOENT from lstat
  EXPECT_EQ(Code("/exp/best/mid/loss"), StatusCode::kInvalidArgument);
  EXPECT_EQ(Code("/exp/top/0/min/loss"), StatusCode::kInvalidArgument);
  EXPECT_EQ(Code("/exp/CKPT+1/latest"), StatusCode::kNotFound);  // no namespace in a checkpoint
  EXPECT_EQ(Code("/pl/latest/other.ckpt"), StatusCode::kNotFound);
  EXPECT_EQ(Code("/exp/avg/last4/mdl.ckpt"), StatusCode::kNotFound);
}

TEST_F(ResolverTest, NothingResolvesOutsideTheSource) {
  EXPECT_EQ(Code("/../outside/secret"), StatusCode::kInvalidArgument);
  EXPECT_EQ(Code("/exp/latest/../../../outside/secret"), StatusCode::kInvalidArgument);
  EXPECT_EQ(Code("/exp/escape/secret"), StatusCode::kNotFound);  // no walking through links
  auto link = Resolver(index_.get()).Resolve("/exp/escape");
  ASSERT_TRUE(link.ok());
  EXPECT_EQ(link->type, NodeType::kRealOther);  // the link itself, never its target
}

TEST_F(ResolverTest, AveragesListMembersNewestFirst) {
  auto r = Resolver(index_.get()).Resolve("/exp/avg/best2/min/loss/mdl.ckpt");
  ASSERT_TRUE(r.ok()) << r.status().message();
  EXPECT_EQ(r->type, NodeType::kAverageFile);
  ASSERT_EQ(r->members.size(), 2u);
  EXPECT_EQ(r->members[0].name, "CKPT+3");
  EXPECT_EQ(r->members[1].name, "CKPT+2");
  EXPECT_EQ(ListNames("/exp/avg/last3"), std::vector<std::string>{"mdl.ckpt"});  // no CKPT.yaml
  EXPECT_EQ(MemberFiles(*r), (std::vector<std::string>{exp_ + "/CKPT+3/mdl.ckpt", exp_ + "/CKPT+2/mdl.ckpt"}));
  EXPECT_EQ(ListNames("/pl/avg/last3"), std::vector<std::string>{"checkpoint.ckpt"});
  EXPECT_EQ(Code("/exp/avg/last3/opt.ckpt"), StatusCode::kNotFound);
}

TEST_F(ResolverTest, Listings) {
  auto exp = ListNames("/exp");
  for (const char* name : {"CKPT+1", "train_log.txt", "latest", "best", "top", "avg", "where",
                           "index.json"}) {
    EXPECT_NE(std::find(exp.begin(), exp.end(), name), exp.end()) << name;
  }
  EXPECT_EQ(ListNames("/exp/best"), (std::vector<std::string>{"max", "min"}));
  EXPECT_EQ(ListNames("/exp/best/min"), (std::vector<std::string>{"loss", "unixtime"}));
  EXPECT_EQ(ListNames("/exp/top/5/min/loss"), (std::vector<std::string>{"1", "2", "3"}));
  EXPECT_EQ(ListNames("/exp/best/min/loss"), (std::vector<std::string>{"CKPT.yaml", "mdl.ckpt", "opt.ckpt"}));
  EXPECT_EQ(ListNames("/pl/best/min/val_loss"),
            (std::vector<std::string>{"checkpoint.ckpt", "epoch=2-step=20-val_loss=0.6.ckpt"}));
  auto inside = ListNames("/exp/CKPT+1");
  EXPECT_EQ(std::count(inside.begin(), inside.end(), "latest"), 0);
}

// Walks every listed name from vpath down, as `ls -R` or os.walk would:
// each must resolve. Returns how many did; failures are test failures.
int WalkResolves(const Resolver& resolver, const std::string& vpath, int depth) {
  auto dir = resolver.Resolve(vpath);
  EXPECT_TRUE(dir.ok()) << vpath << ": " << dir.status().message();
  if (!dir.ok()) return 0;
  auto entries = resolver.List(*dir);
  EXPECT_TRUE(entries.ok()) << vpath << ": " << entries.status().message();
  if (!entries.ok()) return 0;
  int resolved = 0;
  for (const DirEntry& e : *entries) {
    const std::string child = (vpath == "/" ? "" : vpath) + "/" + e.name;
    auto r = resolver.Resolve(child);
    EXPECT_TRUE(r.ok()) << child << " is listed but: " << r.status().message();
    if (!r.ok()) continue;
    ++resolved;
    const bool dir_like = r->type == NodeType::kRealDir || r->type == NodeType::kVirtualDir;
    if (dir_like && depth > 0) resolved += WalkResolves(resolver, child, depth - 1);
  }
  return resolved;
}

TEST_F(ResolverTest, ListingsNeverShowWhatLookupRefuses) {
  // An experiment whose only checkpoint is invalid: it has a namespace, but
  // latest/ matches nothing.
  WriteFile(src_ + "/bad/CKPT+x/CKPT.yaml", "loss: 0.1\n\n@ not yaml {\n");
  // Keys that cannot be names, and keys held by fewer than N checkpoints.
  WriteFile(src_ + "/k/CKPT+a/CKPT.yaml", "unixtime: 1\nloss: 0.3\nval/loss: 0.2\ntwo: 1\n");
  WriteFile(src_ + "/k/CKPT+a/mdl.ckpt", "a");
  WriteFile(src_ + "/k/CKPT+b/CKPT.yaml", "unixtime: 2\nloss: 0.2\ntwo: 2\n");
  WriteFile(src_ + "/k/CKPT+b/mdl.ckpt", "b");
  WriteFile(src_ + "/k/CKPT+c/CKPT.yaml", "unixtime: 3\nloss: 0.1\n");
  WriteFile(src_ + "/k/CKPT+c/mdl.ckpt", "c");
  ASSERT_TRUE(index_->Scan().ok());

  auto bad = ListNames("/bad");
  EXPECT_EQ(std::count(bad.begin(), bad.end(), "latest"), 0);
  EXPECT_EQ(std::count(bad.begin(), bad.end(), "best"), 1);
  EXPECT_EQ(Code("/bad/latest"), StatusCode::kNotFound);
  auto where = ListNames("/exp/where/split=none");
  EXPECT_EQ(std::count(where.begin(), where.end(), "latest"), 0);
  where = ListNames("/exp/where/split=full");
  EXPECT_EQ(std::count(where.begin(), where.end(), "latest"), 1);

  EXPECT_EQ(ListNames("/k/best/min"), (std::vector<std::string>{"loss", "two", "unixtime"}));
  EXPECT_EQ(ListNames("/k/top/2/max"), (std::vector<std::string>{"loss", "two", "unixtime"}));
  EXPECT_EQ(ListNames("/k/avg/best3/min"), (std::vector<std::string>{"loss", "unixtime"}));
  EXPECT_EQ(ListNames("/k/avg/best2/min"), (std::vector<std::string>{"loss", "two", "unixtime"}));
  EXPECT_EQ(Code("/k/avg/best3/min/two"), StatusCode::kNotFound);

  Resolver resolver(index_.get());
  EXPECT_GT(WalkResolves(resolver, "/", 10), 100);
  for (const char* deep : {"/k/avg/best2/min", "/k/top/3/min", "/exp/top/2/max/loss"}) {
    EXPECT_GT(WalkResolves(resolver, deep, 4), 0) << deep;
  }
}

TEST(ResolverEmptyTest, AnEmptySourceListsNoLatest) {
  testing::TempDir dir;
  testing::MakeDirs(dir.path() + "/src");
  auto idx = Index::Open(dir.path() + "/src", dir.path() + "/index.sqlite");
  ASSERT_TRUE(idx.ok());
  ASSERT_TRUE((*idx)->Scan().ok());
  Resolver resolver(idx->get());
  auto root = resolver.Resolve("/");
  ASSERT_TRUE(root.ok());
  auto entries = resolver.List(*root);
  ASSERT_TRUE(entries.ok());
  std::vector<std::string> names;
  for (const DirEntry& e : *entries) names.push_back(e.name);
  EXPECT_EQ(names, (std::vector<std::string>{"best", "top", "avg", "where", "new", "index.json"}));
  EXPECT_EQ(resolver.Resolve("/latest").status().code(), StatusCode::kNotFound);
  EXPECT_EQ(WalkResolves(resolver, "/", 10), 8);  // best/{min,max} top avg where new index.json
}

TEST_F(ResolverTest, IndexJsonNamesEveryCheckpoint) {
  auto r = Resolver(index_.get()).Resolve("/exp/index.json");
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->type, NodeType::kIndexJson);
  EXPECT_NE(r->content.find(exp_ + "/CKPT+2"), std::string::npos);
  EXPECT_NE(r->content.find("\"loss\": 0.3"), std::string::npos);
  EXPECT_EQ(r->content.find("pl/epoch"), std::string::npos);  // scoped to the experiment
}

TEST_F(ResolverTest, ARestrictedCallerSeesOnlyReadableCheckpoints) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root to own what another uid cannot read";
  ASSERT_EQ(::chmod((exp_ + "/CKPT+2").c_str(), 0700), 0);           // best by loss
  ASSERT_EQ(::chmod((exp_ + "/CKPT+3/mdl.ckpt").c_str(), 0600), 0);  // dir still readable
  ASSERT_EQ(::chmod((src_ + "/pl/epoch=2-step=20-val_loss=0.6.ckpt").c_str(), 0600), 0);
  core::Caller nobody;
  nobody.uid = nobody.gid = 65534;
  Resolver resolver(index_.get());
  auto best = resolver.Resolve("/exp/best/min/loss", &nobody);
  ASSERT_TRUE(best.ok()) << best.status().message();
  EXPECT_EQ(best->checkpoint->path, exp_ + "/CKPT+3");
  EXPECT_EQ(resolver.Resolve("/exp/best/min/loss")->checkpoint->path, exp_ + "/CKPT+2");
  auto pl = resolver.Resolve("/pl/best/min/val_loss", &nobody);
  ASSERT_TRUE(pl.ok());
  EXPECT_EQ(pl->checkpoint->path, src_ + "/pl/epoch=1-step=10-val_loss=0.7.ckpt");
  // top/3 has two ranks; avg/last3 cannot be formed; index.json leaves it out.
  auto top = resolver.Resolve("/exp/top/3/min/loss", &nobody);
  ASSERT_TRUE(top.ok());
  EXPECT_EQ(top->members.size(), 2u);
  EXPECT_EQ(resolver.Resolve("/exp/avg/last3", &nobody).status().code(), StatusCode::kNotFound);
  auto json = resolver.Resolve("/exp/index.json", &nobody);
  ASSERT_TRUE(json.ok());
  EXPECT_EQ(json->content.find("CKPT+2"), std::string::npos);
  EXPECT_NE(json->content.find("CKPT+3"), std::string::npos);
  // A checkpoint replaced by a link is no checkpoint, even to a reader.
  ASSERT_EQ(::rename((exp_ + "/CKPT+3").c_str(), (exp_ + "/moved").c_str()), 0);
  ASSERT_EQ(::symlink((exp_ + "/moved").c_str(), (exp_ + "/CKPT+3").c_str()), 0);
  EXPECT_EQ(resolver.Resolve("/exp/best/min/loss", &nobody)->checkpoint->path, exp_ + "/CKPT+1");
}

}  // namespace
}  // namespace ckptfs::index
