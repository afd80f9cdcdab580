// The query-path grammar of the mount's virtual namespace (DESIGN.md §2).
//
//   latest/ | best/<min|max>/<key>/ | top/<k>/<min|max>/<key>/<rank>/
//   avg/last<N>/ | avg/best<N>/<min|max>/<key>/ | where/<key><op><value>/… |
//   new/ | index.json | safetensors/<any of the above but new/ and safetensors/>
//
// safetensors/ mirrors the namespace of the directory it is in (its real
// entries and virtual names); ParseQuery only marks where it starts (rest:
// the mirrored path), the resolver walks the mirror (index/resolver.h).
//
// ParseQuery turns the segments that start at a virtual name into a Query
// value describing where in the grammar the path ends: an inner directory
// (best/min/), a selected checkpoint plus the path inside it, an average, …
// It is pure (no disk, no index), never throws, and returns kInvalidArgument
// for a malformed path and kNotFound for an unknown name.
#ifndef CKPTFS_CORE_QUERY_PATH_H_
#define CKPTFS_CORE_QUERY_PATH_H_

#include <string>
#include <string_view>
#include <vector>

#include "core/meta.h"
#include "core/status.h"

namespace ckptfs::core {

enum class Order { kMin, kMax };
enum class CompareOp { kEq, kNe, kLt, kLe, kGt, kGe };

struct Predicate {
  std::string key;
  CompareOp op = CompareOp::kEq;
  MetaValue value;

  std::string ToString() const;
};

// Where a query path ends.
enum class QueryNode {
  kRoot,          // the virtual root, also after where/<pred>/
  kWhere,         // where/              expects a predicate
  kBest,          // best/               expects min|max
  kBestOrder,     // best/min/           expects a key
  kTop,           // top/                expects k
  kTopK,          // top/3/              expects min|max
  kTopOrder,      // top/3/min/          expects a key
  kTopKey,        // top/3/min/loss/     expects a rank
  kAvg,           // avg/                expects last<N> | best<N>
  kAvgBest,       // avg/best3/          expects min|max
  kAvgBestOrder,  // avg/best3/min/      expects a key
  kSelected,      // one checkpoint chosen; rest is the path inside it
  kAverage,       // avg/last3/ or avg/best3/min/loss/; rest is the file
  kNew,           // new/; rest is the path inside
  kIndexJson,     // index.json
  kSafetensors,   // safetensors/; rest is the mirrored path below it
};

enum class Selector { kLatest, kBest, kTop };

struct Query {
  std::vector<Predicate> where;  // all must hold
  QueryNode node = QueryNode::kRoot;
  Selector selector = Selector::kLatest;  // for kSelected
  bool ranked = false;                    // best/top/avg-best: order and key are set
  Order order = Order::kMin;
  std::string key;
  int k = 0;                      // top/<k>
  int rank = 0;                   // 1-based, top/<k>/…/<rank>; 1 for best
  int n = 0;                      // avg/last<N>, avg/best<N>
  std::vector<std::string> rest;  // the path below a kSelected/kAverage/kNew node
};

// Limits that keep a hostile path from asking for absurd work.
inline constexpr int kMaxCount = 100000;      // k, N
inline constexpr size_t kMaxNameBytes = 255;  // one segment, as NAME_MAX

// The names the virtual root lists, in order.
const std::vector<std::string>& VirtualRootNames();
bool IsVirtualRootName(std::string_view name);

// Splits "/a/b//c/" into {"a","b","c"}. "." segments are dropped; ".." and
// segments longer than kMaxNameBytes or holding NUL are kInvalidArgument.
Result<std::vector<std::string>> SplitPath(std::string_view path);

Result<Query> ParseQuery(const std::vector<std::string>& segments);

// "loss<=0.5" -> Predicate; kInvalidArgument without key, operator or value.
Result<Predicate> ParsePredicate(std::string_view text);

}  // namespace ckptfs::core

#endif  // CKPTFS_CORE_QUERY_PATH_H_
