#include "core/beneath.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include "test_util.h"

namespace ckptfs::core {
namespace {

using testing::TempDir;
using testing::WriteFile;

TEST(BeneathTest, OpensPlainPathsAndRefusesLinksAtAnyComponent) {
  TempDir src, outside;
  WriteFile(src.path() + "/exp/CKPT+1/mdl.ckpt", "weights");
  WriteFile(outside.path() + "/secret/mdl.ckpt", "secret");
  ASSERT_EQ(::symlink((outside.path() + "/secret").c_str(), (src.path() + "/exp/CKPT+2").c_str()),
            0);
  ASSERT_EQ(::symlink((src.path() + "/exp").c_str(), (src.path() + "/alias").c_str()), 0);
  Result<Beneath> b = Beneath::Open(src.path());
  ASSERT_TRUE(b.ok());

  Result<ScopedFd> ok = b->OpenAt(src.path() + "/exp/CKPT+1/mdl.ckpt", O_RDONLY);
  ASSERT_TRUE(ok.ok()) << ok.status().ToString();
  char buf[8] = {};
  EXPECT_EQ(::read(ok->get(), buf, sizeof(buf)), 7);

  // A link in the middle, a link at the end, and .. are all refused.
  for (const std::string& p :
       {src.path() + "/exp/CKPT+2/mdl.ckpt", src.path() + "/alias/CKPT+1/mdl.ckpt",
        src.path() + "/exp/CKPT+2", src.path() + "/exp/../exp/CKPT+1/mdl.ckpt",
        outside.path() + "/secret/mdl.ckpt"}) {
    Result<ScopedFd> r = b->OpenAt(p, O_RDONLY);
    ASSERT_FALSE(r.ok()) << p;
    EXPECT_EQ(r.status().code(), StatusCode::kPermission) << p << ": " << r.status().ToString();
  }
}

TEST(BeneathTest, RenameNeverReplaces) {
  TempDir src;
  WriteFile(src.path() + "/a/x", "1");
  WriteFile(src.path() + "/b/x", "2");
  Result<Beneath> b = Beneath::Open(src.path());
  ASSERT_TRUE(b.ok());
  Status s = b->Rename(src.path() + "/a/x", src.path() + "/b/x", RENAME_NOREPLACE);
  EXPECT_EQ(s.code(), StatusCode::kExists);
  EXPECT_EQ(testing::ReadFile(src.path() + "/b/x"), "2");
  EXPECT_TRUE(b->Rename(src.path() + "/a/x", src.path() + "/b/y", RENAME_NOREPLACE).ok());
  EXPECT_EQ(testing::ReadFile(src.path() + "/b/y"), "1");
}

TEST(BeneathTest, RemoveTreeNeverFollowsLinks) {
  TempDir src, victim;
  WriteFile(victim.path() + "/precious", "keep me");
  WriteFile(src.path() + "/trash/old/CKPT.yaml", "a: 1");
  ASSERT_EQ(::symlink(victim.path().c_str(), (src.path() + "/trash/old/link").c_str()), 0);
  ASSERT_EQ(::symlink(victim.path().c_str(), (src.path() + "/trash/link").c_str()), 0);
  int fd = ::open(src.path().c_str(), O_RDONLY | O_DIRECTORY);
  ASSERT_GE(fd, 0);
  EXPECT_TRUE(RemoveTreeAt(fd, "trash", "trash").ok());
  EXPECT_TRUE(RemoveTreeAt(fd, "trash", "trash").ok());  // already gone: fine
  ::close(fd);
  struct stat st {};
  EXPECT_NE(::lstat((src.path() + "/trash").c_str(), &st), 0);
  EXPECT_EQ(testing::ReadFile(victim.path() + "/precious"), "keep me");
}

TEST(BeneathTest, OwnDirIsCreatedPrivateAndImpostorsAreRefused) {
  TempDir src, victim;
  int fd = ::open(src.path().c_str(), O_RDONLY | O_DIRECTORY);
  ASSERT_GE(fd, 0);
  Result<ScopedFd> made = OpenOwnDir(fd, src.path(), ".ckptfs-trash", ::geteuid(), true);
  ASSERT_TRUE(made.ok()) << made.status().ToString();
  struct stat st {};
  ASSERT_EQ(::stat((src.path() + "/.ckptfs-trash").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0700u);

  ASSERT_EQ(::symlink(victim.path().c_str(), (src.path() + "/.ckptfs-staging").c_str()), 0);
  Result<ScopedFd> link = OpenOwnDir(fd, src.path(), ".ckptfs-staging", ::geteuid(), true);
  ASSERT_FALSE(link.ok());
  EXPECT_EQ(link.status().code(), StatusCode::kPermission);
  EXPECT_NE(link.status().message().find("symbolic link"), std::string::npos);

  ASSERT_EQ(::mkdir((src.path() + "/.ckptfs-abandoned").c_str(), 0777), 0);
  ASSERT_EQ(::chmod((src.path() + "/.ckptfs-abandoned").c_str(), 0777), 0);
  Result<ScopedFd> open_to_all = OpenOwnDir(fd, src.path(), ".ckptfs-abandoned", ::geteuid(), true);
  EXPECT_FALSE(open_to_all.ok());
  Result<ScopedFd> other_owner = OpenOwnDir(fd, src.path(), ".ckptfs-trash", ::geteuid() + 1, true);
  EXPECT_FALSE(other_owner.ok());
  ::close(fd);
}

TEST(BeneathTest, CheckAccessFollowsTheModeBitsOfEveryDirectory) {
  TempDir src;
  WriteFile(src.path() + "/open/CKPT+1/mdl.ckpt", "w");
  WriteFile(src.path() + "/private/CKPT+1/mdl.ckpt", "w");
  WriteFile(src.path() + "/open/CKPT+2/mdl.ckpt", "w");
  ::chmod(src.path().c_str(), 0755);
  ::chmod((src.path() + "/private").c_str(), 0700);
  ::chmod((src.path() + "/open/CKPT+2/mdl.ckpt").c_str(), 0600);
  Result<Beneath> b = Beneath::Open(src.path());
  ASSERT_TRUE(b.ok());
  Caller nobody{65534, 65534, {}};
  Caller root{0, 0, {}};
  EXPECT_TRUE(b->CheckAccess(nobody, src.path() + "/open/CKPT+1/mdl.ckpt", R_OK).ok());
  EXPECT_EQ(b->CheckAccess(nobody, src.path() + "/private/CKPT+1/mdl.ckpt", R_OK).code(),
            StatusCode::kPermission);
  EXPECT_EQ(b->CheckAccess(nobody, src.path() + "/open/CKPT+2/mdl.ckpt", R_OK).code(),
            StatusCode::kPermission);
  EXPECT_TRUE(b->CheckAccess(root, src.path() + "/private/CKPT+1/mdl.ckpt", R_OK).ok());
  // The owner's group, and a supplementary group, count as the kernel counts them.
  struct stat st {};
  ASSERT_EQ(::stat((src.path() + "/open/CKPT+2/mdl.ckpt").c_str(), &st), 0);
  ::chmod((src.path() + "/open/CKPT+2/mdl.ckpt").c_str(), 0640);
  Caller member{65534, 65534, {st.st_gid}};
  EXPECT_TRUE(b->CheckAccess(member, src.path() + "/open/CKPT+2/mdl.ckpt", R_OK).ok());
  EXPECT_FALSE(b->CheckAccess(member, src.path() + "/open/CKPT+2/mdl.ckpt", W_OK).ok());
}

}  // namespace
}  // namespace ckptfs::core
