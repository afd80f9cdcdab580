// Averaging PyTorch zip checkpoints (torch.save since 1.6). The only file of
// ckptfs that includes caffe2's zip container; libtorch exceptions are caught
// here and become Status.
#include <caffe2/serialize/inline_container.h>
#include <c10/util/Exception.h>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <map>
#include <memory>
#include <set>

#include "core/dtype.h"
#include "core/pickle.h"
#include "core/tensor_io.h"

namespace ckptfs::core {
namespace {

using caffe2::serialize::PyTorchStreamReader;
using caffe2::serialize::PyTorchStreamWriter;

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

// The file mapped read-only: storages are read in place from the page cache,
// no copy, and no anonymous memory per member.
struct Mapping {
  ~Mapping() {
    if (data != nullptr) ::munmap(data, size);
  }
  void* data = nullptr;
  size_t size = 0;
};

struct Member {
  std::string path;
  std::unique_ptr<PyTorchStreamReader> reader;
  Mapping map;
  std::map<std::string, uint64_t> offsets;  // record name -> data offset in the file
  std::map<std::string, uint64_t> limits;   // record name -> where the next record starts
  std::string pickle;
  std::set<std::string> records;
  std::map<std::string, StorageInfo> storages;  // by key, sorted as torch 1.13 writes them
  std::map<std::string, TensorInfo> tensors;    // by path
};

std::string Shape(const std::vector<int64_t>& v) {
  std::string s = "[";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? "," : "") + std::to_string(v[i]);
  return s + "]";
}

bool KnownRecord(const std::string& name) {
  static const std::set<std::string> kKnown = {"data.pkl", "version", ".data/version", "byteorder",
                                               ".data/serialization_id", ".format_version",
                                               ".storage_alignment"};
  return kKnown.count(name) != 0 || name.rfind("data/", 0) == 0;
}

// Reads a record, checking it holds exactly `expected` bytes when given.
Result<std::tuple<at::DataPtr, size_t>> ReadRecord(Member* m, const std::string& name) {
  try {
    return m->reader->getRecord(name);
  } catch (const std::exception& e) {
    return Status::Corrupt(m->path + ": cannot read record " + name + ": " + e.what());
  }
}

// A storage record in place, checked to lie inside the file and before the
// next record: a truncated or overlapping record is an error, never a read
// past what the writer wrote.
Result<const char*> View(const Member& m, const std::string& name, int64_t nbytes) {
  auto off = m.offsets.find(name);
  if (off == m.offsets.end()) return Status::Corrupt(m.path + ": no record " + name);
  if (nbytes < 0 || off->second + static_cast<uint64_t>(nbytes) > m.limits.at(name)) {
    return Status::Corrupt(m.path + ": record " + name + " is shorter than its " +
                           std::to_string(nbytes) + " bytes (truncated or corrupt file)");
  }
  return static_cast<const char*>(m.map.data) + off->second;
}

Status Map(Member* m) {
  int fd = ::open(m->path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return Status::FromErrno(m->path, errno);
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    int err = errno;
    ::close(fd);
    return Status::FromErrno(m->path, err);
  }
  m->map.size = static_cast<size_t>(st.st_size);
  void* p = m->map.size == 0 ? MAP_FAILED : ::mmap(nullptr, m->map.size, PROT_READ, MAP_SHARED, fd, 0);
  int err = errno;
  ::close(fd);
  if (p == MAP_FAILED) return Status::FromErrno(m->path + ": mmap", err);
  m->map.data = p;
  ::madvise(p, m->map.size, MADV_SEQUENTIAL);
  // Each record ends before the next one's local header (30 bytes at least);
  // the last before the end of central directory (22 bytes at least).
  std::vector<std::pair<uint64_t, std::string>> sorted;
  for (const auto& [name, off] : m->offsets) sorted.emplace_back(off, name);
  std::sort(sorted.begin(), sorted.end());
  for (size_t i = 0; i < sorted.size(); ++i) {
    const uint64_t end = i + 1 < sorted.size() ? sorted[i + 1].first - std::min<uint64_t>(30, sorted[i + 1].first)
                                               : m->map.size - std::min<uint64_t>(22, m->map.size);
    m->limits[sorted[i].second] = end;
  }
  return Status::Ok();
}

Status Load(const std::string& path, Member* m) {
  m->path = path;
  try {
    m->reader = std::make_unique<PyTorchStreamReader>(path);
    for (const std::string& r : m->reader->getAllRecords()) {
      m->records.insert(r);
      m->offsets[r] = m->reader->getRecordOffset(r);
    }
  } catch (const c10::Error& e) {
    return Status::Corrupt(path + ": not a readable PyTorch zip file: " + e.what_without_backtrace());
  } catch (const std::exception& e) {
    return Status::Corrupt(path + ": not a readable PyTorch zip file: " + e.what());
  }
  for (const std::string& r : m->records) {
    if (!KnownRecord(r)) {
      return Status::Unsupported(path + ": holds record '" + r +
                                 "' (a TorchScript or other archive), not a torch.save checkpoint");
    }
  }
  if (m->records.count("data.pkl") == 0) return Status::Corrupt(path + ": no data.pkl record");
  Result<std::tuple<at::DataPtr, size_t>> pkl = ReadRecord(m, "data.pkl");
  if (!pkl.ok()) return pkl.status();
  m->pickle.assign(static_cast<const char*>(std::get<0>(*pkl).get()), std::get<1>(*pkl));

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
      info.dtype = *dtype;
      info.type_name = st.storage_type;
      info.numel = st.storage_numel;
      info.nbytes = st.storage_numel * static_cast<int64_t>(ItemSize(*dtype));
      info.first_tensor = t.path;
    }
    // The tensor must lie inside its storage, or torch.load itself would fail.
    int64_t extent = t.tensor->offset;
    bool empty = false;
    for (size_t d = 0; d < t.tensor->size.size(); ++d) {
      if (t.tensor->size[d] < 0 || t.tensor->stride[d] < 0) {
        return Status::Corrupt(path + ": tensor '" + t.path + "' has a negative size or stride");
      }
      if (t.tensor->size[d] == 0) empty = true;
      extent += (t.tensor->size[d] - 1) * t.tensor->stride[d];
    }
    if (*dtype != DType::kOpaque && !empty && (t.tensor->offset < 0 || extent + 1 > info.numel)) {
      return Status::Corrupt(path + ": tensor '" + t.path + "' reaches past its storage " +
                             st.storage_key);
    }
    std::string key = t.path;
    for (int n = 2; m->tensors.count(key) != 0; ++n) key = t.path + "#" + std::to_string(n);
    m->tensors[key] = {st.storage_key, t.tensor->offset, t.tensor->size, t.tensor->stride,
                       t.tensor->tensor_dtype};
  }
  for (const auto& [key, info] : m->storages) {
    if (m->records.count("data/" + key) == 0) {
      return Status::Corrupt(path + ": storage " + key + " of tensor '" + info.first_tensor +
                             "' has no data record");
    }
  }
  return Map(m);
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

}  // namespace

