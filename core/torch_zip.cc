// Averaging PyTorch zip checkpoints (torch.save since 1.6). Members are read
// through core's bounded zip reader (zip_reader.h: pread, sizes checked
// before anything is allocated, deflated entries inflated within budget,
// CRC-32 checked); the output is written by libtorch's PyTorchStreamWriter,
// the one use of libtorch here, wrapped so that none of its exceptions
// escapes and its destructor never throws (TorchWriter).
//
// Budget: kMaxPickleBytes, the largest data.pkl read into memory (a deflated
// one too: its declared size is checked before it is inflated).
#include <c10/util/Exception.h>
#include <caffe2/serialize/inline_container.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <new>
#include <optional>
#include <set>

#include "core/cancel.h"
#include "core/dtype.h"
#include "core/pickle.h"
#include "core/tensor_io.h"
#include "core/zip_reader.h"

namespace ckptfs::core {
namespace {

using caffe2::serialize::PyTorchStreamWriter;

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

// libtorch 1.13's PyTorchStreamWriter throws c10::Error from writeRecord
// when its sink reports a short write, and finishes the archive in its
// (implicitly noexcept) destructor, which then throws again: std::terminate.
// So its sink never reports one: it takes every byte and the OutputFile
// keeps the first error, checked after each record. A writer that threw
// anyway (miniz out of memory) is leaked, never destroyed: a few kilobytes
// against a dead daemon. Every exception becomes a Status here.
class TorchWriter {
 public:
  explicit TorchWriter(OutputFile* out) : out_(out) {}
  ~TorchWriter() {
    if (writer_ == nullptr) return;
    if (!finished_ && !broken_) {
      try {
        writer_->writeEndOfFile();
        finished_ = true;
      } catch (...) {
        broken_ = true;
      }
    }
    if (broken_) (void)writer_.release();  // see the class comment
  }
  TorchWriter(const TorchWriter&) = delete;
  TorchWriter& operator=(const TorchWriter&) = delete;

  Status Start() {
    OutputFile* out = out_;
    return Guard("starting the archive", [&] {
      writer_ = std::make_unique<PyTorchStreamWriter>([out](const void* data, size_t n) -> size_t {
        out->Write(data, n);
        return n;  // an error is kept in out, see the class comment
      });
    });
  }
  Status Write(const std::string& name, const void* data, size_t n) {
    return Guard(name.c_str(), [&] { writer_->writeRecord(name, data, n); });
  }
  Status Finish() {
    Status s = Guard("the central directory", [&] { writer_->writeEndOfFile(); });
    finished_ = s.ok();
    return s;
  }

 private:
  template <typename Fn>
  Status Guard(const std::string& what, Fn&& fn) {
    if (broken_) return Status::Corrupt("writing the average: the writer failed before");
    try {
      fn();
    } catch (const c10::Error& e) {
      broken_ = true;
      return Fail(what, e.what_without_backtrace());
    } catch (const std::exception& e) {
      broken_ = true;
      return Fail(what, e.what());
    }
    return out_->status();
  }
  Status Fail(const std::string& what, const std::string& why) {
    if (!out_->status().ok()) return out_->status();
    return Status::Corrupt("writing the average (" + what + "): " + why);
  }

