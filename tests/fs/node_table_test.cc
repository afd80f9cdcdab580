#include "fs/node_table.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <thread>

#include "test_util.h"

namespace ckptfs::fs {
namespace {

using testing::WriteFile;

class NodeTableTest : public ::testing::Test {
 protected:
  void SetUp() override {
    src_ = dir_.path() + "/src";
    WriteFile(src_ + "/exp/CKPT+1/CKPT.yaml", "unixtime: 100\nloss: 0.5\n");
    WriteFile(src_ + "/exp/CKPT+1/mdl.ckpt", "one");
    WriteFile(src_ + "/exp/CKPT+2/CKPT.yaml", "unixtime: 200\nloss: 0.3\n");
    WriteFile(src_ + "/exp/CKPT+2/mdl.ckpt", "two!");
    Reopen(false);
  }

  void Reopen(bool links, bool multi_user = false) {
    table_.reset();
    reinvalidated_.clear();
    auto idx = index::Index::Open(src_, dir_.path() + "/i.sqlite");
    ASSERT_TRUE(idx.ok());
    index_ = std::move(*idx);
    ASSERT_TRUE(index_->Scan().ok());
    NodeTableOptions options;
    options.links = links;
    options.multi_user = multi_user;
    options.reinvalidate = [this](Invalidation inv) { reinvalidated_.push_back(inv); };
    table_ = std::make_unique<NodeTable>(index_.get(), options);
  }

  // Looks up a path component by component; returns the final inode.
  uint64_t Walk(const std::vector<std::string>& names, const core::Caller* caller = nullptr) {
    uint64_t ino = kRootIno;
    for (const std::string& n : names) {
      auto a = table_->Lookup(ino, n, true, caller);
      EXPECT_TRUE(a.ok()) << n << ": " << a.status().message();
      if (!a.ok()) return 0;
      ino = a->st.st_ino;
    }
    return ino;
  }

