// Averaging PyTorch zip checkpoints (torch.save since 1.6). Members are read
// through core's bounded zip reader (zip_reader.h: pread, sizes checked
// before anything is allocated, deflated entries inflated within budget,
// CRC-32 checked). The output is a zip archive laid out as libtorch's
// PyTorchStreamWriter lays it out (stored records, data aligned to 64 bytes
// by an "FB" extra field, zip64 where sizes or offsets need it), written by
// ZipLayout below: its size is known from the newest member's structure
// before anything is averaged, and records are written in place (pwrite)
// by several threads at once.
//
// Parallelism: every storage is cut into pieces of kAverageChunk bytes of
// output; up to kMaxAverageThreads threads (no more than the machine's
// hardware threads) each take the next piece, read it from every member,
// sum it in float32 (float64 for f64) and write it. CRC-32s of the pieces
// read are combined in order and checked against each member's record; a
// storage deflated in some member is read whole, as one piece.
//
// Budgets: kMaxPickleBytes, the largest data.pkl read into memory (a
// deflated one too: its declared size is checked before it is inflated).
// Memory: per thread, one piece read, its sum and its output (about
// 4 × kAverageChunk); a deflated storage: its size, twice.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cpuid.h>
#include <fcntl.h>
#include <immintrin.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <optional>
#include <set>
#include <system_error>
#include <thread>

#include "core/cancel.h"
#include "core/dtype.h"
#include "core/pickle.h"
#include "core/tensor_io.h"
#include "core/zip_reader.h"

