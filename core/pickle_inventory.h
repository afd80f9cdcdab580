// Internal to core's tensor code: what a parsed data.pkl holds besides its
// tensors, read without running anything (conversion to safetensors and the
// audit, safetensors_convert.h and pickle_audit.h).
//
// Values: every non-tensor leaf reachable from the root, named by the same
// dotted rule as pickle::FindTensors (dict keys, list / tuple / set
// indexes). A leaf JSON can hold (None, bools, ints, floats, strings) is
// given as JSON text; an opaque object (a call such as argparse.Namespace(...),
// a global, a storage, bytes, an integer beyond 64 bits) by its global name
// or kind only, never its contents; an empty container as "{}" or "[]". A
// container reached twice is walked once (as FindTensors does).
// Globals: every distinct global the pickle names (GLOBAL or STACK_GLOBAL),
// whether or not the reader kept it in the graph (a tensor rebuild function
// or the type of a _rebuild_from_type_v2 is consumed by the reader), with the
// number of objects of the graph that refer to it.
//
// Budgets (kCorrupt naming the origin and the budget): kMaxDepth nesting
// and kMaxPathBytes per name, as pickle.h; kMaxValues values; and
// kMaxValueBytes for all values' names and JSON texts together. The last
// bounds what a small pickle can ask for by reference: one memoized 1 MiB
// string costs 2 bytes per further use (BINGET), as does a long dict key
// that every value below it repeats in its name, so a 3 MB file could
// otherwise ask for tens of GB of text. No safetensors header can hold
// more than kMaxSafetensorsHeader (100 MB) anyway; a string leaf's length
// is checked before it is quoted.
#ifndef CKPTFS_CORE_PICKLE_INVENTORY_H_
#define CKPTFS_CORE_PICKLE_INVENTORY_H_

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/pickle.h"
#include "core/status.h"

namespace ckptfs::core {

inline constexpr size_t kMaxValues = size_t{1} << 20;
inline constexpr size_t kMaxValueBytes = size_t{64} << 20;

struct PickleValue {
  std::string name;  // dotted, unique ("#2", ... as FindTensors)
  std::string json;  // JSON text, or a global name / kind when opaque
  bool opaque = false;
};

struct PickleGlobal {
  std::string name;  // "module.name"
  int64_t uses = 0;  // objects of the graph referring to it
};

// The safetensors name ("F32", "F8_E4M3", ...) and element size of a
// tensor whose storage has `storage` type and, for _rebuild_tensor_v3 over
// an UntypedStorage, that dtype ("torch.float8_e4m3fn"); nullopt for types
// safetensors cannot hold (complex128, quantized, unknown).
struct SafetensorsDType {
  const char* name;
  size_t item;
};
std::optional<SafetensorsDType> SafetensorsDTypeOf(DType storage, const std::string& v3_dtype);

Result<std::vector<PickleValue>> PickleValues(pickle::ObjectPtr root, const std::string& origin);

// In the order the pickle first names them.
Result<std::vector<PickleGlobal>> PickleGlobals(const pickle::Unpickled& u,
                                                const std::string& origin);

}  // namespace ckptfs::core

#endif  // CKPTFS_CORE_PICKLE_INVENTORY_H_
