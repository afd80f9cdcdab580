#include "core/query_path.h"

#include <gtest/gtest.h>

namespace ckptfs::core {
namespace {

Result<Query> Parse(const std::string& path) {
  Result<std::vector<std::string>> segs = SplitPath(path);
  if (!segs.ok()) return segs.status();
  return ParseQuery(*segs);
}

TEST(QueryPathTest, ValidPaths) {
  struct Case {
    const char* path;
    QueryNode node;
    size_t predicates;
    std::vector<std::string> rest;
  } cases[] = {
      {"/", QueryNode::kRoot, 0, {}},
      {"/latest", QueryNode::kSelected, 0, {}},
      {"/latest/mdl.ckpt", QueryNode::kSelected, 0, {"mdl.ckpt"}},
      {"/best", QueryNode::kBest, 0, {}},
      {"/best/min", QueryNode::kBestOrder, 0, {}},
      {"/best/min/loss", QueryNode::kSelected, 0, {}},
      {"/best/max/acc/sub/dir/f.pt", QueryNode::kSelected, 0, {"sub", "dir", "f.pt"}},
      {"/top", QueryNode::kTop, 0, {}},
      {"/top/3", QueryNode::kTopK, 0, {}},
      {"/top/3/max", QueryNode::kTopOrder, 0, {}},
      {"/top/3/max/acc", QueryNode::kTopKey, 0, {}},
      {"/top/3/max/acc/3/x", QueryNode::kSelected, 0, {"x"}},
      {"/avg", QueryNode::kAvg, 0, {}},
      {"/avg/last3", QueryNode::kAverage, 0, {}},
      {"/avg/last3/model.ckpt", QueryNode::kAverage, 0, {"model.ckpt"}},
      {"/avg/best5", QueryNode::kAvgBest, 0, {}},
      {"/avg/best5/min", QueryNode::kAvgBestOrder, 0, {}},
      {"/avg/best5/min/loss/m.pt", QueryNode::kAverage, 0, {"m.pt"}},
      {"/where", QueryNode::kWhere, 0, {}},
      {"/where/a=1", QueryNode::kRoot, 1, {}},
      {"/where/a=1/where", QueryNode::kWhere, 1, {}},
      {"/where/a=1/where/b<2/best/min/loss", QueryNode::kSelected, 2, {}},
      {"/where/validation-type=full/best/min/loss/mdl.ckpt", QueryNode::kSelected, 1, {"mdl.ckpt"}},
      {"/new/CKPT+x", QueryNode::kNew, 0, {"CKPT+x"}},
      {"/index.json", QueryNode::kIndexJson, 0, {}},
      {"/safetensors", QueryNode::kSafetensors, 0, {}},
      {"/safetensors/best/min/loss/mdl.safetensors", QueryNode::kSafetensors, 0,
       {"best", "min", "loss", "mdl.safetensors"}},
      {"/where/a=1/safetensors/latest", QueryNode::kSafetensors, 1, {"latest"}},
      {"//best//min/./loss/", QueryNode::kSelected, 0, {}},
  };
  for (const Case& c : cases) {
    Result<Query> q = Parse(c.path);
    ASSERT_TRUE(q.ok()) << c.path << ": " << q.status().message();
    EXPECT_EQ(q->node, c.node) << c.path;
    EXPECT_EQ(q->where.size(), c.predicates) << c.path;
    EXPECT_EQ(q->rest, c.rest) << c.path;
  }
}

TEST(QueryPathTest, Fields) {
  Result<Query> q = Parse("/top/10/max/val_acc/4");
  ASSERT_TRUE(q.ok());
  EXPECT_EQ(q->k, 10);
  EXPECT_EQ(q->rank, 4);
  EXPECT_EQ(q->order, Order::kMax);
  EXPECT_EQ(q->key, "val_acc");
  EXPECT_EQ(q->selector, Selector::kTop);
  q = Parse("/avg/best3/min/loss");
  ASSERT_TRUE(q.ok());
  EXPECT_EQ(q->n, 3);
  EXPECT_TRUE(q->ranked);
  q = Parse("/avg/last2");
  ASSERT_TRUE(q.ok());
  EXPECT_FALSE(q->ranked);
}

TEST(QueryPathTest, Predicates) {
  struct Case {
    const char* text;
    const char* key;
    CompareOp op;
    MetaType type;
  } cases[] = {
      {"a=1", "a", CompareOp::kEq, MetaType::kNumber},
      {"a!=x", "a", CompareOp::kNe, MetaType::kString},
      {"loss<0.5", "loss", CompareOp::kLt, MetaType::kNumber},
      {"loss<=0.5", "loss", CompareOp::kLe, MetaType::kNumber},
      {"epoch>3", "epoch", CompareOp::kGt, MetaType::kNumber},
      {"epoch>=3", "epoch", CompareOp::kGe, MetaType::kNumber},
      {"end-of-epoch=true", "end-of-epoch", CompareOp::kEq, MetaType::kBool},
      {"a==b", "a", CompareOp::kEq, MetaType::kString},  // value "=b"
  };
  for (const Case& c : cases) {
    Result<Predicate> p = ParsePredicate(c.text);
    ASSERT_TRUE(p.ok()) << c.text;
    EXPECT_EQ(p->key, c.key) << c.text;
    EXPECT_EQ(p->op, c.op) << c.text;
    EXPECT_EQ(p->value.type, c.type) << c.text;
  }
}

TEST(QueryPathTest, HostileAndMalformedPathsAreErrorValues) {
  std::string long_name(300, 'a');
  std::string junk = "\x01\x7f\xff\xfe<>=!";
  const char* invalid[] = {
      "/../etc/passwd", "/best/../..", "/best/mid/loss", "/top/0/min/loss", "/top/-1/min/loss",
      "/top/abc", "/top/3/min/loss/4", "/top/3/min/loss/0", "/top/007/min/loss", "/avg/last0",
      "/avg/lastx", "/avg/first3", "/avg/best3/up", "/where/=1", "/where/a=", "/where/a",
      "/where/a<", "/where/>=", "/where/x<true", "/top/9999999/min/loss", "/avg/last1000001",
  };
  for (const char* p : invalid) {
    Result<Query> q = Parse(p);
    EXPECT_FALSE(q.ok()) << p;
    if (!q.ok()) {
      EXPECT_EQ(q.status().code(), StatusCode::kInvalidArgument) << p;
    }
  }
  EXPECT_FALSE(Parse("/" + long_name).ok());
  EXPECT_FALSE(Parse(std::string("/best/min/a\0b", 13)).ok());
  EXPECT_EQ(Parse("/nothing").status().code(), StatusCode::kNotFound);
  EXPECT_EQ(Parse("/index.json/x").status().code(), StatusCode::kNotFound);
  // Junk that is not a query name or predicate is an error, never a crash.
  EXPECT_FALSE(Parse("/" + junk).ok());
  Result<Query> q = Parse("/where/" + junk);
  EXPECT_TRUE(q.ok() || q.status().code() == StatusCode::kInvalidArgument);
  // Every prefix of every byte string parses without crashing.
  std::string all;
  for (int c = 1; c < 256; ++c) all += static_cast<char>(c);
  for (size_t i = 0; i < all.size(); ++i) (void)Parse("/where/" + all.substr(i, 20) + "/best");
}

}  // namespace
}  // namespace ckptfs::core
