// Claim: resolving best/min/loss through the index beats a SpeechBrain-style
// scan (list the directory, parse every CKPT.yaml, take the minimum).
//
// Builds N SpeechBrain checkpoints in a temporary directory, then prints:
//   cold index build, no-change rescan, indexed resolve of /best/min/loss,
//   the same answer by a yaml-cpp scan, and the ratio scan / resolve.
// Usage: bench_resolve_best [N=10000] [DIR=$TMPDIR]
#include <dirent.h>
#include <yaml-cpp/yaml.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <memory>
#include <random>
#include <string>

#include "index/index.h"
#include "index/resolver.h"

namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point since) {
  return std::chrono::duration<double>(Clock::now() - since).count();
}

// What SpeechBrain's Checkpointer.find_checkpoint(min_key="loss") does.
std::string ScanForBest(const std::string& exp) {
  std::string best;
  double best_loss = std::numeric_limits<double>::infinity();
  DIR* d = ::opendir(exp.c_str());
  while (struct dirent* e = ::readdir(d)) {
    std::string name = e->d_name;
    if (name.rfind("CKPT+", 0) != 0) continue;
    YAML::Node meta = YAML::LoadFile(exp + "/" + name + "/CKPT.yaml");
    if (!meta["loss"]) continue;
    double loss = meta["loss"].as<double>();
    if (loss < best_loss) best_loss = loss, best = exp + "/" + name;
  }
  ::closedir(d);
  return best;
}

}  // namespace

int main(int argc, char** argv) {
  const int n = argc > 1 ? std::atoi(argv[1]) : 10000;
  const char* tmp = std::getenv("TMPDIR");
  std::string root = std::string(argc > 2 ? argv[2] : (tmp != nullptr ? tmp : "/tmp")) +
                     "/ckptfs-bench-resolve";
  std::filesystem::remove_all(root);
  const std::string exp = root + "/exp";
  std::mt19937 rng(42);
  std::uniform_real_distribution<double> loss(0.1, 5.0);
  for (int i = 0; i < n; ++i) {
    char name[64];
    std::snprintf(name, sizeof(name), "/CKPT+2024-01-01+00-00-%06d+00", i);
    std::filesystem::create_directories(exp + name);
    std::ofstream(exp + name + "/CKPT.yaml")
        << "# yamllint disable\nend-of-epoch: true\nepoch: " << i << "\nloss: " << loss(rng)
        << "\nunixtime: " << 1700000000 + i << "\n";
    std::ofstream(exp + name + "/model.ckpt") << "x";
  }
  std::printf("resolve best/min/loss among %d SpeechBrain checkpoints\n", n);

  auto t = Clock::now();
  auto idx = ckptfs::index::Index::Open(root, root + "/index.sqlite");
  if (!idx.ok()) return std::fprintf(stderr, "%s\n", idx.status().message().c_str()), 1;
  auto scan = (*idx)->Scan();
  if (!scan.ok()) return std::fprintf(stderr, "%s\n", scan.status().message().c_str()), 1;
  double cold = Seconds(t);

  t = Clock::now();
  const int rescans = 5;
  for (int i = 0; i < rescans; ++i) (void)(*idx)->Scan();
  double rescan = Seconds(t) / rescans;

  ckptfs::index::Resolver resolver(idx->get());
  std::string via_index;
  const int resolves = 2000;
  t = Clock::now();
  for (int i = 0; i < resolves; ++i) via_index = resolver.Resolve("/exp/best/min/loss")->real_path;
  double resolve = Seconds(t) / resolves;

  std::string via_scan;
  const int scans = 3;
  t = Clock::now();
  for (int i = 0; i < scans; ++i) via_scan = ScanForBest(exp);
  double full_scan = Seconds(t) / scans;

  if (via_index != via_scan) {
    std::fprintf(stderr, "MISMATCH: index %s, scan %s\n", via_index.c_str(), via_scan.c_str());
    return 1;
  }
  std::printf("  cold index build (open + full scan):   %10.3f ms\n", cold * 1e3);
  std::printf("  rescan, nothing changed:               %10.3f ms\n", rescan * 1e3);
  std::printf("  indexed resolve /best/min/loss:        %10.3f us\n", resolve * 1e6);
  std::printf("  SpeechBrain-style scan (yaml-cpp):     %10.3f ms\n", full_scan * 1e3);
  std::printf("  ratio scan / indexed resolve:          %10.0fx\n", full_scan / resolve);
  std::printf("  ratio scan / (rescan + resolve):       %10.1fx\n", full_scan / (rescan + resolve));
  std::filesystem::remove_all(root);
  return 0;
}
