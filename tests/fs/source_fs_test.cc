// Which sources are shared (poll) and which rename by copying (new/ refused).
#include "fs/source_fs.h"

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include "test_util.h"

namespace ckptfs::fs {
namespace {

TEST(SourceFilesystemTest, ClassifiesByMagicAndFstype) {
  struct Case {
    long f_type;
    const char* fstype;
    const char* name;
    bool shared;
    bool atomic;
  };
  const Case cases[] = {
      {0xEF53, "", "local", false, true},      // ext4
      {0x58465342, "", "local", false, true},  // xfs
      {0x01021994, "", "local", false, true},  // tmpfs
      {0x6969, "", "nfs", true, true},
      {0x0BD00BD0, "", "lustre", true, true},
      {0x00C36400, "", "cephfs", true, true},
      {0x517B, "", "smb", true, true},
      {static_cast<long>(0xFF534D42), "", "smb", true, true},
      {static_cast<long>(0xFE534D42), "", "smb", true, true},
      {0x65735546, "fuse.sshfs", "fuse.sshfs", true, true},
      {0x65735546, "", "fuse", true, true},
      {0x65735546, "fuse.s3fs", "fuse.s3fs", true, false},
      {0x65735546, "fuse.goofys", "fuse.goofys", true, false},
      {0x65735546, "fuse.gcsfuse", "fuse.gcsfuse", true, false},
      {0x65735546, "fuse.rclone", "fuse.rclone", true, false},
  };
  for (const Case& c : cases) {
    SourceFilesystem fs = ClassifyFilesystem(c.f_type, c.fstype);
    EXPECT_EQ(fs.name, c.name) << std::hex << c.f_type;
    EXPECT_EQ(fs.shared, c.shared) << c.name;
    EXPECT_EQ(fs.atomic_rename, c.atomic) << c.name;
  }
}

TEST(SourceFilesystemTest, MountFstypeTakesTheInnermostMount) {
  const std::string mountinfo =
      "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
      "40 22 0:50 / /data rw shared:20 - nfs4 srv:/data rw,vers=4.2\n"
      "41 40 0:51 / /data/bucket rw - fuse.s3fs s3fs rw,user_id=0\n"
      "42 22 0:52 / /mnt/with\\040space rw - fuse.goofys b rw\n";
  EXPECT_EQ(MountFstype(mountinfo, "/home/u/exp"), "ext4");
  EXPECT_EQ(MountFstype(mountinfo, "/data/exp"), "nfs4");
  EXPECT_EQ(MountFstype(mountinfo, "/data/bucket/exp"), "fuse.s3fs");
  EXPECT_EQ(MountFstype(mountinfo, "/data/bucketeer"), "nfs4");
  EXPECT_EQ(MountFstype(mountinfo, "/mnt/with space/x"), "fuse.goofys");
  EXPECT_EQ(MountFstype("", "/x"), "");
}

// Another node's save in progress is found, however deep; no staging, an
// empty one or one that is not ckptfs's own reads as nothing in progress.
TEST(SourceFilesystemTest, OwnDirActive) {
  testing::TempDir dir;
  const std::string src = dir.path() + "/src", exp = src + "/exp";
  testing::MakeDirs(exp);
  auto source = core::Beneath::Open(src);
  ASSERT_TRUE(source.ok());
  const auto window = std::chrono::seconds(120);
  EXPECT_FALSE(OwnDirActive(*source, exp, core::kStagingDir, window));  // none
  const std::string staging = exp + "/" + core::kStagingDir;
  ASSERT_EQ(::mkdir(staging.c_str(), 0700), 0);
  EXPECT_FALSE(OwnDirActive(*source, exp, core::kStagingDir, window));  // empty
  testing::WriteFile(staging + "/CKPT+2/sub/model.ckpt", "x");
  const double old = 1e9;  // 2001
  testing::SetMtime(staging + "/CKPT+2/sub/model.ckpt", old);
  testing::SetMtime(staging + "/CKPT+2/sub", old);
  EXPECT_TRUE(OwnDirActive(*source, exp, core::kStagingDir,
                           window));  // changed just now (ctime, mtime above)
  EXPECT_FALSE(OwnDirActive(*source, exp, core::kStagingDir,
                            std::chrono::seconds(-3600)));  // nothing after an hour from now
  testing::RemoveTree(staging);
  testing::MakeDirs(dir.path() + "/elsewhere/CKPT+3");
  ASSERT_EQ(::symlink((dir.path() + "/elsewhere").c_str(), staging.c_str()), 0);
  EXPECT_FALSE(OwnDirActive(*source, exp, core::kStagingDir, window));  // refused: not ckptfs's own
}

}  // namespace
}  // namespace ckptfs::fs
