#include "core/safetensors.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <thread>
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

// Bytes [begin, end) of one tensor of the output: the members' average, or
// the newest member's bytes for types that are not averaged. Pieces of
// kAverageChunk bytes are averaged by several threads at once (tensor_io.h);
// `piece` and `output` are the calling thread's, reused from one piece to
// the next.
struct Piece {
  const SafetensorsTensor* tensor;
  uint64_t begin, end;
};

Status AveragePiece(
    const std::vector<InputFile>& files, const std::vector<SafetensorsHeader>& headers,
    const std::vector<std::unordered_map<std::string, const SafetensorsTensor*>>& by_name,
    const Piece& p, OutputFile* out, std::vector<char>* piece, std::vector<char>* output) {
  const SafetensorsTensor& t = *p.tensor;
  const size_t bytes = static_cast<size_t>(p.end - p.begin);
  const size_t item = ItemSize(t.dtype);
  const size_t readers = IsAveraged(t.dtype) ? files.size() : 1;
  if (piece->size() < bytes) piece->resize(bytes);
  const uint64_t to = 8 + headers[0].header_size + t.begin + p.begin;
  if (readers == 1) {
    if (Status s = files[0].ReadAt(to, piece->data(), bytes); !s.ok()) return s;
    return out->WriteAt(to, piece->data(), bytes);
  }
  Accumulator acc(t.dtype, bytes / item);
  for (size_t i = 0; i < readers; ++i) {
    const uint64_t at = 8 + headers[i].header_size + by_name[i].at(t.name)->begin + p.begin;
    if (Status s = files[i].ReadAt(at, piece->data(), bytes); !s.ok()) return s;
    acc.AddPart(piece->data(), 0, bytes / item);  // kAverageChunk holds whole elements
    acc.EndInput();
  }
  if (output->size() < bytes) output->resize(bytes);
  acc.Finish(output->data());
  return out->WriteAt(to, output->data(), bytes);
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
  if (Status s = out->WriteAt(0, newest_header.data(), newest_header.size()); !s.ok()) return s;
  std::vector<Piece> pieces;
  for (const SafetensorsTensor& t : headers[0].tensors) {
    const uint64_t bytes = t.end - t.begin;
    for (uint64_t b = 0; b < bytes; b += kAverageChunk) {
      pieces.push_back({&t, b, std::min(bytes, b + kAverageChunk)});
    }
    ++(IsAveraged(t.dtype) && paths.size() > 1 ? result.tensors_averaged : result.tensors_copied);
  }
  struct Scratch {
    std::vector<char> piece, output;
  };
  std::vector<Scratch> scratch(AverageThreads(pieces.size()));
  std::atomic<unsigned> next_scratch{0};
  std::mutex scratch_mu;
  std::map<std::thread::id, Scratch*> by_thread;
  std::atomic<uint64_t> done{0};
  Status averaged = RunInParallel(
      pieces.size(),
      [&](size_t i) -> Status {
        if (CancelRequested()) return CancelledStatus("averaging " + files[0].path());
        Scratch* mine;
        {
          std::lock_guard<std::mutex> lock(scratch_mu);
          Scratch*& slot = by_thread[std::this_thread::get_id()];
          if (slot == nullptr) slot = &scratch[next_scratch.fetch_add(1)];
          mine = slot;
        }
        const Piece& p = pieces[i];
        Status r;
        try {
          r = AveragePiece(files, headers, by_name, p, out, &mine->piece, &mine->output);
        } catch (const std::bad_alloc&) {
          return Status::FromErrno(paths[0] + ": tensor '" + p.tensor->name + "' (" +
                                       std::to_string(p.end - p.begin) + " bytes)",
                                   ENOMEM);
        }
        if (!r.ok()) return r;
        done.fetch_add(p.end - p.begin);
        return Status::Ok();
      },
      [&] {
        if (progress) {
          progress({"averaging", static_cast<int64_t>(done.load()), static_cast<int64_t>(total)});
        }
      });
  if (!averaged.ok()) return averaged;
  // What was read is what each member holds now, or the average is refused.
  for (const InputFile& f : files) {
    if (Status s = f.CheckUnchanged(); !s.ok()) return s;
  }
  result.bytes = static_cast<int64_t>(total);
  return result;
}

}  // namespace ckptfs::core
