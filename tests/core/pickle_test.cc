#include "core/pickle.h"

#include <gtest/gtest.h>

#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>
#include <set>
#include <sstream>

#include "test_util.h"

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
    "\x80\x02\x7d\x71\x00\x28\x58\x01\x00\x00\x00\x61\x71\x01\x5d\x71\x02\x28\x4b\x01\x47\x40\x04"
    "\x00"
    "\x00\x00\x00\x00\x00\x58\x01\x00\x00\x00\x78\x71\x03\x65\x58\x01\x00\x00\x00\x62\x71\x04\x88"
    "\x4e"
    "\x86\x71\x05\x58\x01\x00\x00\x00\x63\x71\x06\x4a\x90\xee\xfe\xff\x58\x01\x00\x00\x00\x64\x71"
    "\x07"
    "\x8a\x06\x00\x00\x00\x00\x00\x01\x58\x01\x00\x00\x00\x65\x71\x08\x63\x5f\x63\x6f\x64\x65\x63"
    "\x73"
    "\x0a\x65\x6e\x63\x6f\x64\x65\x0a\x71\x09\x58\x02\x00\x00\x00\x62\x79\x71\x0a\x58\x06\x00\x00"
    "\x00"
    "\x6c\x61\x74\x69\x6e\x31\x71\x0b\x86\x71\x0c\x52\x71\x0d\x75\x2e",
    136);
const std::string kDictP4(
    "\x80\x04\x95\x42\x00\x00\x00\x00\x00\x00\x00\x7d\x94\x28\x8c\x01\x61\x94\x5d\x94\x28\x4b\x01"
    "\x47"
    "\x40\x04\x00\x00\x00\x00\x00\x00\x8c\x01\x78\x94\x65\x8c\x01\x62\x94\x88\x4e\x86\x94\x8c\x01"
    "\x63"
    "\x94\x4a\x90\xee\xfe\xff\x8c\x01\x64\x94\x8a\x06\x00\x00\x00\x00\x00\x01\x8c\x01\x65\x94\x43"
    "\x02"
    "\x62\x79\x94\x75\x2e",
    77);
