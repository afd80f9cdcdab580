// Averaging PyTorch zip checkpoints (torch.save since 1.6). The only file of
// ckptfs that includes caffe2's zip container; libtorch exceptions are caught
// here and become Status.
#include <caffe2/serialize/inline_container.h>
#include <c10/util/Exception.h>

#include <algorithm>
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

struct Member {
  std::string path;
  std::unique_ptr<PyTorchStreamReader> reader;
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

Status Load(const std::string& path, Member* m) {
  m->path = path;
  try {
    m->reader = std::make_unique<PyTorchStreamReader>(path);
    for (const std::string& r : m->reader->getAllRecords()) m->records.insert(r);
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

}  // namespace

Result<AverageResult> AverageTorchZip(const std::vector<std::string>& paths, OutputFile* out,
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
      // One member's storage in memory at a time, summed into the accumulator.
      const size_t readers = IsAveraged(info.dtype) ? members.size() : 1;
      Accumulator acc(info.dtype, static_cast<size_t>(info.numel));
      for (size_t i = 0; i < readers; ++i) {
        Result<std::tuple<at::DataPtr, size_t>> r =
            ReadRecord(&members[i], "data/" + key_maps[i].at(key));
        if (!r.ok()) return r.status();
        if (static_cast<int64_t>(std::get<1>(*r)) != info.nbytes) {
          return Status::Corrupt(members[i].path + ": storage " + key + " of tensor '" +
                                 info.first_tensor + "' holds " + std::to_string(std::get<1>(*r)) +
                                 " bytes, expected " + std::to_string(info.nbytes));
        }
        if (readers == 1) {  // taken as it is from the newest member
          writer.writeRecord(record, std::get<0>(*r).get(), static_cast<size_t>(info.nbytes));
          ++result.tensors_copied;
          break;
        }
        acc.Add(std::get<0>(*r).get());
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

}  // namespace ckptfs::core