namespace ckptfs::core {
namespace {

// Real data.pkl files hold the structure of a checkpoint, not its tensors:
// kilobytes to a few megabytes, more when a checkpoint pickles big Python
// objects inline. Beyond this it is refused before being read.
constexpr uint64_t kMaxPickleBytes = uint64_t{256} << 20;

struct StorageInfo {
  DType dtype = DType::kOpaque;
  std::string type_name;
  int64_t numel = 0;
  int64_t nbytes = 0;
  std::string first_tensor;  // a tensor using it, to name in messages
};

struct TensorInfo {
  std::string key;
  int64_t offset = 0;
  std::vector<int64_t> size;
  std::vector<int64_t> stride;
  std::string dtype;  // v3 dtype, if any
};

struct Member {
  std::string path;
  ZipArchive zip;
  std::map<std::string, const ZipEntry*> records;  // by name inside the archive's folder
  std::string pickle;
  std::string byteorder;                        // the record's bytes, if any
  std::map<std::string, StorageInfo> storages;  // by key, sorted as torch 1.13 writes them
  std::map<std::string, TensorInfo> tensors;    // by path
};

std::string Shape(const std::vector<int64_t>& v) {
  std::string s = "[";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? "," : "") + std::to_string(v[i]);
  return s + "]";
}

bool KnownRecord(const std::string& name) {
  static const std::set<std::string> kKnown = {"data.pkl",
                                               "version",
                                               ".data/version",
                                               "byteorder",
                                               ".data/serialization_id",
                                               ".format_version",
                                               ".storage_alignment"};
  return kKnown.count(name) != 0 || name.rfind("data/", 0) == 0;
}

// numel × item size, or nullopt when it overflows or numel is negative.
std::optional<int64_t> Bytes(int64_t numel, size_t item) {
  int64_t n = 0;
  if (numel < 0 || __builtin_mul_overflow(numel, static_cast<int64_t>(item), &n))
    return std::nullopt;
  return n;
}

// The largest element index a non-empty tensor reaches in its storage
// (offset + sum of (size - 1) × stride; sizes, strides and offset not
// negative), or nullopt when that overflows.
std::optional<int64_t> Extent(const pickle::Object& t) {
  int64_t extent = t.offset;
  for (size_t d = 0; d < t.size.size(); ++d) {
    int64_t step = 0;
    if (__builtin_mul_overflow(t.size[d] - 1, t.stride[d], &step) ||
        __builtin_add_overflow(extent, step, &extent)) {
      return std::nullopt;
    }
  }
  return extent;
}

Status Load(const std::string& path, Member* m) {
  m->path = path;
  if (Status s = m->zip.Open(path); !s.ok()) return s;
  // As libtorch's reader: every record lies in the folder of the first one.
  if (m->zip.entries().empty()) return Status::Corrupt(path + ": an empty zip archive");
  const std::string& first = m->zip.entries().front().name;
  const size_t slash = first.find('/');
  if (slash == std::string::npos) {
    return Status::Corrupt(path + ": record '" + first + "' is not in the archive's folder");
  }
  const std::string prefix = first.substr(0, slash + 1);
  for (const ZipEntry& e : m->zip.entries()) {
    if (e.name.compare(0, prefix.size(), prefix) != 0) {
      return Status::Corrupt(path + ": record '" + e.name + "' is outside the archive's folder " +
                             prefix);
    }
    const std::string name = e.name.substr(prefix.size());
    if (!KnownRecord(name)) {
      return Status::Unsupported(path + ": holds record '" + name +
                                 "' (a TorchScript or other archive), not a torch.save checkpoint");
    }
    m->records[name] = &e;
  }
  if (m->records.count("version") == 0 && m->records.count(".data/version") == 0) {
    return Status::Corrupt(path + ": no version record (torch.load refuses such a file)");
  }
  if (m->records.count("data.pkl") == 0) return Status::Corrupt(path + ": no data.pkl record");
  Result<std::string> pkl =
      m->zip.Read(*m->records["data.pkl"], kMaxPickleBytes, "kMaxPickleBytes");
  if (!pkl.ok()) return pkl.status();
  m->pickle = std::move(*pkl);
  if (auto it = m->records.find("byteorder"); it != m->records.end()) {
    Result<std::string> order = m->zip.Read(*it->second, 16, "16 bytes for byteorder");
    if (!order.ok()) return order.status();
    if (*order != "little") {
      return Status::Unsupported(path + ": byte order '" + *order +
                                 "' (only little-endian files are averaged)");
    }
    m->byteorder = std::move(*order);
  }

  Result<pickle::Unpickled> parsed = pickle::Unpickle(m->pickle, path + ":data.pkl");
  if (!parsed.ok()) return parsed.status();
  Result<std::vector<pickle::TensorEntry>> tensors = pickle::FindTensors(parsed->root, path);
  if (!tensors.ok()) return tensors.status();
  for (const pickle::TensorEntry& t : *tensors) {
    const pickle::Object& st = *t.tensor->storage;
    std::optional<DType> dtype = DTypeFromStorage(st.storage_type);
    if (!dtype) {
      return Status::Unsupported(path + ": tensor '" + t.path + "' has storage type " +
                                 st.storage_type);
    }
    StorageInfo& info = m->storages[st.storage_key];
    if (info.type_name.empty()) {
      std::optional<int64_t> nbytes = Bytes(st.storage_numel, ItemSize(*dtype));
      if (!nbytes) {
        return Status::Corrupt(path + ": storage " + st.storage_key + " of tensor '" + t.path +
                               "' has an impossible size (" + std::to_string(st.storage_numel) +
                               " elements)");
      }
      info.dtype = *dtype;
      info.type_name = st.storage_type;
      info.numel = st.storage_numel;
      info.nbytes = *nbytes;
      info.first_tensor = t.path;
    }
    // The tensor must lie inside its storage, or torch.load itself would fail.
    const pickle::Object& tensor = *t.tensor;
    bool empty = false;
    if (tensor.size.size() != tensor.stride.size() || tensor.offset < 0) {
      return Status::Corrupt(path + ": tensor '" + t.path +
                             "' has a malformed size, stride or offset");
    }
    for (size_t d = 0; d < tensor.size.size(); ++d) {
      if (tensor.size[d] < 0 || tensor.stride[d] < 0) {
        return Status::Corrupt(path + ": tensor '" + t.path + "' has a negative size or stride");
      }
      empty = empty || tensor.size[d] == 0;
    }
    if (*dtype != DType::kOpaque && !empty) {
      std::optional<int64_t> extent = Extent(tensor);
      if (!extent || *extent >= info.numel) {
        return Status::Corrupt(path + ": tensor '" + t.path + "' reaches past its storage " +
                               st.storage_key);
      }
    }
    std::string key = t.path;
    for (int n = 2; m->tensors.count(key) != 0; ++n) key = t.path + "#" + std::to_string(n);
    m->tensors[key] = {st.storage_key, t.tensor->offset, t.tensor->size, t.tensor->stride,
                       t.tensor->tensor_dtype};
  }
  // Each storage's record holds at least its bytes: checked here, before
  // anything of that size is allocated.
  for (const auto& [key, info] : m->storages) {
    auto it = m->records.find("data/" + key);
    if (it == m->records.end()) {
      return Status::Corrupt(path + ": storage " + key + " of tensor '" + info.first_tensor +
                             "' has no data record");
    }
    if (it->second->size < static_cast<uint64_t>(info.nbytes)) {
      return Status::Corrupt(path + ": record data/" + key + " holds " +
                             std::to_string(it->second->size) + " bytes, tensor '" +
                             info.first_tensor + "' needs " + std::to_string(info.nbytes) +
                             " (truncated or corrupt file)");
    }
  }
  return Status::Ok();
}

// Members must agree with the newest on every tensor: the same paths, shapes,
// dtypes and layout in their storages, and the same storage sharing. Storage
// keys may differ (they are numbered in pickling order); `key_map` receives,
// for each storage key of the newest member, the member's key.
Status Compare(const Member& newest, const Member& m, std::map<std::string, std::string>* key_map) {
  for (const auto& [path, t] : newest.tensors) {
    if (m.tensors.count(path) == 0) {
      return Status::Corrupt(m.path + ": has no tensor '" + path + "' (the newest member " +
                             newest.path + " has)");
    }
  }
  for (const auto& [path, t] : m.tensors) {
    if (newest.tensors.count(path) == 0) {
      return Status::Corrupt(m.path + ": has tensor '" + path + "' that the newest member " +
                             newest.path + " lacks");
    }
  }
  for (const auto& [path, t] : newest.tensors) {
    const TensorInfo& u = m.tensors.at(path);
    const StorageInfo& a = newest.storages.at(t.key);
    const StorageInfo& b = m.storages.at(u.key);
    if (a.type_name != b.type_name || u.dtype != t.dtype) {
      return Status::Corrupt(m.path + ": tensor '" + path + "' is " + b.type_name + u.dtype +
                             ", the newest member has " + a.type_name + t.dtype);
    }
    if (u.size != t.size) {
      return Status::Corrupt(m.path + ": tensor '" + path + "' has shape " + Shape(u.size) +
                             ", the newest member has " + Shape(t.size));
    }
    if (u.offset != t.offset || u.stride != t.stride || a.numel != b.numel) {
      return Status::Corrupt(m.path + ": tensor '" + path +
                             "' is laid out differently in its storage than in the newest member");
    }
    auto [it, inserted] = key_map->emplace(t.key, u.key);
    if (!inserted && it->second != u.key) {
      return Status::Corrupt(m.path + ": tensor '" + path +
                             "' shares storage differently than in the newest member");
    }
  }
  std::set<std::string> used;
  for (const auto& [from, to] : *key_map) {
    if (!used.insert(to).second) {
      return Status::Corrupt(m.path + ": storage " + to +
                             " is shared by tensors that the newest member keeps apart");
    }
  }
  return Status::Ok();
}

// torch.save aligns every record's data to this (PyTorchStreamWriter).
constexpr uint64_t kAlignment = 64;
constexpr uint64_t kZip32Max = 0xFFFFFFFF;

void Put16(std::string* s, uint16_t v) {
  s->push_back(static_cast<char>(v & 0xFF));
  s->push_back(static_cast<char>(v >> 8));
}
void Put32(std::string* s, uint32_t v) {
  for (int i = 0; i < 4; ++i) s->push_back(static_cast<char>((v >> (8 * i)) & 0xFF));
}
void Put64(std::string* s, uint64_t v) {
  for (int i = 0; i < 8; ++i) s->push_back(static_cast<char>((v >> (8 * i)) & 0xFF));
}

// The output archive, laid out before anything is written: where each
// record's local header and data go, as PyTorchStreamWriter places them
// (stored, data aligned to kAlignment by an "FB" extra field of 'Z's; a
// zip64 extra field where a size or offset needs 64 bits).
class ZipLayout {
 public:
  struct Record {
    std::string name;  // in the archive, with its folder
    uint64_t size = 0;
    uint64_t header_offset = 0;
    uint64_t data_offset = 0;
    uint32_t crc = 0;  // set once its data is written
  };