// {"s": {1, 2}, "f": frozenset([3]), "big": 2**100}, protocol 4
const std::string kSetP4(
    "\x80\x04\x95\x2f\x00\x00\x00\x00\x00\x00\x00\x7d\x94\x28\x8c\x01\x73\x94\x8f\x94\x28\x4b\x01"
    "\x4b"
    "\x02\x90\x8c\x01\x66\x94\x28\x4b\x03\x91\x94\x8c\x03\x62\x69\x67\x94\x8a\x0d\x00\x00\x00\x00"
    "\x00"
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
      {std::string("\x80\x02"
                   "t.",
                   4),
       "MARK"},
      {std::string("\x80\x02"
                   "a.",
                   4),
       "pop"},
      {std::string("\x80\x02"
                   "NN.",
                   5),
       "STOP"},
      {std::string("(I1\n.", 5), "protocol 0"},
      {std::string("\x80\x02}K\x01"
                   "a.",
                   7),
       "APPEND"},
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

// Builders for crafted attack inputs (protocol 2 opcodes).
const std::string kP2("\x80\x02", 2);
std::string Glob(const std::string& module, const std::string& name) {
  return "c" + module + "\n" + name + "\n";
}
std::string U32(uint32_t v) {
  std::string out(4, '\0');
  for (int i = 0; i < 4; ++i) out[i] = static_cast<char>(v >> (8 * i));
  return out;
}
std::string Str(const std::string& s) { return "X" + U32(static_cast<uint32_t>(s.size())) + s; }
std::string Long(int64_t v) {  // LONG1 with 8 bytes
  std::string out("\x8a\x08", 2);
  for (int i = 0; i < 8; ++i) out += static_cast<char>(static_cast<uint64_t>(v) >> (8 * i));
  return out;
}
std::string Float(double d) {  // BINFLOAT, big-endian
  uint64_t bits;
  std::memcpy(&bits, &d, 8);
  std::string out = "G";
  for (int i = 7; i >= 0; --i) out += static_cast<char>(bits >> (8 * i));
  return out;
}
// _rebuild_tensor_v2(storage(numel), offset, size, stride, False, OrderedDict()),
// left on the stack.
std::string Tensor(int64_t numel, int64_t offset, const std::vector<int64_t>& size,
                   const std::vector<int64_t>& stride) {
  std::string out = Glob("torch._utils", "_rebuild_tensor_v2") + "((" + Str("storage") +
                    Glob("torch", "FloatStorage") + Str("0") + Str("cpu") + Long(numel) + "tQ" +
                    Long(offset) + "(";
  for (int64_t d : size) out += Long(d);
  out += "t(";
  for (int64_t d : stride) out += Long(d);
  return out + "t\x89" + Glob("collections", "OrderedDict") + ")Rt" + "R";
}
// A one-element tensor memoized at 1 and popped.
std::string TensorAtMemo1() { return Tensor(1, 0, {1}, {1}) + "q\x01" + "0"; }

// _rebuild_from_type_v2 wrapping itself `depth` times: REDUCE once the
// reader recursed, and a 400 KB file at 100k deep overflowed the stack.
std::string DeepRebuildFromType(int depth) {
  std::string out = kP2 + Glob("torch._tensor", "_rebuild_from_type_v2") + std::string("q\x00", 2);
  for (int i = 0; i < depth; ++i) out += std::string("h\x00N", 3);
  out += ")" + std::string(depth, '\x87') + "R.";
  return out;
}
// `n` float keys all naming the same tensor: every path reads "?".
std::string FloatKeys(int n) {
  std::string out = kP2 + TensorAtMemo1() + "}(";
  for (int i = 0; i < n; ++i) {
    out += Float(i) + "h\x01";
    if (i % 1000 == 999) out += "u(";
  }
  return out + "u.";
}
// Dicts nested `depth` deep under key `key`, the innermost holding `n`
// float keys that name the same tensor: long paths, all alike.
std::string NestedDicts(int depth, int n, const std::string& key = "k") {
  std::string out = kP2 + TensorAtMemo1() + Str(key) + "q\x02" + "0";
  for (int i = 0; i < depth; ++i) out += "}h\x02";
  out += "}(";
  for (int i = 0; i < n; ++i) out += Float(i) + "h\x01";
  return out + "u" + std::string(depth, 's') + ".";
}
std::string Repeat(const std::string& unit, size_t times) {
  std::string out = kP2;
  out.reserve(out.size() + unit.size() * times + 2);
  for (size_t i = 0; i < times; ++i) out += unit;
  return out + "N.";
}

void ExpectBudget(const Result<Unpickled>& r, const char* budget) {
  ASSERT_FALSE(r.ok()) << budget;
  EXPECT_EQ(r.status().code(), StatusCode::kCorrupt);
  EXPECT_NE(r.status().message().find(budget), std::string::npos) << r.status().message();
}

TEST(PickleBudgetTest, DeepRebuildFromTypeIsAnErrorNotARecursion) {
  Result<Unpickled> r = Unpickle(DeepRebuildFromType(100000), "deep");
  ExpectBudget(r, "kMaxDepth");
  EXPECT_NE(r.status().message().find("deep: pickle offset"), std::string::npos);
  // The wrapper torch writes for a tensor subclass still yields the tensor.
  std::string one =
      kP2 + Glob("torch._tensor", "_rebuild_from_type_v2") + "(" +
      Glob("torch._utils", "_rebuild_tensor_v2") + Glob("torch.nn", "Parameter") +
      Tensor(4, 0, {2, 2}, {2, 1}).substr(Glob("torch._utils", "_rebuild_tensor_v2").size());
  one.pop_back();  // the inner REDUCE: its argument tuple becomes the wrapper's args
  one += "}tR.";
  r = Unpickle(one, "one");
  ASSERT_TRUE(r.ok()) << r.status().message();
  ASSERT_EQ(r->root->kind, Kind::kTensor);
  EXPECT_EQ(r->root->size, (std::vector<int64_t>{2, 2}));
}

TEST(PickleBudgetTest, FloodsOfSharedValuesCreateNoObjects) {
  // 8 MB of NONE/POP once took 1.4 GB; None, bools and small ints are shared.
  for (const std::string unit : {"N0",
                                 "\x88"
                                 "0",
                                 "K\x07"
                                 "0"}) {
    Result<Unpickled> r = Unpickle(Repeat(unit, (size_t{8} << 20) / unit.size()), "flood");
    ASSERT_TRUE(r.ok()) << r.status().message();
    EXPECT_LT(r->objects, 1000u);
  }
  // Globals are interned: STACK_GLOBAL of memoized strings, over and over.
  std::string globals = kP2 + Str("torch") + "q\x01" + Str("FloatStorage") + "q\x02" + "00";
  for (int i = 0; i < 100000; ++i)
    globals +=
        "h\x01h\x02\x93"
        "0";
  Result<Unpickled> r = Unpickle(globals + "N.", "globals");
  ASSERT_TRUE(r.ok()) << r.status().message();
  EXPECT_LT(r->objects, 1000u);
  ExpectBudget(Unpickle(kP2 + Glob("m", std::string(kMaxGlobalNameBytes, 'x')) + ".", "long"),
               "kMaxGlobalNameBytes");
}

TEST(PickleBudgetTest, ObjectsMemoAndStackAreBounded) {
  ExpectBudget(Unpickle(Repeat("]0", kMaxObjects + 10), "lists"), "kMaxObjects");
  std::string memo = kP2 + "]";
  for (uint32_t i = 0; i <= kMaxMemo; ++i) memo += "r" + U32(i);
  ExpectBudget(Unpickle(memo + ".", "memo"), "kMaxMemo");
  ExpectBudget(Unpickle(kP2 + std::string(kMaxStack + 1, '(') + ".", "marks"), "kMaxStack");
  ExpectBudget(Unpickle(Repeat("N", kMaxStack + 1), "stack"), "kMaxStack");
  // Re-memoizing one index costs no budget.
  std::string again = kP2 + "]";
  for (size_t i = 0; i <= kMaxMemo; ++i) again += "q\x05";
  EXPECT_TRUE(Unpickle(again + ".", "again").ok());
}

TEST(PickleBudgetTest, RepeatedPathsAreNamedUniquelyInLinearTime) {
  // 1.3 MB of float keys once spent minutes renaming "?" quadratically.
  const int n = 118000;
  Result<Unpickled> r = Unpickle(FloatKeys(n), "floats");
  ASSERT_TRUE(r.ok()) << r.status().message();
  Result<std::vector<TensorEntry>> t = FindTensors(r->root, "floats");
  ASSERT_TRUE(t.ok()) << t.status().message();
  ASSERT_EQ(t->size(), static_cast<size_t>(n));
  EXPECT_EQ((*t)[0].path, "?");
  EXPECT_EQ((*t)[1].path, "?#2");
  EXPECT_EQ((*t)[n - 1].path, "?#" + std::to_string(n));
  std::set<std::string> unique;
  for (const TensorEntry& e : *t) unique.insert(e.path);
  EXPECT_EQ(unique.size(), t->size());
  // A name already taken by a real key is skipped.
  std::string taken = kP2 + TensorAtMemo1() + "}(" + Str("?#2") + "h\x01" + Float(1) + "h\x01" +
                      Float(2) + "h\x01" + Float(3) + "h\x01u.";
  r = Unpickle(taken, "taken");
  ASSERT_TRUE(r.ok()) << r.status().message();
  t = FindTensors(r->root, "taken");
  ASSERT_TRUE(t.ok());
  std::vector<std::string> paths;
  for (const TensorEntry& e : *t) paths.push_back(e.path);
  EXPECT_EQ(paths, (std::vector<std::string>{"?#2", "?", "?#3", "?#4"}));
}

TEST(PickleBudgetTest, DeepPathsAreBoundedInLengthAndTotal) {
  // 52 KB of nested dicts: 1,500 tensors 9,000 keys deep, all named alike.
  Result<Unpickled> r = Unpickle(NestedDicts(9000, 1500), "nested");
  ASSERT_TRUE(r.ok()) << r.status().message();
  Result<std::vector<TensorEntry>> t = FindTensors(r->root, "nested");
  ASSERT_TRUE(t.ok()) << t.status().message();
  ASSERT_EQ(t->size(), 1500u);
  EXPECT_EQ((*t)[0].path.size(), 9000u * 2 + 1);
  EXPECT_EQ((*t)[1499].path.substr((*t)[1499].path.size() - 7), ".?#1500");
  // Longer keys: one path past kMaxPathBytes.
  r = Unpickle(NestedDicts(1000, 1, std::string(100, 'k')), "long");
  ASSERT_TRUE(r.ok()) << r.status().message();
  t = FindTensors(r->root, "long");
  ASSERT_FALSE(t.ok());
  EXPECT_NE(t.status().message().find("kMaxPathBytes"), std::string::npos) << t.status().message();
  // A tensor past kMaxPathBytes is refused, but a long path without tensors is fine.
  r = Unpickle(NestedDicts(1000, 0, std::string(100, 'k')), "empty");
  ASSERT_TRUE(r.ok());
  EXPECT_TRUE(FindTensors(r->root, "empty").ok());
  // All paths together past kMaxTotalPathBytes.
  r = Unpickle(NestedDicts(8000, 2200), "total");
  ASSERT_TRUE(r.ok()) << r.status().message();
  t = FindTensors(r->root, "total");
  ASSERT_FALSE(t.ok());
  EXPECT_NE(t.status().message().find("kMaxTotalPathBytes"), std::string::npos)
      << t.status().message();
}

TEST(PickleBudgetTest, OpaqueObjectsKeepTheirItemsAndNeverRecurse) {
  // A call whose BUILD state is itself, then SETITEM on it: once endless recursion.
  Result<Unpickled> r = Unpickle(kP2 + Glob("x", "y") + ")R2bNNs.", "cycle");
  ASSERT_TRUE(r.ok()) << r.status().message();
  EXPECT_EQ(r->root->state, r->root);
  EXPECT_TRUE(FindTensors(r->root, "cycle").ok());
  // A dict subclass's items (SETITEMS before BUILD, as Python writes them)
  // survive its state; a list subclass's items likewise.
  r = Unpickle(kP2 + TensorAtMemo1() + Glob("m", "D") + ")R(" + Str("w") + "h\x01u(" + Str("v") +
                   "h\x01" + "db.",
               "sub");
  ASSERT_TRUE(r.ok()) << r.status().message();
  Result<std::vector<TensorEntry>> t = FindTensors(r->root, "sub");
  ASSERT_TRUE(t.ok());
  std::vector<std::string> paths;
  for (const TensorEntry& e : *t) paths.push_back(e.path);
  EXPECT_EQ(paths, (std::vector<std::string>{"w", "v"}));
  r = Unpickle(kP2 + TensorAtMemo1() + Glob("m", "L") +
                   ")R(h\x01h\x01"
                   "e.",
               "list");
  ASSERT_TRUE(r.ok()) << r.status().message();
  t = FindTensors(r->root, "list");
  ASSERT_TRUE(t.ok());
  ASSERT_EQ(t->size(), 2u);
  EXPECT_EQ((*t)[1].path, "1");
  // Shared scalars cannot be changed.
  for (const char* target : {"N", "\x88", "K\x01", "cm\nn\n"}) {
    r = Unpickle(kP2 + target + "}b.", "build");
    ASSERT_FALSE(r.ok()) << target;
    EXPECT_NE(r.status().message().find("BUILD on a"), std::string::npos) << r.status().message();
  }
}

TEST(PickleBudgetTest, SizeArithmeticIsCheckedForOverflow) {
  const int64_t big = int64_t{1} << 62;
  struct Case {
    int64_t numel, offset;
    std::vector<int64_t> size, stride;
    const char* why;
  } cases[] = {
      {16, 0, {big, 4}, {1, big}, "overflows"},      // (size-1)*stride
      {16, big, {3}, {big}, "overflows"},            // offset + extent
      {16, 0, {big, big}, {0, 0}, "overflows"},      // element count
      {16, INT64_MAX, {}, {}, "overflows"},          // extent + 1
      {big, 0, {1}, {1}, "storage size overflows"},  // numel * element size
      {16, 0, {2}, {-1}, "negative"},
      {16, 0, {-2}, {1}, "negative"},
      {16, -1, {1}, {1}, "negative"},
      {-1, 0, {1}, {1}, "negative storage size"},
  };
  for (const Case& c : cases) {
    Result<Unpickled> r =
        Unpickle(kP2 + Tensor(c.numel, c.offset, c.size, c.stride) + ".", "sizes");
    ASSERT_FALSE(r.ok()) << c.why;
    EXPECT_EQ(r.status().code(), StatusCode::kCorrupt);
    EXPECT_NE(r.status().message().find(c.why), std::string::npos) << r.status().message();
  }
  // The largest sizes that fit are accepted as they are.
  Result<Unpickled> r =
      Unpickle(kP2 + Tensor(INT64_MAX / 16, 0, {big / 2, 2}, {2, 1}) + ".", "fits");
  ASSERT_TRUE(r.ok()) << r.status().message();
  EXPECT_EQ(r->root->size, (std::vector<int64_t>{big / 2, 2}));
}

// Real torch.save output of a 2,000-tensor model, as a state_dict and as a
// Lightning-style checkpoint with Adam state and an argparse.Namespace,
// written by /usr/bin/python3 (Debian's torch) into a temporary directory.
TEST(PickleBudgetTest, LargeRealCheckpointsFitTheBudgetsWithRoomToSpare) {
  ckptfs::testing::TempDir dir;
  const std::string script = dir.path() + "/write.py";
  ckptfs::testing::WriteFile(script, R"(import argparse, io, sys, zipfile, torch
torch.manual_seed(0)
net = torch.nn.Sequential(*[torch.nn.Linear(2, 2) for _ in range(1000)])
opt = torch.optim.Adam(net.parameters())
for p in net.parameters(): p.grad = torch.ones_like(p)
opt.step()
ck = {"epoch": 1, "global_step": 10, "state_dict": net.state_dict(), "optimizer_states": [opt.state_dict()],
      "hyper_parameters": argparse.Namespace(lr=0.1, name="x")}
for name, obj in (("sd", net.state_dict()), ("pl", ck)):
    b = io.BytesIO(); torch.save(obj, b)
    z = zipfile.ZipFile(io.BytesIO(b.getvalue()))
    open(sys.argv[1] + "/" + name + ".pkl", "wb").write(z.read([n for n in z.namelist() if n.endswith("data.pkl")][0]))
)");
  ASSERT_EQ(std::system(("/usr/bin/python3 " + script + " " + dir.path()).c_str()), 0);
  for (const auto& [name, tensors] : {std::pair<std::string, size_t>{"sd", 2000}, {"pl", 8000}}) {
    Result<Unpickled> r =
        Unpickle(ckptfs::testing::ReadFile(dir.path() + "/" + name + ".pkl"), name);
    ASSERT_TRUE(r.ok()) << r.status().message();
    EXPECT_LT(r->objects, kMaxObjects / 10) << name;
    Result<std::vector<TensorEntry>> t = FindTensors(r->root, name);
    ASSERT_TRUE(t.ok()) << t.status().message();
    EXPECT_EQ(t->size(), tensors) << name;
  }
}

}  // namespace
}  // namespace ckptfs::core::pickle

namespace ckptfs::core::pickle {
namespace {

// Unpickled::globals names each global once, in the order first named,
// reachable or not; ForEachObject visits every object made.
TEST(PickleGlobalsTest, ListsEveryGlobalOnceInOrder) {
  const std::string data = std::string("\x80\x02", 2) + "cos\nsystem\n0" + "cbuiltins\neval\n0" +
                           "cos\nsystem\n0" + "N.";
  Result<Unpickled> r = Unpickle(data, "globals");
  ASSERT_TRUE(r.ok()) << r.status().message();
  ASSERT_EQ(r->globals.size(), 2u);
  EXPECT_EQ(r->globals[0]->text, "os.system");
  EXPECT_EQ(r->globals[1]->text, "builtins.eval");
  size_t seen = 0, globals = 0;
  ForEachObject(*r, [&](const Object& o) {
    ++seen;
    if (o.kind == Kind::kGlobal) ++globals;
  });
  EXPECT_EQ(seen, r->objects);
  EXPECT_EQ(globals, 2u);
}

}  // namespace
}  // namespace ckptfs::core::pickle
