// Conversion to safetensors: see safetensors_convert.h.
//
// Layout chosen: tensors in the byte order of their names (the map
// TorchArchive keeps), each at the next offset (dense, in order). A
// contiguous tensor of a stored record is copied in pieces of kAverageChunk
// bytes with pread / pwrite by RunInParallel's threads; a view that is not
// contiguous (a transpose, a slice with a step) is gathered element by
// element in row-major order into pieces of kAverageChunk bytes, reading
// the span of storage it touches whole when that is at most
// kMaxGatherSpanBytes (one such span at a time), else in tiles, else run by
// run with pread; never reading more than kMaxGatherReadFactor times the
// view's bytes for it. A deflated record (never written by torch.save) is read whole, as
// averaging does. Every record read is checked against its CRC-32, as
// averaging does: through the copy pieces when one contiguous tensor is the
// whole record, else by reading the record once more for it.
#include "core/safetensors_convert.h"

#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <map>
#include <mutex>
#include <new>
#include <nlohmann/json.hpp>
#include <random>
#include <thread>

#include "core/cancel.h"
#include "core/crc32.h"
#include "core/json_text.h"
#include "core/log.h"
#include "core/pickle_audit.h"
#include "core/pickle_inventory.h"
#include "core/safetensors.h"
#include "core/tensor_io.h"
#include "core/torch_archive.h"