  size_t Add(const std::string& name, uint64_t size) {
    Record r;
    r.name = "archive/" + name;
    r.size = size;
    r.header_offset = end_;
    const uint64_t base = end_ + 30 + r.name.size() + (size >= kZip32Max ? 20 : 0) + 4;
    r.data_offset = base + (kAlignment - base % kAlignment) % kAlignment;
    end_ = r.data_offset + size;
    records_.push_back(std::move(r));
    return records_.size() - 1;
  }
  Record& record(size_t i) { return records_[i]; }

  std::string LocalHeader(const Record& r) const {
    const bool zip64 = r.size >= kZip32Max;
    const uint64_t fixed = 30 + r.name.size() + (zip64 ? 20 : 0) + 4;
    const uint16_t pad = static_cast<uint16_t>(r.data_offset - r.header_offset - fixed);
    std::string h;
    Put32(&h, 0x04034b50);
    Put16(&h, zip64 ? 45 : 20);
    Put16(&h, 0);  // flags
    Put16(&h, 0);  // stored
    Put16(&h, 0);  // time: fixed, so equal inputs give equal bytes
    Put16(&h, 0x21);
    Put32(&h, r.crc);
    Put32(&h, zip64 ? 0xFFFFFFFF : static_cast<uint32_t>(r.size));
    Put32(&h, zip64 ? 0xFFFFFFFF : static_cast<uint32_t>(r.size));
    Put16(&h, static_cast<uint16_t>(r.name.size()));
    Put16(&h, static_cast<uint16_t>((zip64 ? 20 : 0) + 4 + pad));
    h += r.name;
    if (zip64) {
      Put16(&h, 1);
      Put16(&h, 16);
      Put64(&h, r.size);
      Put64(&h, r.size);
    }
    Put16(&h, 0x4246);  // "FB"
    Put16(&h, pad);
    h.append(pad, 'Z');
    return h;
  }

