#include "core/safetensors.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <memory>
#include <nlohmann/json.hpp>
#include <set>
#include <unordered_map>

#include "core/tensor_io.h"

namespace ckptfs::core {

Result<SafetensorsHeader> ParseSafetensorsHeader(std::string_view header_json, uint64_t header_size,
                                                 uint64_t file_size, const std::string& origin) {
  if (header_size > kMaxSafetensorsHeader) return Status::Corrupt(origin + ": safetensors header too large");
  if (8 + header_size > file_size) return Status::Corrupt(origin + ": truncated safetensors header");
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
    uint64_t numel = 1;
    for (const auto& d : entry["shape"]) {
      if (!d.is_number_unsigned()) return Status::Corrupt(where + ": bad shape");
      const uint64_t v = d.get<uint64_t>();
      if (v != 0 && numel > UINT64_MAX / v) return Status::Corrupt(where + ": shape overflows");
      numel *= v;
      t.shape.push_back(static_cast<int64_t>(v));
    }
    const auto& off = entry["data_offsets"];
    if (!off[0].is_number_unsigned() || !off[1].is_number_unsigned()) {
      return Status::Corrupt(where + ": bad data_offsets");
    }
    t.begin = off[0].get<uint64_t>();
    t.end = off[1].get<uint64_t>();
    const uint64_t item = t.dtype == DType::kOpaque ? 0 : ItemSize(t.dtype);
    if (t.end < t.begin || (item != 0 && t.end - t.begin != numel * item)) {
      return Status::Corrupt(where + ": data_offsets do not match its shape and dtype");
    }
    h.tensors.push_back(std::move(t));
  }
  std::sort(h.tensors.begin(), h.tensors.end(),
            [](const SafetensorsTensor& a, const SafetensorsTensor& b) { return a.begin < b.begin; });
  uint64_t expect = 0;
  for (const SafetensorsTensor& t : h.tensors) {
    if (t.begin != expect) {
      return Status::Corrupt(origin + ": tensor '" + t.name + "' does not start where the previous ends");
    }
    expect = t.end;
  }
  if (8 + header_size + expect != file_size) {
    return Status::Corrupt(origin + ": data section is " + std::to_string(file_size - 8 - header_size) +
                           " bytes, the header describes " + std::to_string(expect));
  }
  return h;
}

namespace {

class InputFile {
 public:
  ~InputFile() {
    if (fd >= 0) ::close(fd);
  }
  Status Open(const std::string& p) {
    path = p;
    fd = ::open(p.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return Status::FromErrno(p, errno);
    struct stat st {};
    if (::fstat(fd, &st) != 0) return Status::FromErrno(p, errno);
    size = static_cast<uint64_t>(st.st_size);
    return Status::Ok();
  }
  Status ReadAt(uint64_t offset, void* buf, size_t n) const {
    char* p = static_cast<char*>(buf);
    while (n > 0) {
      ssize_t got = ::pread(fd, p, n, static_cast<off_t>(offset));
      if (got < 0) {
        if (errno == EINTR) continue;
        return Status::FromErrno(path, errno);
      }
      if (got == 0) return Status::Corrupt(path + ": truncated");
      p += got, n -= static_cast<size_t>(got), offset += static_cast<uint64_t>(got);
    }
    return Status::Ok();
  }
  std::string path;
  int fd = -1;
  uint64_t size = 0;
};

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
    if (files[i].size < 8) return Status::Corrupt(paths[i] + ": too short for safetensors");
    if (Status s = files[i].ReadAt(0, len, 8); !s.ok()) return s;
    uint64_t n = 0;
    for (int b = 7; b >= 0; --b) n = (n << 8) | len[b];
    if (n > kMaxSafetensorsHeader || 8 + n > files[i].size) {
      return Status::Corrupt(paths[i] + ": safetensors header length " + std::to_string(n) +
                             " does not fit the file");
    }
    std::string json(n, '\0');
    if (Status s = files[i].ReadAt(8, json.data(), n); !s.ok()) return s;
    Result<SafetensorsHeader> h = ParseSafetensorsHeader(json, n, files[i].size, paths[i]);
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
          return Status::Corrupt(paths[i] + ": has tensor '" + name + "' that the newest member lacks");
        }
      }
    }
    for (const SafetensorsTensor& t : headers[0].tensors) {
      auto it = by_name[i].find(t.name);
      if (it == by_name[i].end()) return Status::Corrupt(paths[i] + ": has no tensor '" + t.name + "'");
      if (it->second->dtype_name != t.dtype_name || it->second->shape != t.shape) {
        return Status::Corrupt(paths[i] + ": tensor '" + t.name + "' is " + it->second->dtype_name +
                               " of another shape or dtype than in the newest member (" +
                               t.dtype_name + ")");
      }
    }
  }
  AverageResult result;
  result.format = TensorFormat::kSafetensors;
  const uint64_t total = files[0].size - 8 - headers[0].header_size;
  if (progress) progress({"averaging", 0, static_cast<int64_t>(total)});
  out->Write(newest_header.data(), newest_header.size());
  std::vector<char> buf, averaged;
  uint64_t done = 0;
  for (const SafetensorsTensor& t : headers[0].tensors) {
    const size_t bytes = t.end - t.begin;
    const size_t count = t.dtype == DType::kOpaque ? bytes : bytes / ItemSize(t.dtype);
    const size_t readers = IsAveraged(t.dtype) ? paths.size() : 1;
    Accumulator acc(t.dtype, count);
    buf.resize(bytes);
    for (size_t i = 0; i < readers; ++i) {
      const SafetensorsTensor* mine = by_name[i].at(t.name);
      const uint64_t at = 8 + headers[i].header_size + mine->begin;
      if (Status s = files[i].ReadAt(at, buf.data(), bytes); !s.ok()) return s;
      acc.Add(buf.data());
    }
    averaged.resize(bytes);
    acc.Finish(averaged.data());
    out->Write(averaged.data(), bytes);
    if (!out->status().ok()) return out->status();
    ++(readers > 1 ? result.tensors_averaged : result.tensors_copied);
    done += bytes;
    if (progress) progress({"averaging", static_cast<int64_t>(done), static_cast<int64_t>(total)});
  }
  result.bytes = static_cast<int64_t>(total);
  return result;
}

}  // namespace ckptfs::core
