// FindTensors: the walk from an unpickled root to every tensor, and the
// unique dotted names it gives them (core/pickle.h).
#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <optional>
#include <unordered_map>
#include <unordered_set>

#include "core/pickle.h"
#include "core/unique_names.h"

namespace ckptfs::core::pickle {
namespace {

// The text a key contributes to a tensor path. Strings are viewed in place;
// `scratch` holds any other rendering.
std::string_view KeyText(ObjectPtr key, std::string* scratch) {
  switch (key->kind) {
    case Kind::kString:
    case Kind::kBytes:
      return key->text;
    case Kind::kInt:
      *scratch = std::to_string(key->integer);
      return *scratch;
    case Kind::kBool:
      return key->boolean ? "True" : "False";
    case Kind::kNone:
      return "None";
    default:
      return "?";
  }
}

// The i-th child of `o` in walking order, and whether it adds a path
// segment (written to *segment) or keeps its parent's path (an object's
// arguments and state). Returns false past the last child.
bool Child(const Object& o, size_t i, ObjectPtr* child, std::optional<std::string_view>* segment,
           std::string* scratch) {
  segment->reset();
  const size_t entries = o.kind == Kind::kDict || o.kind == Kind::kCall ? o.entries.size() : 0;
  if (o.kind == Kind::kCall) {
    // {callable, args, kwargs}: args and kwargs keep the path; appended items
    // and set items follow, then the state.
    if (i < 2 && i + 1 < o.items.size()) {
      *child = o.items[i + 1];
      return true;
    }
    i -= std::min<size_t>(i, 2);
    if (o.items.size() > 3 && i < o.items.size() - 3) {
      *child = o.items[i + 3];
      *scratch = std::to_string(i);
      *segment = *scratch;
      return true;
    }
    i -= o.items.size() > 3 ? o.items.size() - 3 : 0;
  } else if (o.kind == Kind::kTuple || o.kind == Kind::kList || o.kind == Kind::kSet) {
    if (i < o.items.size()) {
      *child = o.items[i];
      *scratch = std::to_string(i);
      *segment = *scratch;
      return true;
    }
    i -= o.items.size();
  } else if (o.kind != Kind::kDict) {
    return false;
  }
  if (i < entries) {
    *child = o.entries[i].second;
    *segment = KeyText(o.entries[i].first, scratch);
    return true;
  }
  if (i == entries) {
    *child = o.state;
    return true;
  }
  return false;
}

}  // namespace

// Depth-first with an explicit stack of cursors and one path string that
// grows and shrinks with it, so memory is O(depth + output), not O(objects
// x path length).
Result<std::vector<TensorEntry>> FindTensors(ObjectPtr root, const std::string& origin) {
  std::vector<TensorEntry> out;
  if (!root) return out;
  std::unordered_set<const Object*> visited;
  UniqueNames names;
  size_t path_bytes = 0;
  std::string path;
  size_t overlong = 0;  // frames whose segment did not fit in kMaxPathBytes
  struct Frame {
    ObjectPtr obj;
    size_t next = 0;      // index of the next child to visit
    size_t path_len = 0;  // path length to restore when leaving
    bool overlong = false;
  };
  auto budget = [&origin](const char* what, size_t limit) {
    return Status::Corrupt(origin + ": " + std::string(what) + " exceeds the reader's budget of " +
                           std::to_string(limit));
  };
  auto emit = [&]() -> Status {
    if (overlong > 0) return budget("tensor path bytes (kMaxPathBytes)", kMaxPathBytes);
    if (out.size() >= kMaxTensors) return budget("tensors (kMaxTensors)", kMaxTensors);
    path_bytes += path.size();
    if (path_bytes > kMaxTotalPathBytes)
      return budget("bytes of all tensor paths (kMaxTotalPathBytes)", kMaxTotalPathBytes);
    return Status::Ok();
  };
  if (root->kind == Kind::kTensor) {
    if (Status s = emit(); !s.ok()) return s;
    out.push_back({names.Take(path), root});
    return out;
  }
  visited.insert(root);
  std::vector<Frame> stack = {{root}};
  std::string scratch;
  while (!stack.empty()) {
    Frame& f = stack.back();
    ObjectPtr child = nullptr;
    std::optional<std::string_view> segment;
    if (!Child(*f.obj, f.next++, &child, &segment, &scratch)) {
      path.resize(f.path_len);
      if (f.overlong) --overlong;
      stack.pop_back();
      continue;
    }
    if (!child) continue;
    // A tensor reached twice (tied weights) is listed under each path; a
    // container reached twice is walked once, which also ends cycles.
    const bool tensor = child->kind == Kind::kTensor;
    if (!tensor && (child->kind < Kind::kTuple || child->kind == Kind::kGlobal ||
                    child->kind == Kind::kStorage || !visited.insert(child).second)) {
      continue;
    }
    Frame next{child, 0, path.size(), false};
    if (segment) {
      const size_t grown = path.size() + (path.empty() ? 0 : 1) + segment->size();
      if (overlong > 0 || grown > kMaxPathBytes) {
        next.overlong = true;
        ++overlong;
      } else {
        if (!path.empty()) path += '.';
        path.append(*segment);
      }
    }
    if (tensor) {
      Status s = emit();
      if (s.ok()) out.push_back({names.Take(path), child});
      path.resize(next.path_len);
      if (next.overlong) --overlong;
      if (!s.ok()) return s;
      continue;
    }
    if (stack.size() >= kMaxDepth) return budget("nesting of objects (kMaxDepth)", kMaxDepth);
    stack.push_back(next);
  }
  return out;
}

}  // namespace ckptfs::core::pickle