  // The central directory and the end records, written at data_end().
  std::string Directory() const {
    std::string d;
    for (const Record& r : records_) {
      const bool big = r.size >= kZip32Max, far = r.header_offset >= kZip32Max;
      std::string extra;
      if (big || far) {
        Put16(&extra, 1);
        Put16(&extra, static_cast<uint16_t>((big ? 16 : 0) + (far ? 8 : 0)));
        if (big) Put64(&extra, r.size), Put64(&extra, r.size);
        if (far) Put64(&extra, r.header_offset);
      }
      Put32(&d, 0x02014b50);
      Put16(&d, 45);  // made by
      Put16(&d, big || far ? 45 : 20);
      Put16(&d, 0);
      Put16(&d, 0);
      Put16(&d, 0);
      Put16(&d, 0x21);
      Put32(&d, r.crc);
      Put32(&d, big ? 0xFFFFFFFF : static_cast<uint32_t>(r.size));
      Put32(&d, big ? 0xFFFFFFFF : static_cast<uint32_t>(r.size));
      Put16(&d, static_cast<uint16_t>(r.name.size()));
      Put16(&d, static_cast<uint16_t>(extra.size()));
      Put16(&d, 0);  // comment
      Put16(&d, 0);  // disk
      Put16(&d, 0);  // internal attributes
      Put32(&d, 0);  // external attributes
      Put32(&d, far ? 0xFFFFFFFF : static_cast<uint32_t>(r.header_offset));
      d += r.name;
      d += extra;
    }
    const uint64_t count = records_.size(), size = d.size(), offset = end_;
    if (count >= 0xFFFF || size >= kZip32Max || offset >= kZip32Max) {
      const uint64_t at = offset + size;
      Put32(&d, 0x06064b50);
      Put64(&d, 44);
      Put16(&d, 45);
      Put16(&d, 45);
      Put32(&d, 0);
      Put32(&d, 0);
      Put64(&d, count);
      Put64(&d, count);
      Put64(&d, size);
      Put64(&d, offset);
      Put32(&d, 0x07064b50);
      Put32(&d, 0);
      Put64(&d, at);
      Put32(&d, 1);
    }
    Put32(&d, 0x06054b50);
    Put16(&d, 0);
    Put16(&d, 0);
    Put16(&d, static_cast<uint16_t>(std::min<uint64_t>(count, 0xFFFF)));
    Put16(&d, static_cast<uint16_t>(std::min<uint64_t>(count, 0xFFFF)));
    Put32(&d, static_cast<uint32_t>(std::min<uint64_t>(size, kZip32Max)));
    Put32(&d, static_cast<uint32_t>(std::min<uint64_t>(offset, kZip32Max)));
    Put16(&d, 0);
    return d;
  }

  uint64_t data_end() const { return end_; }