  testing::TempDir dir_;
  std::string src_;
  std::unique_ptr<index::Index> index_;
  std::unique_ptr<NodeTable> table_;
  std::vector<Invalidation> reinvalidated_;
};

TEST_F(NodeTableTest, ViewFilesAreReadOnlyRealFiles) {
  uint64_t ino = Walk({"exp", "best", "min", "loss", "mdl.ckpt"});
  auto attr = table_->GetAttr(ino);
  ASSERT_TRUE(attr.ok());
  EXPECT_EQ(attr->st.st_size, 4);
  EXPECT_EQ(attr->st.st_mode & 0222, 0u);
  auto f = table_->Open(ino, O_RDONLY);
  ASSERT_TRUE(f.ok());
  char buf[8] = {};
  EXPECT_EQ(::pread(f->fd, buf, sizeof(buf), 0), 4);
  EXPECT_STREQ(buf, "two!");
  EXPECT_FALSE(f->keep_cache);  // first open
  ::close(f->fd);
  f = table_->Open(ino, O_RDONLY);
  ASSERT_TRUE(f.ok());
  EXPECT_TRUE(f->keep_cache);  // same file, unchanged
  ::close(f->fd);
  EXPECT_EQ(ToErrno(table_->Open(ino, O_RDWR).status()), EROFS);
  EXPECT_EQ(ToErrno(table_->Open(ino, O_RDONLY | O_TRUNC).status()), EROFS);
  EXPECT_EQ(*table_->GetXattr(ino, "user.ckptfs.real_path"), src_ + "/exp/CKPT+2/mdl.ckpt");
  EXPECT_EQ(ToErrno(table_->GetXattr(ino, "user.other").status()), ENODATA);
}

TEST_F(NodeTableTest, ErrnoAtTheEdge) {
  uint64_t exp = Walk({"exp"});
  EXPECT_EQ(ToErrno(table_->Lookup(exp, "nothing").status()), ENOENT);
  uint64_t best = Walk({"exp", "best"});
  EXPECT_EQ(ToErrno(table_->Lookup(best, "middle").status()), EINVAL);
  uint64_t file = Walk({"exp", "CKPT+1", "mdl.ckpt"});
  EXPECT_EQ(ToErrno(table_->Lookup(file, "x").status()), ENOTDIR);
  EXPECT_EQ(ToErrno(table_->Open(exp, O_RDONLY).status()), EISDIR);
}

TEST_F(NodeTableTest, SameNameNewSelectionIsANewInode) {
  uint64_t before = Walk({"exp", "latest", "mdl.ckpt"});
  WriteFile(src_ + "/exp/CKPT+3/CKPT.yaml", "unixtime: 300\nloss: 0.9\n");
  WriteFile(src_ + "/exp/CKPT+3/mdl.ckpt", "three");
  auto scan = index_->Scan();
  ASSERT_TRUE(scan.ok());
  auto invals = table_->ViewsChanged(scan->changed_experiments);
  // latest (in exp) and mdl.ckpt (in latest) are both forgotten.
  EXPECT_TRUE(std::any_of(invals.begin(), invals.end(),
                          [](const Invalidation& i) { return i.entry && i.name == "latest"; }));
  EXPECT_TRUE(std::any_of(invals.begin(), invals.end(),
                          [&](const Invalidation& i) { return !i.entry && i.ino == before; }));
  uint64_t after = Walk({"exp", "latest", "mdl.ckpt"});
  EXPECT_NE(before, after);
  EXPECT_EQ(table_->GetAttr(after)->st.st_size, 5);
  // Passthrough nodes are not views and are left alone.
  uint64_t real = Walk({"exp", "CKPT+1", "mdl.ckpt"});
  invals = table_->ViewsChanged({src_ + "/exp"});
  EXPECT_FALSE(std::any_of(invals.begin(), invals.end(),
                           [&](const Invalidation& i) { return !i.entry && i.ino == real; }));
}

TEST_F(NodeTableTest, LookupThatRacedAChangeIsInvalidatedAgain) {
  uint64_t exp = Walk({"exp"});
  // No change while answering: nothing more to send.
  uint64_t g = table_->generation();
  ASSERT_TRUE(table_->Lookup(exp, "latest").ok());
  table_->AfterLookupReply(exp, "latest", g);
  EXPECT_TRUE(reinvalidated_.empty());
  // The index changed between resolving and replying: the entry the kernel
  // just cached may predate the change, so it is invalidated once more.
  g = table_->generation();
  ASSERT_TRUE(table_->Lookup(exp, "latest").ok());
  table_->ViewsChanged({src_ + "/exp"});
  table_->AfterLookupReply(exp, "latest", g);
  ASSERT_EQ(reinvalidated_.size(), 1u);
  EXPECT_TRUE(reinvalidated_[0].entry);
  EXPECT_EQ(reinvalidated_[0].parent, exp);
  EXPECT_EQ(reinvalidated_[0].name, "latest");
}

TEST_F(NodeTableTest, OpenOfAViewWhoseCheckpointVanishedIsStale) {
  uint64_t ino = Walk({"exp", "latest", "mdl.ckpt"});
  ASSERT_EQ(::rename((src_ + "/exp/CKPT+2").c_str(), (dir_.path() + "/gone").c_str()), 0);
  // ESTALE, not ENOENT: the kernel then walks the path again.
  EXPECT_EQ(ToErrno(table_->Open(ino, O_RDONLY).status()), ESTALE);
  // A fresh lookup skips the vanished checkpoint.
  auto f = table_->Open(Walk({"exp", "latest", "mdl.ckpt"}), O_RDONLY);
  ASSERT_TRUE(f.ok()) << f.status().message();
  char buf[8] = {};
  EXPECT_EQ(::pread(f->fd, buf, sizeof(buf), 0), 3);
  EXPECT_STREQ(buf, "one");
  ::close(f->fd);
}

// Retention deletes the third-newest checkpoint (and a rescan drops its
// rows) while lookups of latest/ run; latest/ itself never changes, so no
// lookup may fail. The resolver asks for the newest three as candidates;
// when the index read their ids and then their rows in two snapshots, a
// deletion in between failed the lookup ("checkpoint row N", ENOENT).
TEST_F(NodeTableTest, LookupsNeverFailWhileRetentionDeletesACandidate) {
  WriteFile(src_ + "/exp/CKPT+0/CKPT.yaml", "unixtime: 50\nloss: 0.9\n");
  ASSERT_TRUE(index_->Scan().ok());
  uint64_t exp = Walk({"exp"});
  const std::string third = src_ + "/exp/CKPT+0";
  const std::string parked = dir_.path() + "/parked";
  std::atomic<bool> done{false};
  std::thread retention([&] {
    for (int i = 0; i < 400; ++i) {
      const bool away = i % 2 == 0;
      EXPECT_EQ(
          ::rename(away ? third.c_str() : parked.c_str(), away ? parked.c_str() : third.c_str()),
          0);
      EXPECT_TRUE(index_->ScanChanges({{src_ + "/exp", "CKPT+0"}}).ok());
    }
    done = true;
  });
  int lookups = 0;
  while (!done) {
    auto latest = table_->Lookup(exp, "latest");
    ASSERT_TRUE(latest.ok()) << "after " << lookups << " lookups: " << latest.status().message();
    auto file = table_->Lookup(latest->st.st_ino, "mdl.ckpt");
    ASSERT_TRUE(file.ok()) << "after " << lookups << " lookups: " << file.status().message();
    table_->Forget(file->st.st_ino, 1);
    table_->Forget(latest->st.st_ino, 1);
    ++lookups;
  }
  retention.join();
  EXPECT_GT(lookups, 0);
}

TEST_F(NodeTableTest, PathChangeInvalidatesEveryNodeOfThatPath) {
  uint64_t real = Walk({"exp", "CKPT+2", "mdl.ckpt"});
  uint64_t view = Walk({"exp", "best", "min", "loss", "mdl.ckpt"});
  auto invals = table_->PathChanged(src_ + "/exp/CKPT+2", "mdl.ckpt");
  for (uint64_t ino : {real, view}) {
    EXPECT_TRUE(std::any_of(invals.begin(), invals.end(),
                            [&](const Invalidation& i) { return !i.entry && i.ino == ino; }));
  }
}

TEST_F(NodeTableTest, ForgetDropsNodesAtZero) {
  const size_t base = table_->size();
  uint64_t ino = Walk({"exp", "latest"});
  Walk({"exp", "latest"});
  EXPECT_EQ(table_->size(), base + 2);
  table_->Forget(ino, 2);
  EXPECT_EQ(table_->size(), base + 1);  // "exp" is still looked up twice
  EXPECT_EQ(ToErrno(table_->GetAttr(ino).status()), ENOENT);
}

TEST_F(NodeTableTest, LinksModeMakesViewsSymlinks) {
  Reopen(true);
  uint64_t ino = Walk({"exp", "best", "min", "loss"});
  auto attr = table_->GetAttr(ino);
  ASSERT_TRUE(attr.ok());
  EXPECT_TRUE(S_ISLNK(attr->st.st_mode));
  EXPECT_EQ(*table_->ReadLink(ino), src_ + "/exp/CKPT+2");
  EXPECT_FALSE(S_ISLNK(table_->GetAttr(Walk({"exp", "CKPT+1"}))->st.st_mode));
  // safetensors/ never links out of the mirror: its directories are
  // directories; files it does not convert may be links.
  for (const auto& path : std::vector<std::vector<std::string>>{
           {"exp", "safetensors", "best", "min", "loss"}, {"exp", "safetensors", "CKPT+1"}}) {
    EXPECT_TRUE(S_ISDIR(table_->GetAttr(Walk(path))->st.st_mode)) << path.back();
  }
  ino = Walk({"exp", "safetensors", "best", "min", "loss", "CKPT.yaml"});
  EXPECT_EQ(*table_->ReadLink(ino), src_ + "/exp/CKPT+2/CKPT.yaml");
}

TEST_F(NodeTableTest, ManyLookupsAndForgetsLeaveNothingBehind) {
  const size_t base = table_->size();
  for (int i = 0; i < 2000; ++i) {
    uint64_t exp = Walk({"exp"});
    auto a = table_->Lookup(exp, "top");
    ASSERT_TRUE(a.ok());
    table_->Forget(a->st.st_ino, 1);
    table_->Forget(exp, 1);
    (void)table_->Lookup(kRootIno, "nope");
  }
  EXPECT_EQ(table_->size(), base);
}

// Security (docs/DESIGN.md): on a multi-user mount, views answer per caller.
class NodeTableSecurityTest : public NodeTableTest {
 protected:
  void SetUp() override {
    NodeTableTest::SetUp();
    ASSERT_EQ(::chmod((src_ + "/exp/CKPT+2").c_str(), 0700), 0);  // best and latest for root
    Reopen(false, /*multi_user=*/true);
    nobody_.uid = 65534;
    nobody_.gid = 65534;
  }
  core::Caller root_;
  core::Caller nobody_;
};

TEST_F(NodeTableSecurityTest, ViewsSelectOnlyWhatTheCallerCanRead) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root to act for another uid";
  EXPECT_EQ(
      *table_->GetXattr(Walk({"exp", "best", "min", "loss"}, &root_), "user.ckptfs.checkpoint"),
      src_ + "/exp/CKPT+2");
  const uint64_t best = Walk({"exp", "best", "min", "loss"}, &nobody_);
  EXPECT_EQ(*table_->GetXattr(best, "user.ckptfs.checkpoint", &nobody_), src_ + "/exp/CKPT+1");
  const uint64_t latest = Walk({"exp", "latest"}, &nobody_);
  EXPECT_EQ(*table_->GetXattr(latest, "user.ckptfs.checkpoint", &nobody_), src_ + "/exp/CKPT+1");
  // A view's entry carries the real owner and mode and is never cached.
  auto attr = table_->GetAttr(best);
  ASSERT_TRUE(attr.ok());
  EXPECT_EQ(attr->timeout, 0);
  EXPECT_EQ(attr->st.st_mode & 0777, 0555u);  // 0755 less the write bits
  // index.json lists only the readable checkpoint, per caller.
  const uint64_t exp = Walk({"exp"});
  auto idx = table_->Lookup(exp, "index.json", true, &nobody_);
  ASSERT_TRUE(idx.ok());
  auto mine = table_->Open(idx->st.st_ino, O_RDONLY, &nobody_);
  ASSERT_TRUE(mine.ok());
  EXPECT_NE(mine->content.find("CKPT+1"), std::string::npos);
  EXPECT_EQ(mine->content.find("CKPT+2"), std::string::npos);
  auto all = table_->Open(idx->st.st_ino, O_RDONLY, &root_);
  ASSERT_TRUE(all.ok());
  EXPECT_NE(all->content.find("CKPT+2"), std::string::npos);
  // The root's inode of the private checkpoint: the caller can neither open
  // it nor read its xattrs.
  const uint64_t secret = Walk({"exp", "best", "min", "loss", "mdl.ckpt"}, &root_);
  EXPECT_EQ(ToErrno(table_->Open(secret, O_RDONLY, &nobody_).status()), EACCES);
  EXPECT_EQ(ToErrno(table_->GetXattr(secret, "user.ckptfs.real_path", &nobody_).status()), EACCES);
  EXPECT_TRUE(table_->ListXattr(secret, &nobody_).empty());
  auto opened = table_->Open(secret, O_RDONLY, &root_);
  ASSERT_TRUE(opened.ok());
  ::close(opened->fd);
  table_->Released(*opened);
  // Real listings: the private directory is refused to the caller.
  EXPECT_EQ(ToErrno(table_->ReadDir(Walk({"exp", "CKPT+2"}), &nobody_).status()), EACCES);
  auto names = table_->ReadDir(exp, &nobody_);
  ASSERT_TRUE(names.ok());
}

TEST_F(NodeTableSecurityTest, ChmodAfterLookupIsSeenAtOpen) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root to act for another uid";
  const uint64_t ino = Walk({"exp", "CKPT+1", "mdl.ckpt"}, &nobody_);
  ASSERT_EQ(::chmod((src_ + "/exp/CKPT+1/mdl.ckpt").c_str(), 0600), 0);
  EXPECT_EQ(ToErrno(table_->Open(ino, O_RDONLY, &nobody_).status()), EACCES);
  // And a directory closed after the kernel cached it refuses lookups in it.
  const uint64_t dir = Walk({"exp", "CKPT+1"}, &nobody_);
  ASSERT_EQ(::chmod((src_ + "/exp/CKPT+1").c_str(), 0700), 0);
  EXPECT_EQ(ToErrno(table_->Lookup(dir, "CKPT.yaml", true, &nobody_).status()), EACCES);
  EXPECT_TRUE(table_->Lookup(dir, "CKPT.yaml", true, &root_).ok());
}

