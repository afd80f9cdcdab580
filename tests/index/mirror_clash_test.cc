// The clash rule of safetensors/ (README "Safe formats") on crafted names:
// a lookup of NAME.safetensors decides from the few entries that can
// compete for it (resolver.cc, MirrorEntries with only_for), and must give
// exactly what the full listing gives: every listed name resolves to one
// file, no file under two names, nothing unlisted resolves.
#include <gtest/gtest.h>

#include <map>
#include <set>

#include "index/resolver.h"
#include "test_util.h"

namespace ckptfs::index {
namespace {

using core::StatusCode;
using testing::WriteFile;

const std::string kZip = std::string("PK\x03\x04", 4);

TEST(MirrorClashTest, LookupsAgreeWithTheListingOnCraftedNames) {
  testing::TempDir dir;
  const std::string src = dir.path() + "/src", d = src + "/misc/d";
  // PyTorch files (by their bytes) whose converted names compete, and plain
  // entries that take those names first.
  for (const char* zip : {"a.pt", "a.ckpt", "a.bin", "a.ckpt.x", "b", "c.d.e", "c.d", "c.x", "e.pt",
                          "f.pt", ".pt", "g.safetensors", "h.pt.safetensors", "h.pt"}) {
    WriteFile(d + "/" + zip, kZip + zip);
  }
  for (const char* plain :
       {"b.safetensors", "e.pt.safetensors", "f.safetensors", "f.pt.safetensors", "notes.txt"}) {
    WriteFile(d + "/" + plain, "plain");
  }
  for (int i = 0; i < 50; ++i) WriteFile(d + "/z" + std::to_string(i) + ".pt", kZip);
  auto idx = Index::Open(src, dir.path() + "/index.sqlite");
  ASSERT_TRUE(idx.ok());
  ASSERT_TRUE((*idx)->Scan().ok());
  Resolver resolver(idx->get());

  const std::map<std::string, std::string> expected = {
      {"a.safetensors", "a.bin"},            // a.bin sorts first of a.*
      {"a.ckpt.safetensors", "a.ckpt"},      // a.ckpt's second choice
      {"a.pt.safetensors", "a.pt"},          // a.pt's second choice
      {"a.ckpt.x.safetensors", "a.ckpt.x"},  // its first choice taken by a.ckpt
      {"c.safetensors", "c.d"},              // c.d sorts before c.x
      {"c.d.safetensors", "c.d.e"},          // c.d took c.safetensors, not this
      {"c.x.safetensors", "c.x"},
      {"e.safetensors", "e.pt"},                 // e.pt.safetensors is a plain file
      {".pt.safetensors", ".pt"},                // a leading dot is no extension
      {"g.safetensors", "g.safetensors"},        // a PyTorch file named .safetensors
      {"h.pt.safetensors", "h.pt.safetensors"},  // stem h.pt, but h.pt sorts first
      {"h.safetensors", "h.pt"},
  };
  auto listed = resolver.Resolve("/safetensors/misc/d");
  ASSERT_TRUE(listed.ok()) << listed.status().message();
  auto entries = resolver.List(*listed);
  ASSERT_TRUE(entries.ok()) << entries.status().message();
  std::set<std::string> names;
  // d holds single-file checkpoints: its selectors (latest/, avg/, ...) too.
  for (const DirEntry& e : *entries) {
    if (!e.is_dir) names.insert(e.name);
  }
  std::map<std::string, std::string> sources;  // real file -> name
  for (const std::string& name : names) {
    auto r = resolver.Resolve("/safetensors/misc/d/" + name);
    ASSERT_TRUE(r.ok()) << name << ": " << r.status().message();
    if (r->type == NodeType::kIndexJson) continue;
    ASSERT_EQ(r->real_path.rfind(d + "/", 0), 0u) << name;
    const std::string file = r->real_path.substr(d.size() + 1);
    EXPECT_TRUE(sources.emplace(file, name).second)
        << file << " under both " << sources[file] << " and " << name;
    auto want = expected.find(name);
    if (want != expected.end()) {
      EXPECT_EQ(file, want->second) << name;
    }
  }
  for (const auto& [name, file] : expected) EXPECT_EQ(names.count(name), 1u) << name;
  // Plain files keep their names; b and f.pt lose both of theirs to them.
  for (const char* plain :
       {"b.safetensors", "e.pt.safetensors", "f.safetensors", "f.pt.safetensors", "notes.txt"}) {
    EXPECT_EQ(sources.count(plain), 1u) << plain;
    EXPECT_EQ(sources[plain], plain);
  }
  EXPECT_EQ(sources.count("b"), 0u);
  EXPECT_EQ(sources.count("f.pt"), 0u);
  EXPECT_EQ(sources.count("z7.pt"), 1u);
  // Nothing unlisted resolves under a converted name.
  for (const char* name : {"b.b.safetensors", "a.pt.pt.safetensors", "c.d.e.safetensors",
                           "f.pt.safetensors.safetensors", "d.safetensors", "z7.pt.safetensors",
                           ".safetensors", "..safetensors"}) {
    if (names.count(name) != 0) continue;
    EXPECT_EQ(resolver.Resolve(std::string("/safetensors/misc/d/") + name).status().code(),
              StatusCode::kNotFound)
        << name;
  }
}

}  // namespace
}  // namespace ckptfs::index