 private:
  std::vector<Record> records_;
  uint64_t end_ = 0;
};

// Reads `nbytes` of one member's storage record in pieces into `sink`
// (the record may hold more; all of it is read, for its CRC-32).
Status ReadStorage(const Member& m, const std::string& key, const StorageInfo& info,
                   const std::function<void(uint64_t offset, const char* data, size_t n)>& sink,
                   std::vector<char>* piece) {
  const ZipEntry& entry = *m.records.at("data/" + key);
  const uint64_t nbytes = static_cast<uint64_t>(info.nbytes);
  Status s = m.zip.ReadChunks(
      entry,
      [&](uint64_t offset, const char* data, size_t n) {
        if (offset < nbytes) {
          sink(offset, data, static_cast<size_t>(std::min<uint64_t>(n, nbytes - offset)));
        }
        return Status::Ok();
      },
      piece);
  // I/O errors and cancellation keep their errno.
  if (s.ok() || s.code() == StatusCode::kIoError) return s;
  return Status::Corrupt(s.message() + " (tensor '" + info.first_tensor + "')");
}

// One storage of the output and how it is cut into pieces.
struct StoragePlan {
  const StorageInfo* info = nullptr;
  std::string key;                       // the newest member's
  std::vector<const ZipEntry*> entries;  // the record read from each member used
  std::vector<const Member*> members;    // all members if averaged, else the newest
  size_t record = 0;                     // in the layout
  bool averaged = false;
  bool whole = false;  // deflated in some member: read whole, as one piece
};

// One piece: bytes [begin, end) of a storage's output. The last piece of a
// storage also reads each record's bytes past the storage, for the CRC.
struct Piece {
  size_t plan = 0;
  uint64_t begin = 0, end = 0;
  bool last = false;
  std::vector<uint32_t> crc;     // per member used: CRC-32 of what was read
  std::vector<uint64_t> length;  // per member used: bytes read
  uint32_t out_crc = 0;
};

// Scratch space of one thread, reused from piece to piece.
struct Scratch {
  std::vector<char> read;
  std::vector<char> output;
  std::vector<float> sum;
};

// float16, bfloat16 and float32 pieces are summed here, in a float32 buffer
// reused from piece to piece, with F16C where the processor has it; the
// results are those of core::Accumulator (torch's round-to-nearest-even
// conversions), which sums every other averaged type.
bool SummedInPieces(DType t) { return t == DType::kF16 || t == DType::kBF16 || t == DType::kF32; }

// F16C from cpuid (clang's __builtin_cpu_supports does not know "f16c");
// "avx" also checks that the OS saves the AVX registers.
bool HasF16C() {
  static const bool has = [] {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    return __get_cpuid(1, &eax, &ebx, &ecx, &edx) != 0 && (ecx & bit_F16C) != 0 &&
           __builtin_cpu_supports("avx");
  }();
  return has;
}

__attribute__((target("avx,f16c"))) void AddHalfF16C(const uint16_t* in, size_t n, bool first,
                                                     float* sum) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 x = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i)));
    _mm256_storeu_ps(sum + i, first ? x : _mm256_add_ps(_mm256_loadu_ps(sum + i), x));
  }
  for (; i < n; ++i) {
    const float x = c10::Half(in[i], c10::Half::from_bits());
    sum[i] = first ? x : sum[i] + x;
  }
}

__attribute__((target("avx,f16c"))) void StoreHalfF16C(const float* sum, size_t n, float count,
                                                       uint16_t* out) {
  size_t i = 0;
  const __m256 c = _mm256_set1_ps(count);
  for (; i + 8 <= n; i += 8) {
    const __m256 x = _mm256_div_ps(_mm256_loadu_ps(sum + i), c);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i),
                     _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  for (; i < n; ++i) out[i] = c10::Half(sum[i] / count).x;
}

// Adds n elements of type t (the first input: sets them).
void AddPiece(DType t, const char* data, size_t n, bool first, float* sum) {
  if (n == 0) return;  // an empty storage: sum may be null
  if (t == DType::kF32) {
    const float* in = reinterpret_cast<const float*>(data);
    if (first) {
      std::memcpy(sum, in, n * sizeof(float));
    } else {
      for (size_t i = 0; i < n; ++i) sum[i] += in[i];
    }
    return;
  }
  const uint16_t* in = reinterpret_cast<const uint16_t*>(data);
  if (t == DType::kBF16) {
    for (size_t i = 0; i < n; ++i) {
      const float x = c10::BFloat16(in[i], c10::BFloat16::from_bits());
      sum[i] = first ? x : sum[i] + x;
    }
  } else if (HasF16C()) {
    AddHalfF16C(in, n, first, sum);
  } else {
    for (size_t i = 0; i < n; ++i) {
      const float x = c10::Half(in[i], c10::Half::from_bits());
      sum[i] = first ? x : sum[i] + x;
    }
  }
}

// The mean of `count` inputs, in type t.
void StorePiece(DType t, const float* sum, size_t n, size_t count, char* out) {
  const float c = static_cast<float>(count);
  if (t == DType::kF32) {
    float* o = reinterpret_cast<float*>(out);
    for (size_t i = 0; i < n; ++i) o[i] = sum[i] / c;
  } else if (t == DType::kBF16) {
    uint16_t* o = reinterpret_cast<uint16_t*>(out);
    for (size_t i = 0; i < n; ++i) o[i] = c10::BFloat16(sum[i] / c).x;
  } else if (HasF16C()) {
    StoreHalfF16C(sum, n, c, reinterpret_cast<uint16_t*>(out));
  } else {
    uint16_t* o = reinterpret_cast<uint16_t*>(out);
    for (size_t i = 0; i < n; ++i) o[i] = c10::Half(sum[i] / c).x;
  }
}