TEST_F(NodeTableSecurityTest, SafetensorsConversionsCheckTheCallerFirst) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root to act for another uid";
  // A PyTorch zip by its first bytes (not a whole one: converting it fails).
  WriteFile(src_ + "/exp/CKPT+1/w.pt", std::string("PK\x03\x04", 4) + "not a whole zip");
  ASSERT_EQ(::chmod((src_ + "/exp/CKPT+1/w.pt").c_str(), 0600), 0);
  ASSERT_TRUE(index_->Scan().ok());
  core::AverageCache cache(dir_.path() + "/cache", int64_t{1} << 30);
  NodeTableOptions options;
  options.multi_user = true;
  options.averages = &cache;
  table_ = std::make_unique<NodeTable>(index_.get(), options);
  const uint64_t dir = Walk({"exp", "safetensors", "CKPT+1"}, &nobody_);
  auto names = table_->ReadDir(dir, &nobody_);
  ASSERT_TRUE(names.ok());
  EXPECT_TRUE(std::any_of(names->begin(), names->end(),
                          [](const index::DirEntry& e) { return e.name == "w.safetensors"; }));
  // The caller may not read the member: refused before anything is converted.
  EXPECT_EQ(ToErrno(table_->Lookup(dir, "w.safetensors", true, &nobody_).status()), EACCES);
  // Root may: the conversion runs, and fails on this file (EIO, not served).
  EXPECT_EQ(ToErrno(table_->Lookup(dir, "w.safetensors", true, &root_).status()), EIO);
  // Other files pass through, read-only; the view's entries are never cached.
  auto yaml = table_->Lookup(dir, "CKPT.yaml", true, &nobody_);
  ASSERT_TRUE(yaml.ok());
  EXPECT_EQ(yaml->timeout, 0);
  EXPECT_EQ(ToErrno(table_->Open(yaml->st.st_ino, O_RDWR, &root_).status()), EROFS);
  // user.ckptfs.globals is offered on tensor files only, and reading it
  // inspects the file (this one is broken: an error, never "safe").
  const uint64_t pt = Walk({"exp", "CKPT+1", "w.pt"}, &root_);
  auto listed = table_->ListXattr(pt, &root_);
  EXPECT_NE(std::find(listed.begin(), listed.end(), "user.ckptfs.globals"), listed.end());
  EXPECT_FALSE(table_->GetXattr(pt, "user.ckptfs.globals", &root_).ok());
  listed = table_->ListXattr(yaml->st.st_ino, &root_);
  EXPECT_EQ(std::find(listed.begin(), listed.end(), "user.ckptfs.globals"), listed.end());
  EXPECT_EQ(ToErrno(table_->GetXattr(yaml->st.st_ino, "user.ckptfs.globals").status()), ENODATA);
}

