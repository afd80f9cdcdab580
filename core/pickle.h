// A code-free pickle reader for torch.save's data.pkl (protocols 2 to 5).
//
// It builds an object graph and never imports or calls anything: a GLOBAL is
// a recorded name; REDUCE, NEWOBJ and BUILD become call nodes holding their
// callable and arguments. Only the tensor-rebuild functions, storage
// persistent ids and containers are interpreted (DESIGN.md §3). Everything
// else is opaque data; the averaged output reuses the input's pickle bytes,
// so such objects survive unchanged and nothing in them ever runs.
//
// Errors: kCorrupt naming the origin and the byte offset for malformed or
// truncated input, kUnsupported for opcodes of protocols 0/1 text forms.
// Thread-compatible; values are immutable once returned.
#ifndef CKPTFS_CORE_PICKLE_H_
#define CKPTFS_CORE_PICKLE_H_

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "core/status.h"

namespace ckptfs::core::pickle {

enum class Kind {
  kNone, kBool, kInt, kFloat, kString, kBytes,
  kTuple, kList, kDict, kSet,
  kGlobal,   // module, name
  kStorage,  // a storage persistent id
  kTensor,   // a rebuilt tensor
  kCall,     // an opaque REDUCE / NEWOBJ, with BUILD state if any
};

struct Object;
// Objects are owned by the arena of the Unpickled they came from; pointers
// stay valid while it lives. (Pickles can build cycles, which shared
// ownership would leak.)
using ObjectPtr = Object*;

struct Object {
  Kind kind = Kind::kNone;
  bool boolean = false;
  int64_t integer = 0;
  bool big_integer = false;  // LONG beyond 64 bits; integer is meaningless
  double real = 0;
  std::string text;                          // kString, kBytes; kGlobal: "module.name"
  std::vector<ObjectPtr> items;              // kTuple, kList, kSet; kCall: {callable, args}
  std::vector<std::pair<ObjectPtr, ObjectPtr>> entries;  // kDict
  ObjectPtr state = nullptr;                 // BUILD state (kCall, kDict)
  // kStorage
  std::string storage_type;  // "FloatStorage", "UntypedStorage", ...
  std::string storage_key;
  int64_t storage_numel = 0;  // elements of storage_type; bytes for UntypedStorage
  // kTensor
  ObjectPtr storage = nullptr;  // kStorage
  std::string tensor_dtype;  // set by _rebuild_tensor_v3 ("float8_e4m3fn", ...)
  int64_t offset = 0;
  std::vector<int64_t> size;
  std::vector<int64_t> stride;
};

struct Unpickled {
  std::vector<std::unique_ptr<Object>> arena;
  ObjectPtr root = nullptr;  // the object STOP returned
};

// Parses a whole pickle.
Result<Unpickled> Unpickle(std::string_view data, const std::string& origin);

// Every tensor reachable from root, with a dotted path naming it
// ("state_dict.layer.0.weight", "optimizer_states.0.state.3.exp_avg").
// A tensor object reached by two paths (tied weights) is listed under both;
// a shared container is walked once.
struct TensorEntry {
  std::string path;
  ObjectPtr tensor;
};
Result<std::vector<TensorEntry>> FindTensors(ObjectPtr root, const std::string& origin);

}  // namespace ckptfs::core::pickle

#endif  // CKPTFS_CORE_PICKLE_H_