namespace {

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
  Member& newest = members[0];
  AverageResult result;
  result.format = TensorFormat::kTorchZip;
  int64_t total = 0;
  for (const auto& [key, info] : newest.storages) total += info.nbytes;
  if (progress) progress({"averaging", 0, total});

  try {
    PyTorchStreamWriter writer([out](const void* data, size_t n) { return out->Write(data, n); });
    writer.writeRecord("data.pkl", newest.pickle.data(), newest.pickle.size());
    if (newest.records.count("byteorder") != 0) {
      Result<std::tuple<at::DataPtr, size_t>> r = ReadRecord(&newest, "byteorder");
      if (!r.ok()) return r.status();
      writer.writeRecord("byteorder", std::get<0>(*r).get(), std::get<1>(*r));
    }
    int64_t done = 0;
    std::vector<char> averaged;
    for (const auto& [key, info] : newest.storages) {
      const std::string record = "data/" + key;
      // Members are read in place (mapped) and summed into one accumulator.
      const size_t readers = IsAveraged(info.dtype) ? members.size() : 1;
      Accumulator acc(info.dtype, static_cast<size_t>(info.numel));
      for (size_t i = 0; i < readers; ++i) {
        Result<const char*> data = View(members[i], "data/" + key_maps[i].at(key), info.nbytes);
        if (!data.ok()) {
          return Status::Corrupt(data.status().message() + " (tensor '" + info.first_tensor + "')");
        }
        if (readers == 1) {  // taken as it is from the newest member
          writer.writeRecord(record, *data, static_cast<size_t>(info.nbytes));
          ++result.tensors_copied;
          break;
        }
        acc.Add(*data);
      }
      if (readers > 1) {
        averaged.resize(static_cast<size_t>(info.nbytes));
        acc.Finish(averaged.data());
        writer.writeRecord(record, averaged.data(), averaged.size());
        ++result.tensors_averaged;
      }
      if (!out->status().ok()) return out->status();
      done += info.nbytes;
      if (progress) progress({"averaging", done, total});
    }
    writer.writeEndOfFile();
  } catch (const c10::Error& e) {
    if (!out->status().ok()) return out->status();
    return Status::Corrupt("writing the average: " + std::string(e.what_without_backtrace()));
  } catch (const std::exception& e) {
    if (!out->status().ok()) return out->status();
    return Status::Corrupt(std::string("writing the average: ") + e.what());
  }
  if (!out->status().ok()) return out->status();
  result.bytes = total;
  return result;
}

}  // namespace
}  // namespace ckptfs::core

extern "C" __attribute__((visibility("default"))) void ckptfs_average_torch_zip(
    const std::vector<std::string>* members, ckptfs::core::OutputFile* out,
    const ckptfs::core::ProgressFn* progress,
    ckptfs::core::Result<ckptfs::core::AverageResult>* result) {
  try {
    *result = ckptfs::core::AverageTorchZipImpl(*members, out, *progress);
  } catch (const std::exception& e) {
    *result = ckptfs::core::Status::Corrupt(std::string("averaging failed: ") + e.what());
  }
}
