// The watcher's poll mode (index/watcher.h): what another node writes, which
// inotify would never report on a shared filesystem, is found by the
// periodic incremental scan and reported through the same callbacks.
#include "index/watcher.h"

#include <gtest/gtest.h>
#include <stdio.h>

#include <chrono>
#include <condition_variable>
#include <mutex>
#include <set>
#include <string>

#include "test_util.h"

namespace ckptfs::index {
namespace {

using ckptfs::testing::TempDir;
using ckptfs::testing::WriteFile;

TEST(WatcherPollTest, FindsNewCheckpointsWithoutInotify) {
  TempDir dir;
  const std::string src = dir.path() + "/src";
  const std::string exp = src + "/exp";
  WriteFile(exp + "/CKPT+1/CKPT.yaml", "unixtime: 1\n");
  auto idx = Index::Open(src, dir.path() + "/i.sqlite");
  ASSERT_TRUE(idx.ok()) << idx.status().message();
  ASSERT_TRUE((*idx)->Scan().ok());

  std::mutex mu;
  std::condition_variable cv;
  std::set<std::string> changed;
  int path_events = 0;
  Watcher::Callbacks callbacks;
  callbacks.on_scanned = [&](const ScanStats& stats) {
    std::lock_guard<std::mutex> lock(mu);
    changed.insert(stats.changed_experiments.begin(), stats.changed_experiments.end());
    cv.notify_all();
  };
  callbacks.on_path_changed = [&](const std::string&, const std::string&) {
    std::lock_guard<std::mutex> lock(mu);
    ++path_events;
  };
  Watcher::Settings settings;
  settings.poll = std::chrono::milliseconds(50);
  auto watcher = Watcher::Start(idx->get(), callbacks, settings);
  ASSERT_TRUE(watcher.ok()) << watcher.status().message();
  EXPECT_FALSE((*watcher)->IsWatched(exp));  // no inotify at all

  // Written as a commit from another node lands: one rename into the experiment.
  WriteFile(dir.path() + "/elsewhere/CKPT+2/CKPT.yaml", "unixtime: 2\n");
  ASSERT_EQ(::rename((dir.path() + "/elsewhere/CKPT+2").c_str(), (exp + "/CKPT+2").c_str()), 0);
  {
    std::unique_lock<std::mutex> lock(mu);
    EXPECT_TRUE(
        cv.wait_for(lock, std::chrono::seconds(10), [&] { return changed.count(exp) > 0; }));
    EXPECT_EQ(path_events, 0);
  }
  auto all = (*idx)->List(exp);
  ASSERT_TRUE(all.ok());
  std::set<std::string> names;
  for (const core::Checkpoint& c : *all) names.insert(c.name);
  EXPECT_EQ(names, (std::set<std::string>{"CKPT+1", "CKPT+2"}));
}

}  // namespace
}  // namespace ckptfs::index
