// torch.save checkpoints opened and checked: see torch_archive.h.
#include "core/torch_archive.h"

#include <optional>
#include <set>
#include <utility>

namespace ckptfs::core {
namespace {

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

}  // namespace

std::string Shape(const std::vector<int64_t>& v) {
  std::string s = "[";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? "," : "") + std::to_string(v[i]);
  return s + "]";
}

Status LoadTorchArchive(const std::string& path, TorchArchive* m, bool keep_graph) {
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
  if (keep_graph) m->graph = std::move(*parsed);
  return Status::Ok();
}

// Members must agree with the newest on every tensor: the same paths, shapes,
// dtypes and layout in their storages, and the same storage sharing. Storage
// keys may differ (they are numbered in pickling order); `key_map` receives,
// for each storage key of the newest member, the member's key.
Status CompareTorchArchives(const TorchArchive& newest, const TorchArchive& m,
                            std::map<std::string, std::string>* key_map) {
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

// Reads `nbytes` of one member's storage record in pieces into `sink`
// (the record may hold more; all of it is read, for its CRC-32).
Status ReadStorage(const TorchArchive& m, const std::string& key, const StorageInfo& info,
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

}  // namespace ckptfs::core
