// libFuzzer target: meta recognition as the daemon does it, through the
// scanner. The input is written as the meta file of one checkpoint of each
// directory layout (a SpeechBrain CKPT.yaml, a native meta.json, a Hugging
// Face trainer_state.json) in a fresh source tree; a fresh index is opened
// and scanned (index/scanner.cc: directory recognition, LoadCheckpoint,
// stamps, rows written to SQLite), and the checkpoints and their numeric
// keys are read back as the resolver does.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>

#include "core/file_util.h"
#include "fuzz_files.h"
#include "index/index.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using ckptfs::fuzz::ScratchDir;
  const std::string source = ScratchDir() + "/src";
  ckptfs::fuzz::RemoveTree(source);
  const struct {
    const char* dir;
    const char* meta;
  } kLayouts[] = {{"/exp/CKPT+2024-01-01+00-00-00+00", "CKPT.yaml"},
                  {"/exp/ckpt-1", "meta.json"},
                  {"/exp/checkpoint-100", "trainer_state.json"}};
  for (const auto& l : kLayouts) {
    const std::string dir = source + l.dir;
    if (!ckptfs::core::MakeDirs(dir).ok()) __builtin_trap();
    ckptfs::fuzz::WriteFileOrDie(dir + "/" + l.meta, data, size);
  }
  const std::string db = ScratchDir() + "/index/index.sqlite";
  ckptfs::fuzz::RemoveTree(ScratchDir() + "/index");
  auto index = ckptfs::index::Index::Open(source, db);
  if (!index.ok()) __builtin_trap();  // a fresh index on tmpfs must open
  // Whatever the meta holds, the scan succeeds and indexes the three
  // checkpoints: a meta that cannot be parsed makes an invalid checkpoint,
  // never a failed scan or a missing one.
  auto stats = (*index)->Scan();
  if (!stats.ok()) {
    std::fprintf(stderr, "scan failed: %s\n", stats.status().message().c_str());
    __builtin_trap();
  }
  auto listed = (*index)->List(source + "/exp");
  if (!listed.ok() || listed->size() != 3) {
    std::fprintf(stderr, "listed %s\n",
                 listed.ok() ? std::to_string(listed->size()).c_str()
                             : listed.status().message().c_str());
    __builtin_trap();
  }
  (void)(*index)->NumericKeys(source + "/exp", {});
  return 0;
}
