#include "core/pickle_audit.h"

#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <sstream>

#include "test_util.h"

namespace ckptfs::core {
namespace {

using testing::TempDir;

const std::string kCases = std::string(CKPTFS_CONVERT_FIXTURES) + "/torch_cases.py";

int Cases(const std::string& args, const std::string& log) {
  const std::string cmd = "/usr/bin/python3 '" + kCases + "' " + args + " > '" + log + "' 2>&1";
  const int rc = std::system(cmd.c_str());
  return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
}

class PickleAuditTest : public ::testing::Test {
 protected:
  std::string Make(const std::string& name) {
    const std::string path = dir_.path() + "/" + name + ".pt";
    const std::string log = dir_.path() + "/make.log";
    if (Cases("make " + name + " '" + path + "'", log) != 0) {
      ADD_FAILURE() << testing::ReadFile(log);
    }
    return path;
  }
  const AuditGlobal* Global(const CheckpointAudit& a, const std::string& name) {
    for (const AuditGlobal& g : a.globals) {
      if (g.name == name) return &g;
    }
    return nullptr;
  }
  TempDir dir_;
};

// A Lightning-style checkpoint references only allowed globals... except
// argparse.Namespace, which torch.load(weights_only=True) refuses too.
TEST_F(PickleAuditTest, ListsTensorsValuesAndGlobals) {
  Result<CheckpointAudit> a = InspectFile(Make("lightning"));
  ASSERT_TRUE(a.ok()) << a.status().message();
  EXPECT_EQ(a->format, TensorFormat::kTorchZip);
  ASSERT_EQ(a->tensors.size(), 4u);
  EXPECT_EQ(a->tensors[0].name, "optimizer_states.0.state.0.exp_avg");
  EXPECT_EQ(a->tensors[0].dtype, "F32");
  EXPECT_EQ(a->tensors[0].shape, (std::vector<int64_t>{3, 4}));
  EXPECT_EQ(a->tensors[0].bytes, 48);
  bool namespace_seen = false, epoch_seen = false;
  for (const AuditValue& v : a->values) {
    if (v.name == "hyper_parameters") {
      namespace_seen = true;
      EXPECT_TRUE(v.opaque);
      EXPECT_EQ(v.json, "argparse.Namespace");
    }
    if (v.name == "epoch") {
      epoch_seen = true;
      EXPECT_EQ(v.json, "3");
      EXPECT_FALSE(v.opaque);
    }
  }
  EXPECT_TRUE(namespace_seen && epoch_seen);
  ASSERT_NE(Global(*a, "torch._utils._rebuild_tensor_v2"), nullptr);
  EXPECT_TRUE(Global(*a, "torch._utils._rebuild_tensor_v2")->allowed);
  EXPECT_TRUE(Global(*a, "collections.OrderedDict")->allowed);
  EXPECT_TRUE(Global(*a, "torch.FloatStorage")->allowed);
  ASSERT_NE(Global(*a, "argparse.Namespace"), nullptr);
  EXPECT_FALSE(Global(*a, "argparse.Namespace")->allowed);
  EXPECT_FALSE(a->Safe());
  EXPECT_EQ(GlobalsVerdict(*a), "unsafe: argparse.Namespace");
}

TEST_F(PickleAuditTest, CleanStateDictIsSafe) {
  for (const char* name : {"plain", "dtypes", "views"}) {
    Result<CheckpointAudit> a = InspectFile(Make(name));
    ASSERT_TRUE(a.ok()) << a.status().message();
    EXPECT_TRUE(a->Safe()) << name << ": " << GlobalsVerdict(*a);
    EXPECT_EQ(GlobalsVerdict(*a), "safe");
    EXPECT_FALSE(a->globals.empty());
  }
}

// Nothing runs: the markers the REDUCEs would create never appear.
TEST_F(PickleAuditTest, NamesUnsafeReducesWithoutRunningThem) {
  const std::string marker = dir_.path() + "/PWNED_";
  ::setenv("CKPTFS_PWNED", marker.c_str(), 1);
  Result<CheckpointAudit> a = InspectFile(Make("unsafe"));
  ASSERT_TRUE(a.ok()) << a.status().message();
  EXPECT_FALSE(a->Safe());
  // As the pickle spells them (protocol 2: Python 2's module names).
  for (const char* g : {"posix.system", "__builtin__.eval", "commands.Popen"}) {
    ASSERT_NE(Global(*a, g), nullptr) << g;
    EXPECT_FALSE(Global(*a, g)->allowed) << g;
    EXPECT_EQ(Global(*a, g)->uses, 1) << g;
  }
  EXPECT_EQ(GlobalsVerdict(*a), "unsafe: posix.system, __builtin__.eval, commands.Popen");
  for (const char* m : {"system", "eval", "popen"}) {
    EXPECT_NE(::access((marker + m).c_str(), F_OK), 0) << "executed: " << m;
  }
}

// A global named after 20,000 objects of the pickle is still found, and
// counted (every object the reader made is looked at).
TEST_F(PickleAuditTest, FindsGlobalsDeepInALongPickle) {
  ::setenv("CKPTFS_PWNED", (dir_.path() + "/PWNED_").c_str(), 1);
  Result<CheckpointAudit> a = InspectFile(Make("many"));
  ASSERT_TRUE(a.ok()) << a.status().message();
  ASSERT_NE(Global(*a, "posix.system"), nullptr);
  EXPECT_EQ(GlobalsVerdict(*a), "unsafe: posix.system");
}

// The table follows torch's own list: every name the installed torch allows
// is allowed, and what later torch versions or attackers add is not.
TEST_F(PickleAuditTest, AllowListIsTorchs) {
  const std::string log = dir_.path() + "/allow.txt";
  ASSERT_EQ(Cases("allowlist", log), 0) << testing::ReadFile(log);
  std::istringstream names(testing::ReadFile(log));
  int count = 0;
  for (std::string name; std::getline(names, name);) {
    if (name.empty()) continue;
    ++count;
    EXPECT_TRUE(WeightsOnlyAllowed(name)) << name;
  }
  EXPECT_GT(count, 50);
  for (const char* name :
       {"builtins.eval", "posix.system", "os.system", "subprocess.Popen",
        "torch._utils._rebuild_tensor_v3", "torch.load", "builtins.getattr", "__builtin__.eval",
        "commands.Popen", "argparse.Namespace", "torch.bfloat16", ""}) {
    EXPECT_FALSE(WeightsOnlyAllowed(name)) << name;
  }
}

TEST_F(PickleAuditTest, SafetensorsFilesHaveNoGlobals) {
  const std::string json =
      "{\"__metadata__\":{\"format\":\"pt\"},\"w\":{\"dtype\":\"BF16\",\"shape\":[2,2],"
      "\"data_offsets\":[0,8]}}";
  std::string bytes(8, '\0');
  for (int i = 0; i < 8; ++i) bytes[i] = static_cast<char>(json.size() >> (8 * i));
  bytes += json + std::string(8, '\0');
  const std::string path = dir_.path() + "/m.safetensors";
  testing::WriteFile(path, bytes);
  Result<CheckpointAudit> a = InspectFile(path);
  ASSERT_TRUE(a.ok()) << a.status().message();
  EXPECT_EQ(a->format, TensorFormat::kSafetensors);
  ASSERT_EQ(a->tensors.size(), 1u);
  EXPECT_EQ(a->tensors[0].dtype, "BF16");
  EXPECT_EQ(a->tensors[0].bytes, 8);
  ASSERT_EQ(a->values.size(), 1u);
  EXPECT_EQ(a->values[0].json, "\"pt\"");
  EXPECT_TRUE(a->globals.empty());
  EXPECT_EQ(GlobalsVerdict(*a), "safe");
}

TEST_F(PickleAuditTest, BrokenFilesAreErrorsNamingTheFile) {
  const std::string good = testing::ReadFile(Make("plain"));
  const std::string bad_sizes[] = {good.substr(0, good.size() / 2), good.substr(0, 30),
                                   "PK\x03\x04", std::string("\x10\0\0\0\0\0\0\0{", 9), ""};
  int i = 0;
  for (const std::string& bytes : bad_sizes) {
    const std::string path = dir_.path() + "/bad" + std::to_string(i++) + ".pt";
    testing::WriteFile(path, bytes);
    Result<CheckpointAudit> a = InspectFile(path);
    ASSERT_FALSE(a.ok()) << path;
    EXPECT_NE(a.status().message().find(path), std::string::npos) << a.status().message();
  }
}

}  // namespace
}  // namespace ckptfs::core
