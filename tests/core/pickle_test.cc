#include "core/pickle.h"

#include <gtest/gtest.h>

#include <fstream>
#include <random>
#include <sstream>

namespace ckptfs::core::pickle {
namespace {

std::string Fixture(const std::string& name) {
  std::ifstream in(std::string(CKPTFS_TENSOR_FIXTURES) + "/" + name, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

const Object* Get(const Object* dict, const std::string& key) {
  for (const auto& [k, v] : dict->entries) {
    if (k->kind == Kind::kString && k->text == key) return v;
  }
  return nullptr;
}

// pickle.dumps({"a": [1, 2.5, "x"], "b": (True, None), "c": -70000, "d": 2**40, "e": b"by"})
const std::string kDictP2(
    "\x80\x02\x7d\x71\x00\x28\x58\x01\x00\x00\x00\x61\x71\x01\x5d\x71\x02\x28\x4b\x01\x47\x40\x04\x00"
    "\x00\x00\x00\x00\x00\x58\x01\x00\x00\x00\x78\x71\x03\x65\x58\x01\x00\x00\x00\x62\x71\x04\x88\x4e"
    "\x86\x71\x05\x58\x01\x00\x00\x00\x63\x71\x06\x4a\x90\xee\xfe\xff\x58\x01\x00\x00\x00\x64\x71\x07"
    "\x8a\x06\x00\x00\x00\x00\x00\x01\x58\x01\x00\x00\x00\x65\x71\x08\x63\x5f\x63\x6f\x64\x65\x63\x73"
    "\x0a\x65\x6e\x63\x6f\x64\x65\x0a\x71\x09\x58\x02\x00\x00\x00\x62\x79\x71\x0a\x58\x06\x00\x00\x00"
    "\x6c\x61\x74\x69\x6e\x31\x71\x0b\x86\x71\x0c\x52\x71\x0d\x75\x2e",
    136);
const std::string kDictP4(
    "\x80\x04\x95\x42\x00\x00\x00\x00\x00\x00\x00\x7d\x94\x28\x8c\x01\x61\x94\x5d\x94\x28\x4b\x01\x47"
    "\x40\x04\x00\x00\x00\x00\x00\x00\x8c\x01\x78\x94\x65\x8c\x01\x62\x94\x88\x4e\x86\x94\x8c\x01\x63"
    "\x94\x4a\x90\xee\xfe\xff\x8c\x01\x64\x94\x8a\x06\x00\x00\x00\x00\x00\x01\x8c\x01\x65\x94\x43\x02"
    "\x62\x79\x94\x75\x2e",
    77);
// {"s": {1, 2}, "f": frozenset([3]), "big": 2**100}, protocol 4
const std::string kSetP4(
    "\x80\x04\x95\x2f\x00\x00\x00\x00\x00\x00\x00\x7d\x94\x28\x8c\x01\x73\x94\x8f\x94\x28\x4b\x01\x4b"
    "\x02\x90\x8c\x01\x66\x94\x28\x4b\x03\x91\x94\x8c\x03\x62\x69\x67\x94\x8a\x0d\x00\x00\x00\x00\x00"
    "\x00\x00\x00\x00\x00\x00\x00\x10\x75\x2e",
    58);

TEST(PickleTest, PlainValuesInBothProtocols) {
  for (const std::string* data : {&kDictP2, &kDictP4}) {
    Result<Unpickled> root = Unpickle(*data, "t");
    ASSERT_TRUE(root.ok()) << root.status().message();
    ASSERT_EQ(root->root->kind, Kind::kDict);
    const Object* a = Get(root->root, "a");
    ASSERT_EQ(a->kind, Kind::kList);
    ASSERT_EQ(a->items.size(), 3u);
    EXPECT_EQ(a->items[0]->integer, 1);
    EXPECT_EQ(a->items[1]->real, 2.5);
    EXPECT_EQ(a->items[2]->text, "x");
    const Object* b = Get(root->root, "b");
    EXPECT_EQ(b->kind, Kind::kTuple);
    EXPECT_TRUE(b->items[0]->boolean);
    EXPECT_EQ(b->items[1]->kind, Kind::kNone);
    EXPECT_EQ(Get(root->root, "c")->integer, -70000);
    EXPECT_EQ(Get(root->root, "d")->integer, int64_t{1} << 40);
  }
  Result<Unpickled> sets = Unpickle(kSetP4, "t");
  ASSERT_TRUE(sets.ok()) << sets.status().message();
  EXPECT_EQ(Get(sets->root, "s")->items.size(), 2u);
  EXPECT_TRUE(Get(sets->root, "big")->big_integer);
}

TEST(PickleTest, StateDictTensorsAndStorages) {
  for (const char* name : {"state_dict_p2.pt.data.pkl", "state_dict_p4.pt.data.pkl"}) {
    Result<Unpickled> root = Unpickle(Fixture(name), name);
    ASSERT_TRUE(root.ok()) << root.status().message();
    EXPECT_EQ(root->root->kind, Kind::kDict);  // OrderedDict, with _metadata as BUILD state
    ASSERT_TRUE(root->root->state);
    Result<std::vector<TensorEntry>> tensors = FindTensors(root->root, name);
    ASSERT_TRUE(tensors.ok());
    std::vector<std::string> paths;
    for (const auto& t : *tensors) paths.push_back(t.path);
    EXPECT_EQ(paths, (std::vector<std::string>{"emb.weight", "lin.weight", "lin.bias", "bn.weight",
                                               "bn.bias", "bn.running_mean", "bn.running_var",
                                               "bn.num_batches_tracked", "out.weight"}));
    const Object& lin = *(*tensors)[1].tensor;
    EXPECT_EQ(lin.size, (std::vector<int64_t>{3, 4}));
    EXPECT_EQ(lin.stride, (std::vector<int64_t>{4, 1}));
    EXPECT_EQ(lin.storage->storage_type, "FloatStorage");
    EXPECT_EQ(lin.storage->storage_numel, 12);
    EXPECT_EQ((*tensors)[7].tensor->storage->storage_type, "LongStorage");
  }
}

TEST(PickleTest, SharedStoragesAndNestedCheckpoints) {
  Result<Unpickled> root = Unpickle(Fixture("tied.pt.data.pkl"), "tied");
  ASSERT_TRUE(root.ok()) << root.status().message();
  auto tensors = FindTensors(root->root, "tied");
  ASSERT_TRUE(tensors.ok());
  // enc.weight, dec.weight, row and wt share one storage object.
  EXPECT_EQ((*tensors)[0].tensor->storage, (*tensors)[1].tensor->storage);
  EXPECT_EQ((*tensors)[0].tensor->storage, (*tensors)[3].tensor->storage);
  EXPECT_EQ((*tensors)[2].tensor->offset, 6);
  EXPECT_EQ((*tensors)[3].tensor->stride, (std::vector<int64_t>{1, 6}));

  root = Unpickle(Fixture("lightning.ckpt.data.pkl"), "pl");
  ASSERT_TRUE(root.ok()) << root.status().message();
  tensors = FindTensors(root->root, "pl");
  ASSERT_TRUE(tensors.ok());
  bool saw_optimizer = false, saw_callback = false;
  for (const auto& t : *tensors) {
    saw_optimizer = saw_optimizer || t.path.rfind("optimizer_states.0.state.0.exp_avg", 0) == 0;
    saw_callback = saw_callback || t.path == "callbacks.ModelCheckpoint.best_model_score";
  }
  EXPECT_TRUE(saw_optimizer);
  EXPECT_TRUE(saw_callback);
}

TEST(PickleTest, CodeIsRecordedNeverRun) {
  Result<Unpickled> root = Unpickle(Fixture("evil.pt.data.pkl"), "evil");
  ASSERT_TRUE(root.ok()) << root.status().message();
  const Object* x = Get(root->root, "x");
  ASSERT_NE(x, nullptr);
  EXPECT_EQ(x->kind, Kind::kCall);
  EXPECT_EQ(x->items[0]->text, "posix.system");
}

TEST(PickleTest, MalformedInputIsAnErrorNeverACrash) {
  const std::string samples[] = {kDictP2, kDictP4, kSetP4, Fixture("state_dict_p2.pt.data.pkl"),
                                 Fixture("lightning.ckpt.data.pkl")};
  for (const std::string& s : samples) {
    for (size_t cut = 0; cut < s.size(); ++cut) {
      EXPECT_FALSE(Unpickle(s.substr(0, cut), "cut").ok()) << cut;
    }
  }
  struct Case {
    std::string data;
    const char* why;
  } cases[] = {
      {std::string("\x80\x02h\x05.", 5), "memo key"},
      {std::string("\x80\x02X\xff\xff\xff\x7f", 8), "truncated"},
      {std::string("\x80\x02\xff.", 4), "unknown opcode"},
      {std::string("\x80\x09.", 3), "protocol"},
      {std::string("\x80\x02" "t.", 4), "MARK"},
      {std::string("\x80\x02" "a.", 4), "pop"},
      {std::string("\x80\x02" "NN.", 5), "STOP"},
      {std::string("(I1\n.", 5), "protocol 0"},
      {std::string("\x80\x02}K\x01" "a.", 7), "APPEND"},
  };
  for (const Case& c : cases) {
    Result<Unpickled> r = Unpickle(c.data, "case");
    ASSERT_FALSE(r.ok()) << c.why;
    EXPECT_NE(r.status().message().find("case"), std::string::npos);
  }
  // Deep nesting is walked without recursion, and bounded.
  std::string deep = "\x80\x02";
  for (int i = 0; i < 20000; ++i) deep += "]";
  for (int i = 0; i < 19999; ++i) deep += "a";
  deep += ".";
  Result<Unpickled> r = Unpickle(deep, "deep");
  ASSERT_TRUE(r.ok()) << r.status().message();
  EXPECT_FALSE(FindTensors(r->root, "deep").ok());
  // Random bytes: any answer but a crash.
  std::mt19937 rng(7);
  for (int i = 0; i < 20000; ++i) {
    std::string junk = "\x80\x02";
    const int n = static_cast<int>(rng() % 40);
    for (int j = 0; j < n; ++j) junk += static_cast<char>(rng() % 256);
    (void)Unpickle(junk, "junk");
  }
}

}  // namespace
}  // namespace ckptfs::core::pickle
