#include "core/safetensors.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <memory>
#include <new>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <unordered_map>

#include "core/cancel.h"
#include "core/file_util.h"
#include "core/tensor_io.h"

namespace ckptfs::core {
namespace {

// Bytes per element of a known dtype name (the opaque ones too).
uint64_t ItemBytes(const std::string& name) {
  if (name == "U16") return 2;
  if (name == "U32") return 4;
  if (name == "U64") return 8;
  std::optional<DType> t = DTypeFromSafetensors(name);
  return t ? ItemSize(*t) : 1;  // F8_*: 1
}

}  // namespace

Result<SafetensorsHeader> ParseSafetensorsHeader(std::string_view header_json, uint64_t header_size,
                                                 uint64_t file_size, const std::string& origin) {
  if (header_size > kMaxSafetensorsHeader)
    return Status::Corrupt(origin + ": safetensors header too large");
  if (8 + header_size > file_size)
    return Status::Corrupt(origin + ": truncated safetensors header");
  // Duplicate names would silently collapse in a JSON object: count them first.
  std::set<std::string> names;
  bool duplicate = false;
  nlohmann::json::parser_callback_t count = [&](int depth, nlohmann::json::parse_event_t event,
                                                nlohmann::json& parsed) {
    if (depth == 1 && event == nlohmann::json::parse_event_t::key) {
      duplicate = duplicate || !names.insert(parsed.get<std::string>()).second;
    }
    return true;
  };
  nlohmann::json doc = nlohmann::json::parse(header_json, count, /*allow_exceptions=*/false);
  if (doc.is_discarded() || !doc.is_object()) {
    return Status::Corrupt(origin + ": safetensors header is not a JSON object");
  }
  if (duplicate) return Status::Corrupt(origin + ": safetensors header names a tensor twice");
  SafetensorsHeader h;
  h.header_size = header_size;
  for (const auto& [name, entry] : doc.items()) {
    if (name == "__metadata__") continue;
    const std::string where = origin + ": tensor '" + name + "'";
    if (!entry.is_object() || !entry.contains("dtype") || !entry.contains("shape") ||
        !entry.contains("data_offsets") || !entry["dtype"].is_string() ||
        !entry["shape"].is_array() || !entry["data_offsets"].is_array() ||
        entry["data_offsets"].size() != 2) {
      return Status::Corrupt(where + ": malformed entry");
    }
    SafetensorsTensor t;
    t.name = name;
    t.dtype_name = entry["dtype"].get<std::string>();
    std::optional<DType> dtype = DTypeFromSafetensors(t.dtype_name);
    if (!dtype) return Status::Unsupported(where + ": unknown dtype " + t.dtype_name);
    t.dtype = *dtype;
    // Every product below is checked: a shape of [2^62 + 1] F32 must not
    // wrap around to 4 bytes.
    uint64_t numel = 1;
    for (const auto& d : entry["shape"]) {
      if (!d.is_number_unsigned()) return Status::Corrupt(where + ": bad shape");
      const uint64_t v = d.get<uint64_t>();
      if (v > static_cast<uint64_t>(INT64_MAX)) return Status::Corrupt(where + ": shape overflows");
      if (__builtin_mul_overflow(numel, v, &numel))
        return Status::Corrupt(where + ": shape overflows");
      t.shape.push_back(static_cast<int64_t>(v));
    }
    const auto& off = entry["data_offsets"];
    if (!off[0].is_number_unsigned() || !off[1].is_number_unsigned()) {
      return Status::Corrupt(where + ": bad data_offsets");
    }
    t.begin = off[0].get<uint64_t>();
    t.end = off[1].get<uint64_t>();
    uint64_t bytes = 0;
    if (__builtin_mul_overflow(numel, ItemBytes(t.dtype_name), &bytes)) {
      return Status::Corrupt(where + ": shape overflows");
    }
    if (t.end < t.begin || t.end - t.begin != bytes) {
      return Status::Corrupt(where + ": data_offsets do not match its shape and dtype");
    }
    h.tensors.push_back(std::move(t));
  }
  std::sort(
      h.tensors.begin(), h.tensors.end(),
      [](const SafetensorsTensor& a, const SafetensorsTensor& b) { return a.begin < b.begin; });
  uint64_t expect = 0;
  for (const SafetensorsTensor& t : h.tensors) {
    if (t.begin != expect) {
      return Status::Corrupt(origin + ": tensor '" + t.name +
                             "' does not start where the previous ends");
    }
    expect = t.end;
  }
  if (expect != file_size - 8 - header_size) {  // file_size >= 8 + header_size, checked above
    return Status::Corrupt(origin + ": data section is " +
                           std::to_string(file_size - 8 - header_size) +
                           " bytes, the header describes " + std::to_string(expect));
  }
  return h;
}

namespace {

// One tensor of the output: the members' average, or the newest member's
// bytes for types that are not averaged. Members are read in pieces of
// kReadChunk; memory is one accumulator and one output buffer. `piece` and
// `output` are reused from one tensor to the next (allocating and faulting in
// megabytes per tensor and member would cost as much as the averaging).
Status AverageTensor(
    const std::vector<InputFile>& files, const std::vector<SafetensorsHeader>& headers,
    const std::vector<std::unordered_map<std::string, const SafetensorsTensor*>>& by_name,
    const SafetensorsTensor& t, OutputFile* out, AverageResult* result, std::vector<char>* piece,
    std::vector<char>* output) {
  const size_t bytes = static_cast<size_t>(t.end - t.begin);
  const size_t item = ItemSize(t.dtype);
  const size_t readers = IsAveraged(t.dtype) ? files.size() : 1;
  Accumulator acc(t.dtype, bytes / item);
  if (piece->size() < std::min(bytes, kReadChunk)) piece->resize(std::min(bytes, kReadChunk));
  for (size_t i = 0; i < readers; ++i) {
    const uint64_t at = 8 + headers[i].header_size + by_name[i].at(t.name)->begin;
    for (size_t done = 0; done < bytes;) {
      if (CancelRequested()) return CancelledStatus("averaging " + files[0].path());
      const size_t n = std::min(bytes - done, kReadChunk);
      if (Status s = files[i].ReadAt(at + done, piece->data(), n); !s.ok()) return s;
      acc.AddPart(piece->data(), done / item, n / item);  // kReadChunk holds whole elements
      done += n;
    }
    acc.EndInput();
  }
  output->resize(bytes);
  acc.Finish(output->data());
  out->Write(output->data(), bytes);
  ++(readers > 1 ? result->tensors_averaged : result->tensors_copied);
  return out->status();
}

}  // namespace

Result<AverageResult> AverageSafetensors(const std::vector<std::string>& paths, OutputFile* out,
                                         const ProgressFn& progress) {
  std::vector<InputFile> files(paths.size());
  std::vector<SafetensorsHeader> headers;
  std::vector<std::unordered_map<std::string, const SafetensorsTensor*>> by_name(paths.size());
  std::string newest_header;
  for (size_t i = 0; i < paths.size(); ++i) {
    if (Status s = files[i].Open(paths[i]); !s.ok()) return s;
    unsigned char len[8];
    if (files[i].size() < 8) return Status::Corrupt(paths[i] + ": too short for safetensors");
    if (Status s = files[i].ReadAt(0, len, 8); !s.ok()) return s;
    uint64_t n = 0;
    for (int b = 7; b >= 0; --b) n = (n << 8) | len[b];
    if (n > kMaxSafetensorsHeader || 8 + n > files[i].size()) {
      return Status::Corrupt(paths[i] + ": safetensors header length " + std::to_string(n) +
                             " does not fit the file");
    }
    std::string json(n, '\0');
    if (Status s = files[i].ReadAt(8, json.data(), n); !s.ok()) return s;
    Result<SafetensorsHeader> h = ParseSafetensorsHeader(json, n, files[i].size(), paths[i]);
    if (!h.ok()) return h.status();
    headers.push_back(std::move(*h));
    if (i == 0) newest_header = std::string(reinterpret_cast<char*>(len), 8) + json;
  }
  for (size_t i = 0; i < paths.size(); ++i) {
    for (const SafetensorsTensor& t : headers[i].tensors) by_name[i][t.name] = &t;
  }
  for (size_t i = 1; i < paths.size(); ++i) {
    if (by_name[i].size() != by_name[0].size()) {
      for (const auto& [name, t] : by_name[i]) {
        if (by_name[0].count(name) == 0) {
          return Status::Corrupt(paths[i] + ": has tensor '" + name +
                                 "' that the newest member lacks");
        }
      }
    }
    for (const SafetensorsTensor& t : headers[0].tensors) {
      auto it = by_name[i].find(t.name);
      if (it == by_name[i].end())
        return Status::Corrupt(paths[i] + ": has no tensor '" + t.name + "'");
      if (it->second->dtype_name != t.dtype_name || it->second->shape != t.shape) {
        return Status::Corrupt(paths[i] + ": tensor '" + t.name + "' is " + it->second->dtype_name +
                               " of another shape or dtype than in the newest member (" +
                               t.dtype_name + ")");
      }
    }
  }
  AverageResult result;
  result.format = TensorFormat::kSafetensors;
  const uint64_t total = files[0].size() - 8 - headers[0].header_size;
  if (progress) progress({"averaging", 0, static_cast<int64_t>(total)});
  out->Write(newest_header.data(), newest_header.size());
  uint64_t done = 0;
  std::vector<char> piece, output;
  for (const SafetensorsTensor& t : headers[0].tensors) {
    try {
      if (Status s = AverageTensor(files, headers, by_name, t, out, &result, &piece, &output);
          !s.ok()) {
        return s;
      }
    } catch (const std::bad_alloc&) {
      return Status::FromErrno(
          paths[0] + ": tensor '" + t.name + "' (" + std::to_string(t.end - t.begin) + " bytes)",
          ENOMEM);
    }
    done += t.end - t.begin;
    if (progress) progress({"averaging", static_cast<int64_t>(done), static_cast<int64_t>(total)});
  }
  // What was read is what each member holds now, or the average is refused.
  for (const InputFile& f : files) {
    if (Status s = f.CheckUnchanged(); !s.ok()) return s;
  }
  result.bytes = static_cast<int64_t>(total);
  return result;
}

}  // namespace ckptfs::core
