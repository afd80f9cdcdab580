// The safetensors header: parsed and validated as the reference reader does
// (huggingface/safetensors Metadata::validate): header size bounded, known
// dtypes, offsets contiguous from 0 and covering the data exactly, each
// tensor's byte length equal to numel × itemsize, no duplicate names.
#ifndef CKPTFS_CORE_SAFETENSORS_H_
#define CKPTFS_CORE_SAFETENSORS_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "core/dtype.h"
#include "core/status.h"

namespace ckptfs::core {

inline constexpr uint64_t kMaxSafetensorsHeader = 100000000;  // as the reference reader

struct SafetensorsTensor {
  std::string name;
  std::string dtype_name;
  DType dtype = DType::kOpaque;
  std::vector<int64_t> shape;
  uint64_t begin = 0;  // relative to the data section
  uint64_t end = 0;
};

struct SafetensorsHeader {
  uint64_t header_size = 0;                // N: the JSON's bytes; data starts at 8 + N
  std::vector<SafetensorsTensor> tensors;  // in data order
};

// header_json: the N bytes after the length; file_size: the whole file's.
Result<SafetensorsHeader> ParseSafetensorsHeader(std::string_view header_json, uint64_t header_size,
                                                 uint64_t file_size, const std::string& origin);

}  // namespace ckptfs::core

#endif  // CKPTFS_CORE_SAFETENSORS_H_
