#include "core/query_path.h"

#include <algorithm>
#include <cstdlib>

namespace ckptfs::core {
namespace {

const char* OpText(CompareOp op) {
  switch (op) {
    case CompareOp::kEq:
      return "=";
    case CompareOp::kNe:
      return "!=";
    case CompareOp::kLt:
      return "<";
    case CompareOp::kLe:
      return "<=";
    case CompareOp::kGt:
      return ">";
    case CompareOp::kGe:
      return ">=";
  }
  return "?";
}

// A positive count with no sign, no leading zero and no junk, up to kMaxCount.
bool ParseCount(std::string_view text, int* out) {
  if (text.empty() || text.size() > 6 || text[0] == '0') return false;
  int v = 0;
  for (char c : text) {
    if (c < '0' || c > '9') return false;
    v = v * 10 + (c - '0');
  }
  if (v > kMaxCount) return false;
  *out = v;
  return true;
}

bool ParseOrder(std::string_view text, Order* out) {
  if (text == "min") {
    *out = Order::kMin;
  } else if (text == "max") {
    *out = Order::kMax;
  } else {
    return false;
  }
  return true;
}

Status Malformed(const std::vector<std::string>& segments, size_t i, const std::string& why) {
  std::string path;
  for (size_t j = 0; j <= i && j < segments.size(); ++j) path += "/" + segments[j];
  return Status::InvalidArgument(path + ": " + why);
}

}  // namespace

std::string Predicate::ToString() const { return key + OpText(op) + value.text; }

const std::vector<std::string>& VirtualRootNames() {
  static const std::vector<std::string> kNames = {"latest", "best",        "top", "avg",
                                                  "where",  "safetensors", "new", "index.json"};
  return kNames;
}

bool IsVirtualRootName(std::string_view name) {
  const auto& names = VirtualRootNames();
  return std::find(names.begin(), names.end(), name) != names.end();
}

Result<std::vector<std::string>> SplitPath(std::string_view path) {
  std::vector<std::string> out;
  size_t i = 0;
  while (i <= path.size()) {
    size_t j = path.find('/', i);
    if (j == std::string_view::npos) j = path.size();
    std::string_view seg = path.substr(i, j - i);
    if (seg.find('\0') != std::string_view::npos) {
      return Status::InvalidArgument("path holds a NUL byte");
    }
    if (seg == "..") return Status::InvalidArgument(std::string(path) + ": '..' is not allowed");
    if (seg.size() > kMaxNameBytes) {
      return Status::InvalidArgument(std::string(path.substr(0, 64)) + "...: name too long");
    }
    if (!seg.empty() && seg != ".") out.emplace_back(seg);
    i = j + 1;
  }
  return out;
}

Result<Predicate> ParsePredicate(std::string_view text) {
  size_t pos = text.find_first_of("=!<>");
  if (pos == std::string_view::npos) {
    return Status::InvalidArgument("'" + std::string(text) + "': no operator (= != < <= > >=)");
  }
  Predicate p;
  p.key = std::string(text.substr(0, pos));
  std::string_view rest = text.substr(pos);
  size_t op_len = 1;
  if (rest.rfind("<=", 0) == 0) {
    p.op = CompareOp::kLe, op_len = 2;
  } else if (rest.rfind(">=", 0) == 0) {
    p.op = CompareOp::kGe, op_len = 2;
  } else if (rest.rfind("!=", 0) == 0) {
    p.op = CompareOp::kNe, op_len = 2;
  } else if (rest[0] == '=') {
    p.op = CompareOp::kEq;
  } else if (rest[0] == '<') {
    p.op = CompareOp::kLt;
  } else if (rest[0] == '>') {
    p.op = CompareOp::kGt;
  } else {
    return Status::InvalidArgument("'" + std::string(text) + "': unknown operator");
  }
  std::string_view value = rest.substr(op_len);
  if (p.key.empty()) return Status::InvalidArgument("'" + std::string(text) + "': no key");
  if (value.empty()) return Status::InvalidArgument("'" + std::string(text) + "': no value");
  p.value = MetaValue::FromToken(value);
  if (p.value.type == MetaType::kBool && p.op != CompareOp::kEq && p.op != CompareOp::kNe) {
    return Status::InvalidArgument("'" + std::string(text) +
                                   "': a bool compares only with = or !=");
  }
  return p;
}

Result<Query> ParseQuery(const std::vector<std::string>& segments) {
  Query q;
  size_t i = 0;
  const size_t n = segments.size();
  auto done = [&]() { return i >= n; };
  auto at = [&](QueryNode node) {
    q.node = node;
    return q;
  };
  auto rest_from = [&](size_t from) {
    q.rest.assign(segments.begin() + static_cast<std::ptrdiff_t>(from), segments.end());
  };
  // Chained where/<pred>/ prefixes.
  while (!done() && segments[i] == "where") {
    ++i;
    if (done()) {
      q.node = QueryNode::kWhere;
      return q;
    }
    Result<Predicate> p = ParsePredicate(segments[i]);
    if (!p.ok()) return Malformed(segments, i, p.status().message());
    q.where.push_back(std::move(*p));
    ++i;
  }
  if (done()) {
    q.node = QueryNode::kRoot;
    return q;
  }
  const std::string& head = segments[i++];
  if (head == "latest") {
    q.node = QueryNode::kSelected;
    q.selector = Selector::kLatest;
    rest_from(i);
    return q;
  }
  if (head == "index.json") {
    if (!done()) return Status::NotFound("index.json is a file");
    q.node = QueryNode::kIndexJson;
    return q;
  }
  if (head == "safetensors") {
    q.node = QueryNode::kSafetensors;
    rest_from(i);
    return q;
  }
  if (head == "new") {
    q.node = QueryNode::kNew;
    rest_from(i);
    return q;
  }
  if (head == "best") {
    if (done()) return at(QueryNode::kBest);
    if (!ParseOrder(segments[i], &q.order)) return Malformed(segments, i, "expected min or max");
    ++i;
    if (done()) return at(QueryNode::kBestOrder);
    q.key = segments[i++];
    q.ranked = true;
    q.selector = Selector::kBest;
    q.rank = 1;
    q.node = QueryNode::kSelected;
    rest_from(i);
    return q;
  }
  if (head == "top") {
    if (done()) return at(QueryNode::kTop);
    if (!ParseCount(segments[i], &q.k)) {
      return Malformed(segments, i, "expected a count from 1 to " + std::to_string(kMaxCount));
    }
    ++i;
    if (done()) return at(QueryNode::kTopK);
    if (!ParseOrder(segments[i], &q.order)) return Malformed(segments, i, "expected min or max");
    ++i;
    if (done()) return at(QueryNode::kTopOrder);
    q.key = segments[i++];
    q.ranked = true;
    if (done()) return at(QueryNode::kTopKey);
    if (!ParseCount(segments[i], &q.rank) || q.rank > q.k) {
      return Malformed(segments, i, "expected a rank from 1 to " + std::to_string(q.k));
    }
    ++i;
    q.selector = Selector::kTop;
    q.node = QueryNode::kSelected;
    rest_from(i);
    return q;
  }
  if (head == "avg") {
    if (done()) return at(QueryNode::kAvg);
    const std::string& what = segments[i];
    if (what.rfind("last", 0) == 0 && ParseCount(std::string_view(what).substr(4), &q.n)) {
      ++i;
      q.node = QueryNode::kAverage;
      rest_from(i);
      return q;
    }
    if (what.rfind("best", 0) == 0 && ParseCount(std::string_view(what).substr(4), &q.n)) {
      ++i;
      if (done()) return at(QueryNode::kAvgBest);
      if (!ParseOrder(segments[i], &q.order)) return Malformed(segments, i, "expected min or max");
      ++i;
      if (done()) return at(QueryNode::kAvgBestOrder);
      q.key = segments[i++];
      q.ranked = true;
      q.node = QueryNode::kAverage;
      rest_from(i);
      return q;
    }
    return Malformed(segments, i, "expected last<N> or best<N>");
  }
  return Status::NotFound("/" + head + ": not a query name");
}

}  // namespace ckptfs::core
