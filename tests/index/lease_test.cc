// The pruning lease (index/lease.h): one holder at a time, across objects
// of one process and across processes; released when the holder closes it
// or dies; its directory and file refused when they are not ckptfs's own.
#include "index/lease.h"

#include <gtest/gtest.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <string>

#include "core/beneath.h"
#include "test_util.h"

namespace ckptfs::index {
namespace {

using ckptfs::testing::MakeDirs;
using ckptfs::testing::TempDir;
using ckptfs::testing::WriteFile;

core::Beneath OpenSource(const std::string& path) {
  auto b = core::Beneath::Open(path);
  EXPECT_TRUE(b.ok()) << b.status().message();
  return std::move(*b);
}

TEST(LeaseTest, OneHolderAmongObjectsOfOneProcess) {
  TempDir dir;
  core::Beneath source = OpenSource(dir.path());
  auto a = Lease::Open(source);
  auto b = Lease::Open(source);
  ASSERT_TRUE(a.ok()) << a.status().message();
  ASSERT_TRUE(b.ok()) << b.status().message();
  auto got_a = a->TryAcquire();
  ASSERT_TRUE(got_a.ok());
  EXPECT_TRUE(*got_a);
  EXPECT_TRUE(a->held());
  auto got_b = b->TryAcquire();
  ASSERT_TRUE(got_b.ok());
  EXPECT_FALSE(*got_b);  // F_OFD_SETLK: conflicts even within one process
  EXPECT_FALSE(b->held());
  EXPECT_NE(b->Holder().find(std::to_string(::getpid())), std::string::npos) << b->Holder();
  a->Release();
  got_b = b->TryAcquire();
  ASSERT_TRUE(got_b.ok());
  EXPECT_TRUE(*got_b);
  // And the first cannot take it back while the second holds it.
  got_a = a->TryAcquire();
  ASSERT_TRUE(got_a.ok());
  EXPECT_FALSE(*got_a);
}

TEST(LeaseTest, ClosingReleases) {
  TempDir dir;
  core::Beneath source = OpenSource(dir.path());
  auto b = Lease::Open(source);
  ASSERT_TRUE(b.ok());
  {
    auto a = Lease::Open(source);
    ASSERT_TRUE(a.ok());
    ASSERT_TRUE(*a->TryAcquire());
    EXPECT_FALSE(*b->TryAcquire());
  }
  EXPECT_TRUE(*b->TryAcquire());
}

// The holder is another process, killed with SIGKILL: the kernel frees the
// lease and this process takes it.
TEST(LeaseTest, DeadHolderReleases) {
  TempDir dir;
  core::Beneath source = OpenSource(dir.path());
  int ready[2];
  ASSERT_EQ(::pipe(ready), 0);
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    ::close(ready[0]);
    auto lease = Lease::Open(source);
    const char ok = lease.ok() && lease->TryAcquire().ok() && lease->held() ? '1' : '0';
    if (::write(ready[1], &ok, 1) != 1) ::_exit(1);
    for (;;) ::pause();
  }
  ::close(ready[1]);
  char ok = 0;
  ASSERT_EQ(::read(ready[0], &ok, 1), 1);
  ::close(ready[0]);
  auto lease = Lease::Open(source);
  ASSERT_TRUE(lease.ok());
  const bool child_held = ok == '1';
  const bool got_while_alive = *lease->TryAcquire();
  ::kill(child, SIGKILL);
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  ASSERT_TRUE(child_held);
  EXPECT_FALSE(got_while_alive);
  EXPECT_TRUE(*lease->TryAcquire());
}

TEST(LeaseTest, HiddenAndRefusedWhenNotOwn) {
  EXPECT_TRUE(core::IsOwnDirName(core::kLeaseDir));
  {
    TempDir dir;
    MakeDirs(dir.path() + "/elsewhere");
    ASSERT_EQ(::symlink("elsewhere", (dir.path() + "/" + core::kLeaseDir).c_str()), 0);
    auto lease = Lease::Open(OpenSource(dir.path()));
    ASSERT_FALSE(lease.ok());
    EXPECT_EQ(lease.status().code(), core::StatusCode::kPermission);
    EXPECT_NE(lease.status().message().find("symbolic link"), std::string::npos);
  }
  {
    TempDir dir;
    const std::string d = dir.path() + "/" + core::kLeaseDir;
    MakeDirs(d);
    ASSERT_EQ(::chmod(d.c_str(), 0777), 0);
    auto lease = Lease::Open(OpenSource(dir.path()));
    ASSERT_FALSE(lease.ok());
    EXPECT_NE(lease.status().message().find("writable by other users"), std::string::npos);
  }
  {
    TempDir dir;
    const std::string d = dir.path() + "/" + core::kLeaseDir;
    MakeDirs(d);
    ASSERT_EQ(::chmod(d.c_str(), 0700), 0);
    WriteFile(dir.path() + "/target", "x");
    ASSERT_EQ(::symlink("../target", (d + "/" + kLeaseFile).c_str()), 0);
    auto lease = Lease::Open(OpenSource(dir.path()));
    ASSERT_FALSE(lease.ok());
    EXPECT_EQ(lease.status().code(), core::StatusCode::kPermission);
    EXPECT_NE(lease.status().message().find(kLeaseFile), std::string::npos);
  }
}

}  // namespace
}  // namespace ckptfs::index
