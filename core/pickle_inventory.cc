// Values and globals of a parsed pickle: see pickle_inventory.h.
#include "core/pickle_inventory.h"

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <string_view>
#include <unordered_map>
#include <unordered_set>

#include "core/json_text.h"
#include "core/unique_names.h"

namespace ckptfs::core {
namespace {

using pickle::Kind;
using pickle::Object;
using pickle::ObjectPtr;

// The text a key contributes to a name: as pickle_walk.cc's KeyText, so
// that values and tensors are named alike.
std::string KeyText(ObjectPtr key) {
  switch (key->kind) {
    case Kind::kString:
    case Kind::kBytes:
      return key->text;
    case Kind::kInt:
      return std::to_string(key->integer);
    case Kind::kBool:
      return key->boolean ? "True" : "False";
    case Kind::kNone:
      return "None";
    default:
      return "?";
  }
}

// A float as Python's json.dumps writes it (NaN and the infinities too).
std::string FloatJson(double v) {
  if (std::isnan(v)) return "NaN";
  if (std::isinf(v)) return v > 0 ? "Infinity" : "-Infinity";
  // The shortest digits that read back as v, as Python's repr.
  char buf[40];
  for (int digits = 1; digits <= 17; ++digits) {
    std::snprintf(buf, sizeof(buf), "%.*g", digits, v);
    if (std::strtod(buf, nullptr) == v) break;
  }
  std::string s = buf;
  if (s.find_first_of(".eE") == std::string::npos) s += ".0";
  return s;
}

// A leaf's JSON text, or nullopt for a container to walk. A string longer
// than `room` bytes is not quoted (its JSON text would be at least as long):
// its text is left empty and `too_long` set.
std::optional<PickleValue> Leaf(const Object& o, size_t room = SIZE_MAX, bool* too_long = nullptr) {
  PickleValue v;
  switch (o.kind) {
    case Kind::kNone:
      v.json = "null";
      return v;
    case Kind::kBool:
      v.json = o.boolean ? "true" : "false";
      return v;
    case Kind::kInt:
      if (o.big_integer) {
        v.json = "int (beyond 64 bits)";
        v.opaque = true;
      } else {
        v.json = std::to_string(o.integer);
      }
      return v;
    case Kind::kFloat:
      v.json = FloatJson(o.real);
      return v;
    case Kind::kString:
      if (o.text.size() > room) {
        if (too_long != nullptr) *too_long = true;
        return v;
      }
      v.json = JsonQuote(o.text);
      return v;
    case Kind::kBytes:
      v.json = "bytes (" + std::to_string(o.text.size()) + ")";
      v.opaque = true;
      return v;
    case Kind::kGlobal:
      v.json = o.text;
      v.opaque = true;
      return v;
    case Kind::kStorage:
      v.json = "storage " + o.storage_type;
      v.opaque = true;
      return v;
    case Kind::kCall:
      v.json = !o.items.empty() && o.items[0] && o.items[0]->kind == Kind::kGlobal
                   ? o.items[0]->text
                   : "object";
      v.opaque = true;
      return v;
    case Kind::kDict:
      if (o.entries.empty()) {
        v.json = "{}";
        return v;
      }
      return std::nullopt;
    case Kind::kTuple:
    case Kind::kList:
    case Kind::kSet:
      if (o.items.empty()) {
        v.json = "[]";
        return v;
      }
      return std::nullopt;
    case Kind::kTensor:
      return std::nullopt;
  }
  return std::nullopt;
}

}  // namespace

std::optional<SafetensorsDType> SafetensorsDTypeOf(DType storage, const std::string& v3_dtype) {
  if (storage == DType::kOpaque && !v3_dtype.empty()) {
    std::string name = v3_dtype.rfind("torch.", 0) == 0 ? v3_dtype.substr(6) : v3_dtype;
    static const std::unordered_map<std::string, SafetensorsDType> kTorch = {
        {"float16", {"F16", 2}},
        {"bfloat16", {"BF16", 2}},
        {"float32", {"F32", 4}},
        {"float64", {"F64", 8}},
        {"complex64", {"C64", 8}},
        {"bool", {"BOOL", 1}},
        {"uint8", {"U8", 1}},
        {"int8", {"I8", 1}},
        {"int16", {"I16", 2}},
        {"int32", {"I32", 4}},
        {"int64", {"I64", 8}},
        {"float8_e4m3fn", {"F8_E4M3", 1}},
        {"float8_e5m2", {"F8_E5M2", 1}},
        {"uint16", {"U16", 2}},
        {"uint32", {"U32", 4}},
        {"uint64", {"U64", 8}},
    };
    auto it = kTorch.find(name);
    if (it == kTorch.end()) return std::nullopt;
    return it->second;
  }
  switch (storage) {
    case DType::kF16:
      return SafetensorsDType{"F16", 2};
    case DType::kBF16:
      return SafetensorsDType{"BF16", 2};
    case DType::kF32:
      return SafetensorsDType{"F32", 4};
    case DType::kF64:
      return SafetensorsDType{"F64", 8};
    case DType::kC64:
      return SafetensorsDType{"C64", 8};
    case DType::kBool:
      return SafetensorsDType{"BOOL", 1};
    case DType::kU8:
      return SafetensorsDType{"U8", 1};
    case DType::kI8:
      return SafetensorsDType{"I8", 1};
    case DType::kI16:
      return SafetensorsDType{"I16", 2};
    case DType::kI32:
      return SafetensorsDType{"I32", 4};
    case DType::kI64:
      return SafetensorsDType{"I64", 8};
    case DType::kC128:  // safetensors has no complex128
    case DType::kOpaque:
      return std::nullopt;
  }
  return std::nullopt;
}

// Depth-first with an explicit stack; a frame holds its object, the next
// child to visit and the name length to restore.
Result<std::vector<PickleValue>> PickleValues(ObjectPtr root, const std::string& origin) {
  std::vector<PickleValue> out;
  if (!root) return out;
  auto budget = [&origin](const char* what, size_t limit) {
    return Status::Corrupt(origin + ": " + std::string(what) + " exceeds the reader's budget of " +
                           std::to_string(limit));
  };
  UniqueNames names;
  std::unordered_set<const Object*> visited;
  std::string path;
  size_t bytes = 0;  // names and JSON texts emitted
  auto over_bytes = [&] {
    return budget("value names and texts (kMaxValueBytes)", kMaxValueBytes);
  };
  auto emit = [&](PickleValue v) -> Status {
    if (out.size() >= kMaxValues) return budget("values (kMaxValues)", kMaxValues);
    v.name = names.Take(path);
    const size_t n = v.name.size() + v.json.size();
    if (n > kMaxValueBytes - bytes) return over_bytes();
    bytes += n;
    out.push_back(std::move(v));
    return Status::Ok();
  };
  // A leaf, its string unquoted when it could not fit what is left.
  auto leaf = [&](const Object& o) -> Result<std::optional<PickleValue>> {
    bool too_long = false;
    std::optional<PickleValue> v = Leaf(o, kMaxValueBytes - bytes, &too_long);
    if (too_long) return over_bytes();
    return v;
  };
  Result<std::optional<PickleValue>> top = leaf(*root);
  if (!top.ok()) return top.status();
  if (std::optional<PickleValue> v = std::move(*top)) {
    if (root->kind != Kind::kTensor) {
      if (Status s = emit(std::move(*v)); !s.ok()) return s;
    }
    return out;
  }
  if (root->kind == Kind::kTensor) return out;
  struct Frame {
    ObjectPtr obj;
    size_t next = 0;
    size_t path_len = 0;
  };
  std::vector<Frame> stack = {{root, 0, 0}};
  visited.insert(root);
  while (!stack.empty()) {
    Frame& f = stack.back();
    const Object& o = *f.obj;
    ObjectPtr child = nullptr;
    std::string segment;
    const size_t i = f.next++;
    if (o.kind == Kind::kDict && i < o.entries.size()) {
      child = o.entries[i].second;
      segment = KeyText(o.entries[i].first);
    } else if (o.kind != Kind::kDict && i < o.items.size()) {
      child = o.items[i];
      segment = std::to_string(i);
    } else {
      path.resize(f.path_len);
      stack.pop_back();
      continue;
    }
    if (!child || child->kind == Kind::kTensor) continue;
    const size_t restore = path.size();
    if (!path.empty()) path += '.';
    path += segment;
    if (path.size() > pickle::kMaxPathBytes) {
      return budget("value name bytes (kMaxPathBytes)", pickle::kMaxPathBytes);
    }
    Result<std::optional<PickleValue>> got = leaf(*child);
    if (!got.ok()) return got.status();
    if (std::optional<PickleValue>& value = *got) {
      Status s = emit(std::move(*value));
      path.resize(restore);
      if (!s.ok()) return s;
      continue;
    }
    if (!visited.insert(child).second) {
      path.resize(restore);
      continue;
    }
    if (stack.size() >= pickle::kMaxDepth)
      return budget("nesting of objects (kMaxDepth)", pickle::kMaxDepth);
    stack.push_back({child, 0, restore});
  }
  return out;
}

Result<std::vector<PickleGlobal>> PickleGlobals(const pickle::Unpickled& u, const std::string&) {
  std::vector<PickleGlobal> out;
  std::unordered_map<const Object*, size_t> index;
  for (ObjectPtr g : u.globals) {
    if (index.emplace(g, out.size()).second) out.push_back({g->text, 0});
  }
  auto count = [&](ObjectPtr p) {
    if (p == nullptr || p->kind != Kind::kGlobal) return;
    auto it = index.find(p);
    if (it != index.end()) ++out[it->second].uses;
  };
  pickle::ForEachObject(u, [&](const Object& o) {
    for (ObjectPtr p : o.items) count(p);
    for (const auto& [k, v] : o.entries) {
      count(k);
      count(v);
    }
    count(o.state);
  });
  return out;
}

}  // namespace ckptfs::core