namespace ckptfs::core {
namespace {

// A non-contiguous view whose storage span is at most this is read whole
// (one at a time, under a lock) and gathered in memory; a larger one is
// gathered in tiles of at most kGatherTileBytes of output (see TiledGather),
// or, when it has no dimension of adjacent elements, one pread per element.
constexpr uint64_t kMaxGatherSpanBytes = uint64_t{64} << 20;
constexpr uint64_t kGatherTileBytes = uint64_t{4} << 20;
// Neither way may read more than this many times the view's own bytes: a
// view of a few elements spread over a large storage (two floats 32 MiB
// apart), under each of a million names sharing that storage, asked for
// 32 TiB of reading (hours) to write 8 MB. Such a view is read element by
// element (run by run) instead: no more bytes than it has.
constexpr uint64_t kMaxGatherReadFactor = 8;

// One tensor of the output.
struct ConvertTensor {
  std::string name;
  const TensorInfo* info = nullptr;
  const StorageInfo* storage = nullptr;
  const ZipEntry* entry = nullptr;
  std::string dtype;
  size_t item = 1;
  uint64_t nbytes = 0;
  uint64_t out_begin = 0;  // in the data section
  bool contiguous = true;
};

// kMaxConvertAmplification x the input's size + kConvertSlackBytes.
uint64_t ConvertBudget(uint64_t input) {
  uint64_t budget = 0;
  if (__builtin_mul_overflow(input, kMaxConvertAmplification, &budget) ||
      __builtin_add_overflow(budget, kConvertSlackBytes, &budget)) {
    return UINT64_MAX;
  }
  return budget;
}

std::string BudgetText(uint64_t budget, uint64_t input) {
  return std::to_string(budget) + " bytes (" + std::to_string(kMaxConvertAmplification) +
         " x the file's " + std::to_string(input) + " bytes + " +
         std::to_string(kConvertSlackBytes) + ", kMaxConvertAmplification and kConvertSlackBytes)";
}

// The budget (safetensors_convert.h) is checked name by name, so that a
// file asking for too much is refused before anything is written.
Result<std::vector<ConvertTensor>> PlanTensors(const TorchArchive& m, uint64_t* total) {
  std::vector<ConvertTensor> out;
  uint64_t at = 0;
  const uint64_t input = m.zip.file().size();
  const uint64_t budget = ConvertBudget(input);
  for (const auto& [name, info] : m.tensors) {
    ConvertTensor t;
    t.name = name;
    // The header's own key: a tensor of that name takes the next free "#n".
    for (int n = 2; t.name == "__metadata__" || (n > 2 && m.tensors.count(t.name) != 0); ++n) {
      t.name = name + "#" + std::to_string(n);
    }
    t.info = &info;
    t.storage = &m.storages.at(info.key);
    t.entry = m.records.at("data/" + info.key);
    const std::string where = m.path + ": tensor '" + name + "'";
    std::optional<SafetensorsDType> st = SafetensorsDTypeOf(t.storage->dtype, info.dtype);
    if (!st) {
      return Status::Unsupported(where + " has dtype " +
                                 (info.dtype.empty() ? t.storage->type_name : info.dtype) +
                                 ", which safetensors cannot hold");
    }
    t.dtype = st->name;
    t.item = st->item;
    // Element count and extent: pickle.h guarantees they fit in int64.
    int64_t numel = 1, extent = info.offset, expect = 1;
    for (size_t d = info.size.size(); d-- > 0;) {
      numel *= info.size[d];
      if (info.size[d] != 1 && info.stride[d] != expect) t.contiguous = false;
      expect *= info.size[d];
      extent += (info.size[d] - 1) * info.stride[d];
    }
    if (numel == 0) t.contiguous = true;
    uint64_t bytes = 0, end = 0;
    if (__builtin_mul_overflow(static_cast<uint64_t>(numel), t.item, &bytes) ||
        (numel > 0 && __builtin_mul_overflow(static_cast<uint64_t>(extent) + 1, t.item, &end))) {
      return Status::Corrupt(where + ": its size overflows");
    }
    // A typed storage was checked by LoadTorchArchive; an untyped one holds bytes.
    if (numel > 0 && end > static_cast<uint64_t>(t.storage->nbytes)) {
      return Status::Corrupt(where + " reaches past its storage " + info.key);
    }
    t.nbytes = bytes;
    t.out_begin = at;
    if (__builtin_add_overflow(at, bytes, &at) || at > budget) {
      return Status::Unsupported(
          m.path + ": converting it would write " +
          (at < bytes ? std::string("more than 2^64") : "at least " + std::to_string(at)) +
          " bytes of tensor data (tensor '" + name + "' has shape " + Shape(info.size) +
          "), over the conversion budget of " + BudgetText(budget, input) +
          ": a tensor expanded with stride 0, or one storage viewed by many names");
    }
    out.push_back(std::move(t));
  }
  *total = at;
  return out;
}

// Reads n bytes at `offset` of a tensor's storage.
using ReadFn = std::function<Status(uint64_t offset, char* dst, size_t n)>;

// Writes tensor t's elements in row-major order through `out` at `to`
// (file offset of its first byte), reading them with `read`; `buf` is the
// calling thread's scratch space.
Status Gather(const ConvertTensor& t, const ReadFn& read, uint64_t to, OutputFile* out,
              std::vector<char>* buf) {
  const TensorInfo& info = *t.info;
  const size_t rank = info.size.size();
  if (t.nbytes == 0) return Status::Ok();
  // A run: the innermost dimension when its elements are adjacent.
  const bool runs = rank > 0 && info.stride[rank - 1] == 1;
  const uint64_t run = runs ? static_cast<uint64_t>(info.size[rank - 1]) : 1;
  const size_t outer = runs ? rank - 1 : rank;
  if (buf->size() < kAverageChunk) buf->resize(kAverageChunk);
  std::vector<int64_t> index(rank, 0);
  size_t used = 0;
  uint64_t written = 0;
  auto flush = [&]() -> Status {
    if (used == 0) return Status::Ok();
    if (CancelRequested()) return CancelledStatus("converting tensor '" + t.name + "'");
    Status s = out->WriteAt(to + written, buf->data(), used);
    written += used;
    used = 0;
    return s;
  };
  for (uint64_t done = 0; done < t.nbytes;) {
    int64_t element = info.offset;
    for (size_t d = 0; d < outer; ++d) element += index[d] * info.stride[d];
    uint64_t from = static_cast<uint64_t>(element) * t.item;
    for (uint64_t left = run * t.item; left > 0;) {
      if (used == buf->size()) {
        if (Status s = flush(); !s.ok()) return s;
      }
      const size_t n = static_cast<size_t>(std::min<uint64_t>(left, buf->size() - used));
      if (Status s = read(from, buf->data() + used, n); !s.ok()) return s;
      used += n, from += n, left -= n, done += n;
    }
    for (size_t d = outer; d-- > 0;) {  // the odometer
      if (++index[d] < info.size[d]) break;
      index[d] = 0;
    }
  }
  return flush();
}

// A piece of work: bytes [begin, end) of a contiguous tensor (the whole
// tensor otherwise), or, when crc_only, of its storage's record, read only
// for the record's CRC-32. A piece whose bytes count for the record's CRC
// (crc_entry set) records their CRC in `crc`.
struct Piece {
  const ConvertTensor* tensor;
  uint64_t begin, end;
  const ZipEntry* crc_entry = nullptr;
  bool crc_only = false;
  uint32_t crc = 0;
};

struct Scratch {
  std::vector<char> buf, span, read;
};

// A large view is gathered along its dimension k of smallest stride (a
// transpose: the dimension of adjacent elements; a slice with a step: that
// step): for each index of the dimensions before k and each block of B
// indices along k, the block's output elements are contiguous (B x the
// dimensions after k); they are read as runs spanning B elements of stride
// s, one run per index of the dimensions after k, and written as one tile.
// Tile and run are each at most kGatherTileBytes. False (nothing done) when
// no dimension gives a block of at least one index within that.
Result<bool> TiledGather(const ConvertTensor& t, const InputFile& file, uint64_t base, uint64_t to,
                         OutputFile* out, Scratch* scratch) {
  const TensorInfo& info = *t.info;
  const size_t rank = info.size.size();
  size_t k = rank;
  for (size_t d = 0; d < rank; ++d) {
    if (info.size[d] > 1 && info.stride[d] > 0 && (k == rank || info.stride[d] < info.stride[k]))
      k = d;
  }
  if (k == rank) return false;
  const uint64_t step = static_cast<uint64_t>(info.stride[k]);
  uint64_t inner = 1;
  for (size_t d = k + 1; d < rank; ++d) inner *= static_cast<uint64_t>(info.size[d]);
  // A run reads about `step` elements for each one it keeps.
  if (inner * t.item > kGatherTileBytes || step * t.item > kGatherTileBytes ||
      step > kMaxGatherReadFactor) {
    return false;
  }
  const uint64_t block = std::max<uint64_t>(1, kGatherTileBytes / (std::max(inner, step) * t.item));
  std::vector<char>& tile = scratch->span;
  std::vector<char>& run = scratch->buf;
  std::vector<int64_t> prefix(k, 0), index(rank - k - 1, 0);
  uint64_t outer_count = 1;
  for (size_t d = 0; d < k; ++d) outer_count *= static_cast<uint64_t>(info.size[d]);
  const uint64_t along = static_cast<uint64_t>(info.size[k]);
  for (uint64_t o = 0; o < outer_count; ++o) {
    int64_t first = info.offset;
    for (size_t d = 0; d < k; ++d) first += prefix[d] * info.stride[d];
    for (uint64_t b = 0; b < along; b += block) {
      if (CancelRequested()) return CancelledStatus("converting tensor '" + t.name + "'");
      const uint64_t n = std::min(block, along - b);
      tile.resize(static_cast<size_t>(n * inner * t.item));
      run.resize(static_cast<size_t>(((n - 1) * step + 1) * t.item));
      std::fill(index.begin(), index.end(), 0);
      for (uint64_t i = 0; i < inner; ++i) {
        int64_t element = first + static_cast<int64_t>(b * step);
        for (size_t d = k + 1; d < rank; ++d) element += index[d - k - 1] * info.stride[d];
        Status s =
            file.ReadAt(base + static_cast<uint64_t>(element) * t.item, run.data(), run.size());
        if (!s.ok()) return s;
        for (uint64_t j = 0; j < n; ++j) {
          std::memcpy(tile.data() + (j * inner + i) * t.item, run.data() + j * step * t.item,
                      t.item);
        }
        for (size_t d = rank - k - 1; d-- > 0;) {  // the odometer of the dimensions after k
          if (++index[d] < info.size[k + 1 + d]) break;
          index[d] = 0;
        }
      }
      const uint64_t at = ((o * along + b) * inner) * t.item;
      if (Status s = out->WriteAt(to + at, tile.data(), tile.size()); !s.ok()) return s;
    }
    for (size_t d = k; d-- > 0;) {  // the odometer of the dimensions before k
      if (++prefix[d] < info.size[d]) break;
      prefix[d] = 0;
    }
  }
  tile = {};
  return true;
}

Status ConvertPiece(const TorchArchive& m, Piece* piece, uint64_t data_start, OutputFile* out,
                    Scratch* scratch, std::mutex* span_mu) {
  const Piece& p = *piece;
  const ConvertTensor& t = *p.tensor;
  const TensorInfo& info = *t.info;
  const InputFile& file = m.zip.file();
  const uint64_t base = t.entry->data_offset;
  const uint64_t to = data_start + t.out_begin;
  if (t.entry->method != ZipEntry::kStored) {
    // Deflated: the storage whole, then copied or gathered from memory.
    std::vector<char>& whole = scratch->span;
    whole.assign(static_cast<size_t>(t.storage->nbytes), 0);
    Status s = ReadStorage(
        m, info.key, *t.storage,
        [&](uint64_t offset, const char* data, size_t n) {
          if (n > 0) std::memcpy(whole.data() + offset, data, n);
        },
        &scratch->read);
    if (!s.ok()) return s;
    ReadFn from_memory = [&](uint64_t offset, char* dst, size_t n) {
      std::memcpy(dst, whole.data() + offset, n);
      return Status::Ok();
    };
    s = Gather(t, from_memory, to, out, &scratch->buf);
    whole = {};
    return s;
  }
  if (p.crc_only || t.contiguous) {
    const size_t n = static_cast<size_t>(p.end - p.begin);
    if (scratch->buf.size() < n) scratch->buf.resize(n);
    const uint64_t from =
        base + (p.crc_only ? 0 : static_cast<uint64_t>(info.offset) * t.item) + p.begin;
    if (Status s = file.ReadAt(from, scratch->buf.data(), n); !s.ok()) return s;
    if (p.crc_entry != nullptr) {
      piece->crc = Crc32(0, scratch->buf.data(), n);
    }
    if (p.crc_only) return Status::Ok();
    return out->WriteAt(to + p.begin, scratch->buf.data(), n);
  }
  int64_t extent = info.offset;
  for (size_t d = 0; d < info.size.size(); ++d) extent += (info.size[d] - 1) * info.stride[d];
  const uint64_t first = static_cast<uint64_t>(info.offset) * t.item;
  const uint64_t span = (static_cast<uint64_t>(extent) + 1) * t.item - first;
  if (span <= kMaxGatherSpanBytes && span / kMaxGatherReadFactor <= t.nbytes) {
    std::lock_guard<std::mutex> one_span(*span_mu);
    std::vector<char>& mem = scratch->span;
    mem.resize(static_cast<size_t>(span));
    if (Status s = file.ReadAt(base + first, mem.data(), mem.size()); !s.ok()) return s;
    ReadFn from_span = [&](uint64_t offset, char* dst, size_t n) {
      std::memcpy(dst, mem.data() + (offset - first), n);
      return Status::Ok();
    };
    Status s = Gather(t, from_span, to, out, &scratch->buf);
    mem = {};
    return s;
  }
  if (Result<bool> tiled = TiledGather(t, file, base, to, out, scratch); !tiled.ok() || *tiled) {
    return tiled.ok() ? Status::Ok() : tiled.status();
  }
  ReadFn from_file = [&](uint64_t offset, char* dst, size_t n) {
    return file.ReadAt(base + offset, dst, n);
  };
  return Gather(t, from_file, to, out, &scratch->buf);
}

// The header: 8-byte little-endian length, then JSON padded with spaces so
// that the data starts at a multiple of 8.
Result<std::string> Header(const TorchArchive& m, const std::vector<ConvertTensor>& tensors,
                           const std::vector<PickleValue>& values,
                           const std::vector<std::string>& unsafe) {
  // safetensors' reader (serde_json) refuses a key that is not UTF-8 as
  // DumpJson would write it (\udcXY escapes): refused here instead of
  // writing a file it cannot load. A value's text is inside a JSON string.
  auto not_utf8 = [&m](const char* what, const std::string& name) {
    return Status::Unsupported(m.path + ": " + what + " " + JsonQuote(name) +
                               " is not UTF-8, which a safetensors header cannot hold");
  };
  for (const ConvertTensor& t : tensors) {
    if (!IsUtf8(t.name)) return not_utf8("tensor name", t.name);
  }
  for (const PickleValue& v : values) {
    if (!IsUtf8(v.name)) return not_utf8("value name", v.name);
  }
  nlohmann::ordered_json doc = nlohmann::ordered_json::object();
  nlohmann::ordered_json meta = nlohmann::ordered_json::object();
  meta["format"] = "pt";  // what transformers expects of a PyTorch safetensors file
  if (!unsafe.empty()) {
    nlohmann::ordered_json list = nlohmann::ordered_json::array();
    for (const std::string& g : unsafe) list.push_back(g);
    meta["ckptfs.unsafe_globals"] = DumpJson(list);
  }
  for (const PickleValue& v : values) {
    std::string key = v.name;
    for (int n = 2; meta.contains(key); ++n) key = v.name + "#" + std::to_string(n);
    meta[key] = v.json;
  }
  doc["__metadata__"] = std::move(meta);
  for (const ConvertTensor& t : tensors) {
    nlohmann::ordered_json e = nlohmann::ordered_json::object();
    e["dtype"] = t.dtype;
    e["shape"] = t.info->size;
    e["data_offsets"] = {t.out_begin, t.out_begin + t.nbytes};
    doc[t.name] = std::move(e);
  }
  std::string json = DumpJson(doc);
  json.append((8 - json.size() % 8) % 8, ' ');
  if (json.size() > kMaxSafetensorsHeader) {
    return Status::Unsupported(m.path + ": the safetensors header would be " +
                               std::to_string(json.size()) + " bytes, over safetensors' limit of " +
                               std::to_string(kMaxSafetensorsHeader) +
                               " (kMaxSafetensorsHeader): too many names or values");
  }
  std::string out(8, '\0');
  for (int b = 0; b < 8; ++b) out[b] = static_cast<char>((json.size() >> (8 * b)) & 0xff);
  return out + json;
}

Result<ConvertResult> Convert(const std::string& input, OutputFile* out,
                              const ProgressFn& progress) {
  TorchArchive m;
  if (Status s = LoadTorchArchive(input, &m, /*keep_graph=*/true); !s.ok()) return s;
  Result<std::vector<PickleValue>> values = PickleValues(m.graph.root, input + ":data.pkl");
  if (!values.ok()) return values.status();
  Result<std::vector<PickleGlobal>> globals = PickleGlobals(m.graph, input + ":data.pkl");
  if (!globals.ok()) return globals.status();
  ConvertResult result;
  for (const PickleGlobal& g : *globals) {
    if (!WeightsOnlyAllowed(g.name)) result.unsafe_globals.push_back(g.name);
  }
  uint64_t total = 0;
  Result<std::vector<ConvertTensor>> tensors = PlanTensors(m, &total);
  if (!tensors.ok()) return tensors.status();
  // A deflated record is inflated whole for each name of it: after the
  // first, those inflations count against the budget too (a million
  // two-element views of one deflated 32 MiB storage: 32 TiB inflated).
  {
    std::map<const ZipEntry*, bool> inflated;
    uint64_t again = 0;
    const uint64_t size = m.zip.file().size(), budget = ConvertBudget(size);
    for (const ConvertTensor& t : *tensors) {
      if (t.entry->method == ZipEntry::kStored || t.nbytes == 0 ||
          inflated.emplace(t.entry, true).second) {
        continue;
      }
      again += static_cast<uint64_t>(t.storage->nbytes);
      if (again > budget) {
        return Status::Unsupported(
            input + ": tensor '" + t.name + "' of deflated record " + t.entry->name +
            ": inflating it once more per name would take over " + BudgetText(budget, size));
      }
    }
  }
  Result<std::string> header = Header(m, *tensors, *values, result.unsafe_globals);
  if (!header.ok()) return header.status();
  if (!result.unsafe_globals.empty()) {
    std::string names;
    // Quoted: a name from STACK_GLOBAL may hold a newline or a terminal
    // escape, which would forge log lines.
    for (const std::string& g : result.unsafe_globals) {
      names += (names.empty() ? "" : ", ") + PrintableName(g);
    }
    Log(LogLevel::kWarning,
        "%s: its pickle references globals outside torch's weights_only allow-list (%s); "
        "converted without running them, listed in __metadata__ as ckptfs.unsafe_globals",
        input.c_str(), names.c_str());
  }
  if (Status s = out->WriteAt(0, header->data(), header->size()); !s.ok()) return s;
  const uint64_t data_start = header->size();

  // Every stored record read is checked against its CRC-32 (a deflated one
  // is, by ReadStorage): through the pieces of a contiguous tensor that is
  // the whole record, else by pieces that read the record for its CRC only.
  std::map<const ZipEntry*, const ConvertTensor*> whole;
  for (const ConvertTensor& t : *tensors) {
    if (t.entry->method == ZipEntry::kStored && t.contiguous && t.info->offset == 0 &&
        t.nbytes == t.entry->size) {
      whole.emplace(t.entry, &t);
    }
  }
  std::vector<Piece> pieces;
  std::map<const ZipEntry*, bool> checked;
  for (const ConvertTensor& t : *tensors) {
    const bool stored = t.entry->method == ZipEntry::kStored;
    auto w = whole.find(t.entry);
    const bool counts = stored && w != whole.end() && w->second == &t;
    if (stored && t.contiguous) {
      for (uint64_t b = 0; b < t.nbytes; b += kAverageChunk) {
        pieces.push_back(
            {&t, b, std::min(t.nbytes, b + kAverageChunk), counts ? t.entry : nullptr});
      }
    } else if (t.nbytes > 0) {
      pieces.push_back({&t, 0, t.nbytes});
    }
    if (stored && w == whole.end() && checked.emplace(t.entry, true).second) {
      for (uint64_t b = 0; b < t.entry->size; b += kAverageChunk) {
        pieces.push_back(
            {&t, b, std::min(t.entry->size, b + kAverageChunk), t.entry, /*crc_only=*/true});
      }
    }
  }
  if (progress) progress({"converting", 0, static_cast<int64_t>(total)});
  std::vector<Scratch> scratch(AverageThreads(pieces.size()));
  std::atomic<unsigned> next_scratch{0};
  std::mutex scratch_mu, span_mu;
  std::map<std::thread::id, Scratch*> by_thread;
  std::atomic<int64_t> done{0};
  Status s = RunInParallel(
      pieces.size(),
      [&](size_t i) -> Status {
        if (CancelRequested()) return CancelledStatus("converting " + input);
        Scratch* mine;
        {
          std::lock_guard<std::mutex> lock(scratch_mu);
          Scratch*& slot = by_thread[std::this_thread::get_id()];
          if (slot == nullptr) slot = &scratch[next_scratch.fetch_add(1)];
          mine = slot;
        }
        Piece& p = pieces[i];
        Status r = ConvertPiece(m, &p, data_start, out, mine, &span_mu);
        if (!r.ok()) {
          if (r.code() == StatusCode::kIoError) {
            if (r.sys_errno() == ENOMEM) {
              return Status::FromErrno(input + ": tensor '" + p.tensor->name + "'", ENOMEM);
            }
            return r;
          }
          if (r.message().find("(tensor '") == std::string::npos) {
            return Status::Corrupt(r.message() + " (tensor '" + p.tensor->name + "')");
          }
          return r;
        }
        if (!p.crc_only) done.fetch_add(static_cast<int64_t>(p.end - p.begin));
        return Status::Ok();
      },
      [&] {
        if (progress) progress({"converting", done.load(), static_cast<int64_t>(total)});
      });
  if (!s.ok()) return s;
  // Pieces of one record are consecutive and in order.
  std::map<const ZipEntry*, std::pair<uint32_t, const ConvertTensor*>> crc;
  for (const Piece& p : pieces) {
    if (p.crc_entry == nullptr) continue;
    auto& [c, t] = crc[p.crc_entry];
    c = static_cast<uint32_t>(crc32_combine(c, p.crc, static_cast<z_off_t>(p.end - p.begin)));
    t = p.tensor;
  }
  for (const auto& [entry, c] : crc) {
    if (c.first != entry->crc32) {
      return Status::Corrupt(input + ": entry '" + entry->name +
                             "': CRC-32 mismatch (corrupt, or changed while it was read) "
                             "(tensor '" +
                             c.second->name + "')");
    }
  }
  // What was read is what the file holds now, or the conversion is refused.
  if (Status c = m.zip.file().CheckUnchanged(); !c.ok()) return c;
  result.tensors = static_cast<int>(tensors->size());
  result.bytes = static_cast<int64_t>(total);
  return result;
}

}  // namespace

Result<ConvertResult> ConvertToSafetensors(const std::string& input, const std::string& out_path,
                                           const ProgressFn& progress) {
  Result<TensorFormat> format = DetectFormat(input);
  if (!format.ok()) return format.status();
  if (*format != TensorFormat::kTorchZip) {
    return Status::Unsupported(input + ": is " + TensorFormatName(*format) +
                               ", not a PyTorch zip checkpoint: nothing to convert");
  }
  Result<ConvertResult> result = ConvertResult{};
  Status written = WriteAndRename(
      out_path, "converting " + input,
      [&](OutputFile* out) {
        result = Convert(input, out, progress);
        return result.status();
      },
      progress, [&] { return result.ok() ? result->bytes : 0; });
  if (!written.ok()) return written;
  return result;
}

}  // namespace ckptfs::core
