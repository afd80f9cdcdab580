// Element types of tensor files and the averaging arithmetic over raw bytes.
// Floating types are averaged accumulating in float32 (float64 for f64 and
// complex128) and rounded back to their own type, round-to-nearest-even, as
// torch's .to() does; every other type is not averaged (DESIGN.md §3).
#ifndef CKPTFS_CORE_DTYPE_H_
#define CKPTFS_CORE_DTYPE_H_

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace ckptfs::core {

enum class DType {
  kF16,
  kBF16,
  kF32,
  kF64,
  kC64,
  kC128,  // averaged
  kBool,
  kU8,
  kI8,
  kI16,
  kI32,
  kI64,     // taken from the newest member
  kOpaque,  // other types (float8, uint16, ...): from the newest
};

size_t ItemSize(DType t);  // kOpaque: 1 (counted in bytes)
bool IsAveraged(DType t);
const char* DTypeName(DType t);

// "FloatStorage" -> kF32, ...; nullopt for unknown or quantized storages.
std::optional<DType> DTypeFromStorage(std::string_view storage_type);
// safetensors "F32" -> kF32, ...; nullopt for unknown names.
std::optional<DType> DTypeFromSafetensors(std::string_view name);

// Sums inputs one at a time (in the order added) and writes their mean:
// memory is one accumulator of `count` elements, whatever the number of
// inputs. For types that are not averaged it keeps the first input. An input
// may come in parts (AddPart for each range of elements, then EndInput), so
// that it is never held whole. Allocates `count` elements (throws
// std::bad_alloc): callers check count against the file first.
class Accumulator {
 public:
  Accumulator(DType t, size_t count);
  void Add(const void* input);  // count elements of type t: AddPart(input, 0, count) + EndInput()
  // Elements [first, first + n) of the current input; first + n <= count.
  void AddPart(const void* elements, size_t first, size_t n);
  void EndInput() { ++added_; }
  void Finish(void* out) const;  // count elements of type t; at least one input ended

 private:
  DType type_;
  size_t count_;
  size_t added_ = 0;
  std::vector<float> f32_;
  std::vector<double> f64_;
  std::vector<char> first_;
};

}  // namespace ckptfs::core

#endif  // CKPTFS_CORE_DTYPE_H_