  OutputFile* out_;
  std::unique_ptr<PyTorchStreamWriter> writer_;
  bool broken_ = false;
  bool finished_ = false;
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

// Buffers reused from one storage to the next: allocating and faulting in
// megabytes per storage and member would cost as much as the averaging.
struct Scratch {
  std::vector<char> piece;   // for ZipArchive::ReadChunks
  std::vector<char> output;  // one storage of the output
};

// Reads `nbytes` of one member's storage record in pieces into `sink`
// (the record may hold more; all of it is read, for its CRC-32).
Status ReadStorage(const Member& m, const std::string& key, const StorageInfo& info,
                   const std::function<void(uint64_t offset, const char* data, size_t n)>& sink,
                   Scratch* scratch) {
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
      &scratch->piece);
  // I/O errors and cancellation keep their errno.
  if (s.ok() || s.code() == StatusCode::kIoError) return s;
  return Status::Corrupt(s.message() + " (tensor '" + info.first_tensor + "')");
}

// One storage of the output: the members' average, or the newest member's
// bytes for types that are not averaged. Memory: one accumulator and one
// output buffer of the storage's size (checked against the record in Load),
// plus one piece being read.
Status AverageStorage(const std::vector<Member>& members,
                      const std::vector<std::map<std::string, std::string>>& key_maps,
                      const std::string& key, const StorageInfo& info, TorchWriter* writer,
                      AverageResult* result, Scratch* scratch) {
  std::vector<char>& output = scratch->output;
  output.resize(static_cast<size_t>(info.nbytes));
  if (!IsAveraged(info.dtype)) {
    Status s = ReadStorage(
        members[0], key, info,
        [&](uint64_t offset, const char* data, size_t n) {
          std::memcpy(output.data() + offset, data, n);
        },
        scratch);
    if (!s.ok()) return s;
    ++result->tensors_copied;
  } else {
    const size_t item = ItemSize(info.dtype);
    Accumulator acc(info.dtype, static_cast<size_t>(info.numel));
    for (size_t i = 0; i < members.size(); ++i) {
      // Pieces are whole elements: kReadChunk is a multiple of every item size.
      Status s = ReadStorage(
          members[i], key_maps[i].at(key), info,
          [&](uint64_t offset, const char* data, size_t n) {
            acc.AddPart(data, static_cast<size_t>(offset) / item, n / item);
          },
          scratch);
      if (!s.ok()) return s;
      acc.EndInput();
    }
    acc.Finish(output.data());
    ++result->tensors_averaged;
  }
  return writer->Write("data/" + key, output.data(), output.size());
}

Result<AverageResult> AverageTorchZipImpl(const std::vector<std::string>& paths, OutputFile* out,
                                          const ProgressFn& progress) {
  std::vector<Member> members(paths.size());
  std::vector<std::map<std::string, std::string>> key_maps(paths.size());
  for (size_t i = 0; i < paths.size(); ++i) {
    if (Status s = Load(paths[i], &members[i]); !s.ok()) return s;
    if (i == 0) {
      for (const auto& [key, info] : members[0].storages) key_maps[0][key] = key;
    } else if (Status s = Compare(members[0], members[i], &key_maps[i]); !s.ok()) {
      return s;
    }
  }
  const Member& newest = members[0];
  AverageResult result;
  result.format = TensorFormat::kTorchZip;
  int64_t total = 0;  // no overflow: each storage fits in its record, inside a file
  for (const auto& [key, info] : newest.storages) total += info.nbytes;
  if (progress) progress({"averaging", 0, total});

  TorchWriter writer(out);
  if (Status s = writer.Start(); !s.ok()) return s;
  if (Status s = writer.Write("data.pkl", newest.pickle.data(), newest.pickle.size()); !s.ok())
    return s;
  if (!newest.byteorder.empty()) {
    if (Status s = writer.Write("byteorder", newest.byteorder.data(), newest.byteorder.size());
        !s.ok()) {
      return s;
    }
  }
  int64_t done = 0;
  Scratch scratch;
  for (const auto& [key, info] : newest.storages) {
    if (CancelRequested()) return CancelledStatus("averaging " + newest.path);
    try {
      if (Status s = AverageStorage(members, key_maps, key, info, &writer, &result, &scratch);
          !s.ok())
        return s;
    } catch (const std::bad_alloc&) {
      return Status::FromErrno(newest.path + ": tensor '" + info.first_tensor + "' (" +
                                   std::to_string(info.nbytes) + " bytes)",
                               ENOMEM);
    }
    done += info.nbytes;
    if (progress) progress({"averaging", done, total});
  }
  if (Status s = writer.Finish(); !s.ok()) return s;
  // What was read is what each member holds now, or the average is refused.
  for (const Member& m : members) {
    if (Status s = m.zip.file().CheckUnchanged(); !s.ok()) return s;
  }
  result.bytes = total;
  return result;
}

}  // namespace
}  // namespace ckptfs::core

namespace {

// The host's CancelRequested: this plugin's copy of core/cancel.cc is not the
// one the daemon sets.
std::atomic<bool (*)()> g_host_cancel{nullptr};

bool HostCancelRequested(void* /*unused*/) {
  bool (*host)() = g_host_cancel.load();
  return host != nullptr && host();
}

}  // namespace

extern "C" __attribute__((visibility("default"))) void ckptfs_average_torch_zip_v2(
    const std::vector<std::string>* members, ckptfs::core::OutputFile* out,
    const ckptfs::core::ProgressFn* progress, bool (*cancel_requested)(),
    ckptfs::core::Result<ckptfs::core::AverageResult>* result) {
  g_host_cancel.store(cancel_requested);
  ckptfs::core::SetCancelCheck(HostCancelRequested, nullptr);
  try {
    *result = ckptfs::core::AverageTorchZipImpl(*members, out, *progress);
  } catch (const std::bad_alloc&) {
    *result = ckptfs::core::Status::FromErrno("averaging " + members->front(), ENOMEM);
  } catch (const std::exception& e) {
    *result =
        ckptfs::core::Status::Corrupt("averaging " + members->front() + " failed: " + e.what());
  }
}