Status AveragePiece(const std::vector<StoragePlan>& plans, ZipLayout* layout, OutputFile* out,
                    Piece* piece, Scratch* scratch) {
  const StoragePlan& plan = plans[piece->plan];
  const StorageInfo& info = *plan.info;
  const uint64_t data_offset = layout->record(plan.record).data_offset;
  const size_t item = ItemSize(info.dtype);
  if (plan.whole) {
    // Some member deflated this record: read each sequentially, whole.
    std::vector<char>& output = scratch->output;
    output.resize(static_cast<size_t>(info.nbytes));
    if (!plan.averaged) {
      Status s = ReadStorage(
          *plan.members[0], plan.key, info,
          [&](uint64_t offset, const char* data, size_t n) {
            if (n > 0) std::memcpy(output.data() + offset, data, n);
          },
          &scratch->read);
      if (!s.ok()) return s;
    } else {
      Accumulator acc(info.dtype, static_cast<size_t>(info.numel));
      for (size_t i = 0; i < plan.members.size(); ++i) {
        const std::string key = plan.entries[i]->name.substr(plan.entries[i]->name.rfind('/') + 1);
        Status s = ReadStorage(
            *plan.members[i], key, info,
            [&](uint64_t offset, const char* data, size_t n) {
              acc.AddPart(data, static_cast<size_t>(offset) / item, n / item);
            },
            &scratch->read);
        if (!s.ok()) return s;
        acc.EndInput();
      }
      acc.Finish(output.data());
    }
    piece->out_crc = static_cast<uint32_t>(
        crc32_z(0, reinterpret_cast<const Bytef*>(output.data()), output.size()));
    return out->WriteAt(data_offset, output.data(), output.size());
  }
  const size_t n = static_cast<size_t>(piece->end - piece->begin);
  const size_t elements = n / item;
  std::vector<char>& buf = scratch->read;
  if (buf.size() < std::max<uint64_t>(n, kAverageChunk)) {
    buf.resize(static_cast<size_t>(std::max<uint64_t>(n, kAverageChunk)));
  }
  const bool in_pieces = plan.averaged && SummedInPieces(info.dtype);
  std::optional<Accumulator> acc;
  if (plan.averaged && !in_pieces) acc.emplace(info.dtype, elements);
  if (in_pieces && scratch->sum.size() < elements) scratch->sum.resize(elements);
  if (plan.averaged && scratch->output.size() < n) scratch->output.resize(n);
  piece->crc.assign(plan.members.size(), 0);
  piece->length.assign(plan.members.size(), 0);
  for (size_t i = 0; i < plan.members.size(); ++i) {
    const ZipEntry& entry = *plan.entries[i];
    const InputFile& file = plan.members[i]->zip.file();
    if (Status s = file.ReadAt(entry.data_offset + piece->begin, buf.data(), n); !s.ok()) return s;
    uLong crc = crc32_z(0, reinterpret_cast<const Bytef*>(buf.data()), n);
    if (in_pieces) {
      AddPiece(info.dtype, buf.data(), elements, i == 0, scratch->sum.data());
    } else if (acc) {
      acc->AddPart(buf.data(), 0, elements);
      acc->EndInput();
    } else if (i == 0) {
      piece->out_crc = static_cast<uint32_t>(crc);
      if (Status s = out->WriteAt(data_offset + piece->begin, buf.data(), n); !s.ok()) return s;
    }
    uint64_t length = n;
    // The record's bytes past the storage count for its CRC.
    for (uint64_t at = piece->end; piece->last && at < entry.size;) {
      const size_t m = static_cast<size_t>(std::min<uint64_t>(entry.size - at, buf.size()));
      if (Status s = file.ReadAt(entry.data_offset + at, buf.data(), m); !s.ok()) return s;
      crc = crc32_z(crc, reinterpret_cast<const Bytef*>(buf.data()), m);
      at += m, length += m;
    }
    piece->crc[i] = static_cast<uint32_t>(crc);
    piece->length[i] = length;
  }
  if (!plan.averaged) return Status::Ok();
  if (in_pieces) {
    StorePiece(info.dtype, scratch->sum.data(), elements, plan.members.size(),
               scratch->output.data());
  } else {
    acc->Finish(scratch->output.data());
  }
  piece->out_crc =
      static_cast<uint32_t>(crc32_z(0, reinterpret_cast<const Bytef*>(scratch->output.data()), n));
  return out->WriteAt(data_offset + piece->begin, scratch->output.data(), n);
}

