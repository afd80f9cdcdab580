#include "index/resolver.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>

#include "test_util.h"

namespace ckptfs::index {
namespace {

using core::StatusCode;
using testing::WriteFile;

// What core::DetectFormat takes for a PyTorch zip and for safetensors: the
// view decides by these bytes, never by the name.
const std::string kZip = std::string("PK\x03\x04", 4);
const std::string kSafetensors = std::string("\x02\0\0\0\0\0\0\0{}", 10);

class ResolverTest : public ::testing::Test {
 protected:
  void SetUp() override {
    src_ = dir_.path() + "/src";
    exp_ = src_ + "/exp";
    WriteFile(exp_ + "/CKPT+1/CKPT.yaml", "unixtime: 100\nloss: 0.5\nsplit: full\n");
    WriteFile(exp_ + "/CKPT+1/mdl.ckpt", kZip + "one");
    WriteFile(exp_ + "/CKPT+2/CKPT.yaml", "unixtime: 200\nloss: 0.3\nsplit: quick\n");
    WriteFile(exp_ + "/CKPT+2/mdl.ckpt", kZip + "two");
    WriteFile(exp_ + "/CKPT+2/opt.ckpt", "opt");
    WriteFile(exp_ + "/CKPT+3/CKPT.yaml", "unixtime: 300\nloss: 0.4\nsplit: full\n");
    WriteFile(exp_ + "/CKPT+3/mdl.ckpt", kZip + "three");
    WriteFile(exp_ + "/CKPT+3/sub/deep.txt", "deep");
    WriteFile(exp_ + "/train_log.txt", "log");
    WriteFile(src_ + "/pl/epoch=1-step=10-val_loss=0.7.ckpt", kZip + "a");
    WriteFile(src_ + "/pl/epoch=2-step=20-val_loss=0.6.ckpt", kZip + "b");
    WriteFile(src_ + "/pl/epoch=3-step=30-val_loss=0.9.ckpt", kZip + "c");
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
  EXPECT_EQ(Real("/best/min/val_loss/checkpoint.ckpt"),
            src_ + "/pl/epoch=2-step=20-val_loss=0.6.ckpt");
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
  // The newest member's files: mdl.ckpt averaged, CKPT.yaml its own copy.
  EXPECT_EQ(ListNames("/exp/avg/last3"), (std::vector<std::string>{"CKPT.yaml", "mdl.ckpt"}));
  EXPECT_EQ(MemberFiles(*r),
            (std::vector<std::string>{exp_ + "/CKPT+3/mdl.ckpt", exp_ + "/CKPT+2/mdl.ckpt"}));
  EXPECT_EQ(ListNames("/pl/avg/last3"), std::vector<std::string>{"checkpoint.ckpt"});
  EXPECT_EQ(Code("/exp/avg/last3/opt.ckpt"), StatusCode::kNotFound);
}

TEST_F(ResolverTest, Listings) {
  auto exp = ListNames("/exp");
  for (const char* name :
       {"CKPT+1", "train_log.txt", "latest", "best", "top", "avg", "where", "index.json"}) {
    EXPECT_NE(std::find(exp.begin(), exp.end(), name), exp.end()) << name;
  }
  EXPECT_EQ(ListNames("/exp/best"), (std::vector<std::string>{"max", "min"}));
  EXPECT_EQ(ListNames("/exp/best/min"), (std::vector<std::string>{"loss", "unixtime"}));
  EXPECT_EQ(ListNames("/exp/top/5/min/loss"), (std::vector<std::string>{"1", "2", "3"}));
  EXPECT_EQ(ListNames("/exp/best/min/loss"),
            (std::vector<std::string>{"CKPT.yaml", "mdl.ckpt", "opt.ckpt"}));
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
  EXPECT_EQ(names, (std::vector<std::string>{"best", "top", "avg", "where", "safetensors", "new",
                                             "index.json"}));
  EXPECT_EQ(resolver.Resolve("/latest").status().code(), StatusCode::kNotFound);
  // best/{min,max} top avg where new index.json, and safetensors/ with the
  // same but new/: best/{min,max} top avg where index.json.
  EXPECT_EQ(WalkResolves(resolver, "/", 10), 16);
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

TEST_F(ResolverTest, AnAverageHoldsTheNewestMembersOtherFiles) {
  // counter.ckpt is text in SpeechBrain: every member holds it, but it is
  // no tensor file, so avg/ serves the newest member's copy (by its bytes).
  for (const char* c : {"/CKPT+1", "/CKPT+2", "/CKPT+3"})
    WriteFile(exp_ + c + "/counter.ckpt", "7\n");
  ASSERT_TRUE(index_->Scan().ok());
  Resolver resolver(index_.get());
  for (const char* name : {"counter.ckpt", "CKPT.yaml"}) {
    auto r = resolver.Resolve(std::string("/exp/avg/last3/") + name);
    ASSERT_TRUE(r.ok()) << name << ": " << r.status().message();
    EXPECT_EQ(r->type, NodeType::kRealFile) << name;
    EXPECT_EQ(r->real_path, exp_ + "/CKPT+3/" + name);
    EXPECT_TRUE(r->members.empty());
  }
  auto best = resolver.Resolve("/exp/avg/best2/min/loss/counter.ckpt");
  ASSERT_TRUE(best.ok());
  EXPECT_EQ(best->real_path, exp_ + "/CKPT+3/counter.ckpt");  // CKPT+3 is newer than CKPT+2
  EXPECT_EQ(resolver.Resolve("/exp/avg/last3/mdl.ckpt")->type, NodeType::kAverageFile);
  EXPECT_EQ(ListNames("/exp/avg/last3"),
            (std::vector<std::string>{"CKPT.yaml", "counter.ckpt", "mdl.ckpt"}));
  EXPECT_EQ(Code("/exp/avg/last3/sub"), StatusCode::kNotFound);  // files only
}

class SafetensorsViewTest : public ResolverTest {
 protected:
  void SetUp() override {
    ResolverTest::SetUp();
    const std::string c = src_ + "/st/CKPT+1";
    WriteFile(c + "/CKPT.yaml", "unixtime: 1\nloss: 0.1\n");
    WriteFile(c + "/mdl.ckpt", kZip + "m");
    WriteFile(c + "/model.bin", kZip + "b");  // both model.*: model.bin sorts first
    WriteFile(c + "/model.pt", kZip + "p");
    WriteFile(c + "/real.safetensors", kSafetensors);  // real wins over real.pt
    WriteFile(c + "/real.pt", kZip + "r");
    WriteFile(c + "/counter.ckpt", "7\n");  // not a tensor file: its own name
    WriteFile(c + "/notes.txt", "notes");
    ASSERT_TRUE(index_->Scan().ok());
  }

  Resolution Get(const std::string& vpath) {
    auto r = Resolver(index_.get()).Resolve(vpath);
    EXPECT_TRUE(r.ok()) << vpath << ": " << r.status().message();
    return r.ok() ? *r : Resolution{};
  }
};

TEST_F(SafetensorsViewTest, TorchFilesAppearConvertedByTheClashRule) {
  EXPECT_EQ(ListNames("/st/safetensors/latest"),
            (std::vector<std::string>{"CKPT.yaml", "counter.ckpt", "mdl.safetensors",
                                      "model.pt.safetensors", "model.safetensors", "notes.txt",
                                      "real.pt.safetensors", "real.safetensors"}));
  const std::string c = src_ + "/st/CKPT+1";
  struct Case {
    const char* name;
    std::string real;
    bool convert;
  } cases[] = {
      {"mdl.safetensors", c + "/mdl.ckpt", true},
      {"model.safetensors", c + "/model.bin", true},
      {"model.pt.safetensors", c + "/model.pt", true},
      {"real.safetensors", c + "/real.safetensors", false},
      {"real.pt.safetensors", c + "/real.pt", true},
      {"counter.ckpt", c + "/counter.ckpt", false},
      {"notes.txt", c + "/notes.txt", false},
  };
  for (const Case& k : cases) {
    for (const char* dir : {"/st/safetensors/latest/", "/st/safetensors/best/min/loss/",
                            "/st/safetensors/CKPT+1/", "/safetensors/st/CKPT+1/",
                            "/safetensors/st/latest/", "/st/where/loss<1/safetensors/latest/"}) {
      Resolution r = Get(dir + std::string(k.name));
      EXPECT_EQ(r.type, NodeType::kRealFile) << dir << k.name;
      EXPECT_EQ(r.real_path, k.real) << dir << k.name;
      EXPECT_EQ(r.convert, k.convert) << dir << k.name;
      EXPECT_TRUE(r.in_view) << dir << k.name;  // read-only, answered per caller
      if (k.convert) {
        EXPECT_EQ(ConvertMembers(r), std::vector<std::string>{k.real});
      }
    }
  }
  // A PyTorch file is listed under its converted name only.
  EXPECT_EQ(Code("/st/safetensors/latest/model.pt"), StatusCode::kNotFound);
  EXPECT_EQ(Code("/st/safetensors/latest/mdl.ckpt"), StatusCode::kNotFound);
  EXPECT_EQ(Code("/st/safetensors/latest/nothing.safetensors"), StatusCode::kNotFound);
}

TEST_F(SafetensorsViewTest, MirrorsTheNamespaceButNotNewNorItself) {
  auto root = ListNames("/safetensors");
  for (const char* name : {"exp", "pl", "st", "best", "top", "avg", "where", "index.json"}) {
    EXPECT_EQ(std::count(root.begin(), root.end(), name), 1) << name;
  }
  for (const char* name : {"new", "safetensors"}) {
    EXPECT_EQ(std::count(root.begin(), root.end(), name), 0) << name;
  }
  auto exp = ListNames("/exp/safetensors");
  for (const char* name : {"CKPT+1", "train_log.txt", "latest", "best", "escape", "index.json"}) {
    EXPECT_EQ(std::count(exp.begin(), exp.end(), name), 1) << name;
  }
  EXPECT_EQ(std::count(exp.begin(), exp.end(), "new"), 0);
  EXPECT_EQ(Code("/exp/safetensors/new"), StatusCode::kNotFound);
  EXPECT_EQ(Code("/exp/safetensors/safetensors"), StatusCode::kNotFound);
  EXPECT_EQ(Code("/safetensors/exp/safetensors"), StatusCode::kNotFound);
  EXPECT_EQ(Code("/safetensors/exp/new/x"), StatusCode::kNotFound);
  EXPECT_EQ(Code("/exp/CKPT+1/safetensors"),
            StatusCode::kNotFound);  // no namespace in a checkpoint
  // Real directories and other files pass through; a link stays a link.
  EXPECT_EQ(Get("/safetensors/exp/CKPT+3/sub/deep.txt").real_path, exp_ + "/CKPT+3/sub/deep.txt");
  EXPECT_EQ(Get("/exp/safetensors/escape").type, NodeType::kRealOther);
  EXPECT_EQ(Code("/exp/safetensors/escape/secret"), StatusCode::kNotFound);
  EXPECT_EQ(Get("/exp/safetensors/index.json").type, NodeType::kIndexJson);
  EXPECT_EQ(Get("/exp/safetensors/best/min/loss/mdl.safetensors").real_path,
            exp_ + "/CKPT+2/mdl.ckpt");
  EXPECT_EQ(Get("/exp/safetensors/top/3/min/loss/2/mdl.safetensors").real_path,
            exp_ + "/CKPT+3/mdl.ckpt");
  // A single-file checkpoint: its name and its alias, both converted.
  EXPECT_EQ(ListNames("/pl/safetensors/latest"),
            (std::vector<std::string>{"checkpoint.safetensors",
                                      "epoch=3-step=30-val_loss=0.9.safetensors"}));
  Resolution pl = Get("/pl/safetensors/best/min/val_loss/checkpoint.safetensors");
  EXPECT_TRUE(pl.convert);
  EXPECT_EQ(pl.real_path, src_ + "/pl/epoch=2-step=20-val_loss=0.6.ckpt");
  EXPECT_EQ(Get("/pl/safetensors/epoch=1-step=10-val_loss=0.7.safetensors").real_path,
            src_ + "/pl/epoch=1-step=10-val_loss=0.7.ckpt");

  Resolver resolver(index_.get());
  EXPECT_GT(WalkResolves(resolver, "/safetensors", 10), 100);
  EXPECT_GT(WalkResolves(resolver, "/exp/safetensors", 10), 30);
}

TEST_F(SafetensorsViewTest, AnAverageConvertsItsMembers) {
  Resolution r = Get("/exp/safetensors/avg/last3/mdl.safetensors");
  EXPECT_EQ(r.type, NodeType::kAverageFile);
  EXPECT_TRUE(r.convert);
  EXPECT_EQ(ConvertMembers(r),
            (std::vector<std::string>{exp_ + "/CKPT+3/mdl.ckpt", exp_ + "/CKPT+2/mdl.ckpt",
                                      exp_ + "/CKPT+1/mdl.ckpt"}));
  EXPECT_EQ(ListNames("/exp/safetensors/avg/last3"),
            (std::vector<std::string>{"CKPT.yaml", "mdl.safetensors"}));
  Resolution yaml = Get("/exp/safetensors/avg/last3/CKPT.yaml");
  EXPECT_EQ(yaml.real_path, exp_ + "/CKPT+3/CKPT.yaml");
  EXPECT_FALSE(yaml.convert);
  Resolution pl = Get("/pl/safetensors/avg/last2/checkpoint.safetensors");
  EXPECT_EQ(ConvertMembers(pl),
            (std::vector<std::string>{src_ + "/pl/epoch=3-step=30-val_loss=0.9.ckpt",
                                      src_ + "/pl/epoch=2-step=20-val_loss=0.6.ckpt"}));
}

}  // namespace
}  // namespace ckptfs::index
