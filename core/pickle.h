// A code-free pickle reader for torch.save's data.pkl (protocols 2 to 5).
//
// It builds an object graph and never imports or calls anything: a GLOBAL is
// a recorded name; REDUCE, NEWOBJ and BUILD become call nodes holding their
// callable and arguments. Only the tensor-rebuild functions, storage
// persistent ids and containers are interpreted (DESIGN.md §3). Everything
// else is opaque data; the averaged output reuses the input's pickle bytes,
// so such objects survive unchanged and nothing in them ever runs.
//
// Budgets. data.pkl comes from files we do not trust, so the reader bounds
// its work and memory explicitly; exceeding a budget is kCorrupt with a
// message naming the origin, the byte offset (for Unpickle) and the budget.
// Nothing recurses over the object graph: walks use explicit stacks, so no
// input can exhaust the thread's stack. The values leave a wide margin over
// real checkpoints: a Lightning-style torch.save of a 2,000-tensor model
// with Adam state (8,000 tensors) creates about 82,000 objects, nests about
// 10 deep and holds 8,000 paths of under 100 bytes.
//   kMaxObjects       objects created (1M: twelve times that checkpoint).
//                     None, True, False, the ints 0..255 and each distinct
//                     global name are made once and shared, so a flood of
//                     NONE/POP creates one object. sizeof(Object) is about
//                     280 bytes: the budget caps the graph near 300 MB
//                     (measured: 307 MB peak for 2 MB of EMPTY_LIST/POP,
//                     against 32 MB for the 2,000-tensor checkpoint).
//   kMaxMemo          memo entries (PUTs of an index already set are free).
//   kMaxStack         VM stack entries plus open MARKs.
//   kMaxStringBytes   total bytes of strings, bytes, global names and
//                     storage names (each is copied from the input once).
//   kMaxGlobalNameBytes  one "module.name".
//   kMaxDepth         nesting of objects walked by FindTensors, and of
//                     _rebuild_from_type_v2 wrappers unwrapped by REDUCE.
//   kMaxTensors, kMaxPathBytes, kMaxTotalPathBytes  FindTensors' output:
//                     entries, bytes of one dotted path (only a path that
//                     leads to a tensor counts), bytes of all paths.
// Sizes: a tensor's offset, sizes and strides are non-negative and its
// extent (offset + sum((size - 1) * stride)) and element count fit in
// int64; a storage's element count times the widest element (16 bytes)
// fits in int64. So callers can do this arithmetic without overflow.
//
// Errors: kCorrupt naming the origin and the byte offset for malformed or
// truncated input and exceeded budgets, kUnsupported for opcodes of
// protocols 0/1 text forms and tensor kinds we do not handle.
// Thread-compatible; values are immutable once returned.
#ifndef CKPTFS_CORE_PICKLE_H_
#define CKPTFS_CORE_PICKLE_H_

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "core/status.h"

namespace ckptfs::core::pickle {

inline constexpr size_t kMaxObjects = size_t{1} << 20;
inline constexpr size_t kMaxMemo = size_t{1} << 20;
inline constexpr size_t kMaxStack = size_t{1} << 20;
inline constexpr size_t kMaxStringBytes = size_t{512} << 20;
inline constexpr size_t kMaxGlobalNameBytes = 4096;
inline constexpr size_t kMaxDepth = 10000;
inline constexpr size_t kMaxTensors = size_t{1} << 20;
inline constexpr size_t kMaxPathBytes = size_t{64} << 10;
inline constexpr size_t kMaxTotalPathBytes = size_t{32} << 20;

enum class Kind : uint8_t {
  kNone,
  kBool,
  kInt,
  kFloat,
  kString,
  kBytes,
  kTuple,
  kList,
  kDict,
  kSet,
  kGlobal,   // module, name
  kStorage,  // a storage persistent id
  kTensor,   // a rebuilt tensor
  kCall,     // an opaque REDUCE / NEWOBJ, with BUILD state if any
};

struct Object;
// Objects are owned by the arena of the Unpickled they came from; pointers
// stay valid while it lives. (Pickles can build cycles, which shared
// ownership would leak.) None, True, False, small ints and globals are
// shared between the places that use them.
using ObjectPtr = Object*;

struct Object {
  Kind kind = Kind::kNone;
  bool boolean = false;
  bool big_integer = false;  // LONG beyond 64 bits; integer is meaningless
  int64_t integer = 0;
  double real = 0;
  std::string text;  // kString, kBytes; kGlobal: "module.name"
  // kTuple, kList, kSet: the elements. kCall: {callable, args, kwargs or
  // nullptr}, then anything APPEND(S) added (a list subclass's items).
  std::vector<ObjectPtr> items;
  // kDict: the items. kCall: what SETITEM(S) added (a dict subclass's items).
  std::vector<std::pair<ObjectPtr, ObjectPtr>> entries;
  ObjectPtr state = nullptr;  // BUILD state (kCall, kDict, kList, ...)
  // kStorage
  std::string storage_type;  // "FloatStorage", "UntypedStorage", ...
  std::string storage_key;
  int64_t storage_numel = 0;  // elements of storage_type; bytes for UntypedStorage
  // kTensor
  ObjectPtr storage = nullptr;  // kStorage
  std::string tensor_dtype;     // set by _rebuild_tensor_v3 ("float8_e4m3fn", ...)
  int64_t offset = 0;
  std::vector<int64_t> size;
  std::vector<int64_t> stride;
};

struct Unpickled {
  // Chunks of objects; a chunk never moves, so pointers into it stay valid.
  std::vector<std::unique_ptr<Object[]>> arena;
  std::vector<size_t> arena_used;  // objects made in each chunk
  size_t objects = 0;              // objects created (the shared ones included)
  ObjectPtr root = nullptr;        // the object STOP returned
  // Every distinct global the pickle names (GLOBAL, STACK_GLOBAL), in the
  // order it first names them, reachable from root or not.
  std::vector<ObjectPtr> globals;
};

// Calls fn on every object the pickle made, reachable from root or not.
void ForEachObject(const Unpickled& u, const std::function<void(const Object&)>& fn);

// Parses a whole pickle.
Result<Unpickled> Unpickle(std::string_view data, const std::string& origin);

// Every tensor reachable from root, with a dotted path naming it
// ("state_dict.layer.0.weight", "optimizer_states.0.state.3.exp_avg").
// A tensor object reached by two paths (tied weights) is listed under both;
// a shared container is walked once. Paths are unique: a path met again
// (a repeated key, or keys with no text form, which all read "?") gets
// "#2", "#3", ... (the first of those not already taken).
struct TensorEntry {
  std::string path;
  ObjectPtr tensor;
};
Result<std::vector<TensorEntry>> FindTensors(ObjectPtr root, const std::string& origin);

}  // namespace ckptfs::core::pickle

#endif  // CKPTFS_CORE_PICKLE_H_