// The members loaded and checked against the newest, the output laid out.
struct Job {
  std::vector<Member> members;
  std::vector<std::map<std::string, std::string>> key_maps;
  ZipLayout layout;
  std::vector<StoragePlan> plans;
  size_t pickle_record = 0, byteorder_record = 0, version_record = 0;
  int64_t total = 0;  // storage bytes
};

const char kVersionRecord[] = "3\n";  // what libtorch 1.13's writer records

Status Prepare(const std::vector<std::string>& paths, bool newest_only, Job* job) {
  job->members.resize(newest_only ? 1 : paths.size());
  job->key_maps.resize(job->members.size());
  for (size_t i = 0; i < job->members.size(); ++i) {
    if (Status s = Load(paths[i], &job->members[i]); !s.ok()) return s;
    if (i == 0) {
      for (const auto& [key, info] : job->members[0].storages) job->key_maps[0][key] = key;
    } else if (Status s = Compare(job->members[0], job->members[i], &job->key_maps[i]); !s.ok()) {
      return s;
    }
  }
  const Member& newest = job->members[0];
  job->pickle_record = job->layout.Add("data.pkl", newest.pickle.size());
  if (!newest.byteorder.empty()) {
    job->byteorder_record = job->layout.Add("byteorder", newest.byteorder.size());
  }
  for (const auto& [key, info] : newest.storages) {
    StoragePlan plan;
    plan.info = &info;
    plan.key = key;
    plan.averaged = IsAveraged(info.dtype);
    const size_t used = plan.averaged ? job->members.size() : 1;
    for (size_t i = 0; i < used; ++i) {
      const Member& m = job->members[i];
      const ZipEntry* e = m.records.at("data/" + job->key_maps[i].at(key));
      plan.members.push_back(&m);
      plan.entries.push_back(e);
      plan.whole = plan.whole || e->method != ZipEntry::kStored;
    }
    plan.record = job->layout.Add("data/" + key, static_cast<uint64_t>(info.nbytes));
    job->total += info.nbytes;
    job->plans.push_back(std::move(plan));
  }
  job->version_record = job->layout.Add("version", sizeof(kVersionRecord) - 1);
  return Status::Ok();
}