TEST_F(NodeTableTest, OpenNeverFollowsADirectorySwappedForALink) {
  testing::TempDir outside;
  WriteFile(outside.path() + "/secret/mdl.ckpt", "SECRET");
  const uint64_t ino = Walk({"exp", "CKPT+1", "mdl.ckpt"});
  const uint64_t view = Walk({"exp", "best", "max", "loss", "mdl.ckpt"});  // CKPT+1
  ASSERT_EQ(::rename((src_ + "/exp/CKPT+1").c_str(), (src_ + "/exp/old").c_str()), 0);
  ASSERT_EQ(::symlink((outside.path() + "/secret").c_str(), (src_ + "/exp/CKPT+1").c_str()), 0);
  for (uint64_t i : {ino, view}) {
    auto f = table_->Open(i, O_RDONLY);
    ASSERT_FALSE(f.ok());
    EXPECT_EQ(ToErrno(f.status()), EACCES) << f.status().message();
    EXPECT_FALSE(table_->GetAttr(i).ok());  // nor stats what the link points to
  }
}

TEST_F(NodeTableTest, SingleUserMountsKeepLongTimeouts) {
  auto attr = table_->GetAttr(Walk({"exp", "best", "min", "loss"}));
  ASSERT_TRUE(attr.ok());
  EXPECT_GT(attr->timeout, 0);
}

}  // namespace
}  // namespace ckptfs::fs
