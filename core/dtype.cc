// Part of core's tensor code: c10's Half and BFloat16 give torch's exact
// conversions without the full libtorch headers.
#include "core/dtype.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>

namespace ckptfs::core {
namespace {

template <typename T, typename Acc>
void AddAll(const void* input, size_t first, size_t n, std::vector<Acc>* acc) {
  const T* src = static_cast<const T*>(input);
  Acc* dst = acc->data() + first;
  for (size_t i = 0; i < n; ++i) dst[i] += static_cast<Acc>(src[i]);
}

template <typename T, typename Acc>
void Divide(const std::vector<Acc>& acc, size_t count, void* out) {
  T* dst = static_cast<T*>(out);
  const Acc n = static_cast<Acc>(count);
  for (size_t i = 0; i < acc.size(); ++i) dst[i] = static_cast<T>(acc[i] / n);
}

}  // namespace

size_t ItemSize(DType t) {
  switch (t) {
    case DType::kF16:
    case DType::kBF16:
    case DType::kI16:
      return 2;
    case DType::kF32:
    case DType::kI32:
      return 4;
    case DType::kF64:
    case DType::kI64:
    case DType::kC64:
      return 8;
    case DType::kC128:
      return 16;
    case DType::kBool:
    case DType::kU8:
    case DType::kI8:
    case DType::kOpaque:
      return 1;
  }
  return 1;
}

bool IsAveraged(DType t) {
  return t == DType::kF16 || t == DType::kBF16 || t == DType::kF32 || t == DType::kF64 ||
         t == DType::kC64 || t == DType::kC128;
}

const char* DTypeName(DType t) {
  switch (t) {
    case DType::kF16:
      return "float16";
    case DType::kBF16:
      return "bfloat16";
    case DType::kF32:
      return "float32";
    case DType::kF64:
      return "float64";
    case DType::kC64:
      return "complex64";
    case DType::kC128:
      return "complex128";
    case DType::kBool:
      return "bool";
    case DType::kU8:
      return "uint8";
    case DType::kI8:
      return "int8";
    case DType::kI16:
      return "int16";
    case DType::kI32:
      return "int32";
    case DType::kI64:
      return "int64";
    case DType::kOpaque:
      return "bytes";
  }
  return "?";
}

std::optional<DType> DTypeFromStorage(std::string_view s) {
  struct Entry {
    const char* name;
    DType type;
  };
  static const Entry kTable[] = {
      {"HalfStorage", DType::kF16},         {"BFloat16Storage", DType::kBF16},
      {"FloatStorage", DType::kF32},        {"DoubleStorage", DType::kF64},
      {"ComplexFloatStorage", DType::kC64}, {"ComplexDoubleStorage", DType::kC128},
      {"BoolStorage", DType::kBool},        {"ByteStorage", DType::kU8},
      {"CharStorage", DType::kI8},          {"ShortStorage", DType::kI16},
      {"IntStorage", DType::kI32},          {"LongStorage", DType::kI64},
      {"UntypedStorage", DType::kOpaque},
  };
  for (const Entry& e : kTable) {
    if (s == e.name) return e.type;
  }
  return std::nullopt;
}

std::optional<DType> DTypeFromSafetensors(std::string_view s) {
  struct Entry {
    const char* name;
    DType type;
  };
  static const Entry kTable[] = {
      {"F16", DType::kF16}, {"BF16", DType::kBF16}, {"F32", DType::kF32}, {"F64", DType::kF64},
      {"C64", DType::kC64}, {"BOOL", DType::kBool}, {"U8", DType::kU8},   {"I8", DType::kI8},
      {"I16", DType::kI16}, {"I32", DType::kI32},   {"I64", DType::kI64},
  };
  for (const Entry& e : kTable) {
    if (s == e.name) return e.type;
  }
  // Types we carry as bytes from the newest member.
  if (s == "F8_E5M2" || s == "F8_E4M3" || s == "U16" || s == "U32" || s == "U64")
    return DType::kOpaque;
  return std::nullopt;
}

Accumulator::Accumulator(DType t, size_t count) : type_(t), count_(count) {
  switch (t) {
    case DType::kF16:
    case DType::kBF16:
    case DType::kF32:
      f32_.assign(count, 0.0f);
      break;
    case DType::kC64:  // (real, imag) pairs
      f32_.assign(count * 2, 0.0f);
      break;
    case DType::kF64:
      f64_.assign(count, 0.0);
      break;
    case DType::kC128:
      f64_.assign(count * 2, 0.0);
      break;
    default:
      break;
  }
}

void Accumulator::Add(const void* input) {
  AddPart(input, 0, count_);
  EndInput();
}

void Accumulator::AddPart(const void* input, size_t first, size_t n) {
  switch (type_) {
    case DType::kF16:
      return AddAll<c10::Half>(input, first, n, &f32_);
    case DType::kBF16:
      return AddAll<c10::BFloat16>(input, first, n, &f32_);
    case DType::kF32:
      return AddAll<float>(input, first, n, &f32_);
    case DType::kC64:  // (real, imag) pairs
      return AddAll<float>(input, 2 * first, 2 * n, &f32_);
    case DType::kF64:
      return AddAll<double>(input, first, n, &f64_);
    case DType::kC128:
      return AddAll<double>(input, 2 * first, 2 * n, &f64_);
    default:
      if (added_ == 0) {
        const size_t item = ItemSize(type_);
        first_.resize(count_ * item);
        std::memcpy(first_.data() + first * item, input, n * item);
      }
      return;
  }
}

void Accumulator::Finish(void* out) const {
  switch (type_) {
    case DType::kF16:
      return Divide<c10::Half>(f32_, added_, out);
    case DType::kBF16:
      return Divide<c10::BFloat16>(f32_, added_, out);
    case DType::kF32:
    case DType::kC64:
      return Divide<float>(f32_, added_, out);
    case DType::kF64:
    case DType::kC128:
      return Divide<double>(f64_, added_, out);
    default:
      std::memcpy(out, first_.data(), first_.size());
      return;
  }
}

}  // namespace ckptfs::core