Result<AverageResult> AverageTorchZipImpl(const std::vector<std::string>& paths, OutputFile* out,
                                          const ProgressFn& progress) {
  Job job;
  if (Status s = Prepare(paths, false, &job); !s.ok()) return s;
  const Member& newest = job.members[0];
  AverageResult result;
  result.format = TensorFormat::kTorchZip;
  if (progress) progress({"averaging", 0, job.total});
  // Inputs are read once, front to back: have the kernel read them ahead
  // (for the file, whatever descriptor reads it).
  for (const Member& m : job.members) {
    const int fd = ::open(m.path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) continue;  // read below, which names the error
    (void)::posix_fadvise(fd, 0, 0, POSIX_FADV_WILLNEED);
    ::close(fd);
  }

  std::vector<Piece> pieces;
  for (size_t p = 0; p < job.plans.size(); ++p) {
    const StoragePlan& plan = job.plans[p];
    const uint64_t nbytes = static_cast<uint64_t>(plan.info->nbytes);
    const uint64_t step = plan.whole ? std::max<uint64_t>(nbytes, 1) : kAverageChunk;
    for (uint64_t b = 0; b == 0 || b < nbytes; b += step) {
      Piece piece;
      piece.plan = p;
      piece.begin = b;
      piece.end = std::min(nbytes, b + step);
      piece.last = piece.end == nbytes;
      pieces.push_back(std::move(piece));
    }
    if (plan.averaged) {
      ++result.tensors_averaged;
    } else {
      ++result.tensors_copied;
    }
  }
  std::vector<Scratch> scratch(AverageThreads(pieces.size()));
  std::atomic<unsigned> next_scratch{0};
  std::atomic<int64_t> done{0};
  std::mutex scratch_mu;
  std::map<std::thread::id, Scratch*> by_thread;
  auto scratch_of = [&]() -> Scratch* {
    std::lock_guard<std::mutex> lock(scratch_mu);
    Scratch*& s = by_thread[std::this_thread::get_id()];
    if (s == nullptr) s = &scratch[next_scratch.fetch_add(1)];
    return s;
  };
  Status s = RunInParallel(
      pieces.size(),
      [&](size_t i) -> Status {
        if (CancelRequested()) return CancelledStatus("averaging " + newest.path);
        Piece& piece = pieces[i];
        Status r = AveragePiece(job.plans, &job.layout, out, &piece, scratch_of());
        if (!r.ok()) {
          const StorageInfo& info = *job.plans[piece.plan].info;
          if (r.code() == StatusCode::kIoError && r.sys_errno() == ENOMEM) {
            return Status::FromErrno(newest.path + ": tensor '" + info.first_tensor + "' (" +
                                         std::to_string(info.nbytes) + " bytes)",
                                     ENOMEM);
          }
          if (r.code() == StatusCode::kIoError) return r;
          if (r.message().find("(tensor '") == std::string::npos) {
            return Status::Corrupt(r.message() + " (tensor '" + info.first_tensor + "')");
          }
          return r;
        }
        done.fetch_add(static_cast<int64_t>(piece.end - piece.begin));
        return Status::Ok();
      },
      [&] {
        if (progress) progress({"averaging", done.load(), job.total});
      });
  if (!s.ok()) return s;

  // Each record read must have the CRC-32 its member declares; the output
  // record's CRC is that of its pieces.
  std::vector<std::vector<uint32_t>> crc(job.plans.size());
  std::vector<std::vector<uint64_t>> length(job.plans.size());
  std::vector<uint32_t> out_crc(job.plans.size(), 0);
  for (const Piece& piece : pieces) {
    const StoragePlan& plan = job.plans[piece.plan];
    out_crc[piece.plan] = static_cast<uint32_t>(crc32_combine(
        out_crc[piece.plan], piece.out_crc, static_cast<z_off_t>(piece.end - piece.begin)));
    if (plan.whole) continue;  // checked while it was read
    std::vector<uint32_t>& c = crc[piece.plan];
    c.resize(plan.members.size(), 0);
    for (size_t i = 0; i < plan.members.size(); ++i) {
      c[i] = static_cast<uint32_t>(
          crc32_combine(c[i], piece.crc[i], static_cast<z_off_t>(piece.length[i])));
    }
  }
  for (size_t p = 0; p < job.plans.size(); ++p) {
    const StoragePlan& plan = job.plans[p];
    job.layout.record(plan.record).crc = out_crc[p];
    if (plan.whole) continue;
    for (size_t i = 0; i < plan.members.size(); ++i) {
      if (crc[p][i] != plan.entries[i]->crc32) {
        return Status::Corrupt(plan.members[i]->path + ": entry '" + plan.entries[i]->name +
                               "': CRC-32 mismatch (corrupt, or changed while it was read) "
                               "(tensor '" +
                               plan.info->first_tensor + "')");
      }
    }
  }
  // The small records, every local header, the central directory.
  auto write_record = [&](size_t index, const std::string& bytes) -> Status {
    ZipLayout::Record& r = job.layout.record(index);
    r.crc = static_cast<uint32_t>(
        crc32_z(0, reinterpret_cast<const Bytef*>(bytes.data()), bytes.size()));
    return out->WriteAt(r.data_offset, bytes.data(), bytes.size());
  };
  if (Status w = write_record(job.pickle_record, newest.pickle); !w.ok()) return w;
  if (!newest.byteorder.empty()) {
    if (Status w = write_record(job.byteorder_record, newest.byteorder); !w.ok()) return w;
  }
  if (Status w = write_record(job.version_record, kVersionRecord); !w.ok()) return w;
  std::string headers;
  for (size_t i = 0; i <= job.version_record; ++i) {
    const ZipLayout::Record& r = job.layout.record(i);
    const std::string h = job.layout.LocalHeader(r);
    if (Status w = out->WriteAt(r.header_offset, h.data(), h.size()); !w.ok()) return w;
  }
  const std::string directory = job.layout.Directory();
  if (Status w = out->WriteAt(job.layout.data_end(), directory.data(), directory.size()); !w.ok())
    return w;
  // What was read is what each member holds now, or the average is refused.
  for (const Member& m : job.members) {
    if (Status c = m.zip.file().CheckUnchanged(); !c.ok()) return c;
  }
  result.bytes = job.total;
  return result;
}

}  // namespace

Result<AverageResult> AverageTorchZipFiles(const std::vector<std::string>& members, OutputFile* out,
                                           const ProgressFn& progress) {
  return AverageTorchZipImpl(members, out, progress);
}

}  // namespace ckptfs::core
