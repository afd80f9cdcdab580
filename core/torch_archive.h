// Internal to core's tensor code: one torch.save checkpoint (PyTorch zip,
// torch >= 1.6) opened through core's bounded zip reader, its data.pkl read
// by the code-free pickle reader, and every tensor and storage checked
// against the archive before anything of their size is allocated: each
// tensor lies inside its storage, each storage's record holds its bytes.
// Averaging (torch_zip.cc) and conversion read archives through this.
#ifndef CKPTFS_CORE_TORCH_ARCHIVE_H_
#define CKPTFS_CORE_TORCH_ARCHIVE_H_

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/pickle.h"
#include "core/status.h"
#include "core/zip_reader.h"

namespace ckptfs::core {

// Real data.pkl files hold the structure of a checkpoint, not its tensors:
// kilobytes to a few megabytes, more when a checkpoint pickles big Python
// objects inline. Beyond this it is refused before being read.
inline constexpr uint64_t kMaxPickleBytes = uint64_t{256} << 20;

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

struct TorchArchive {
  std::string path;
  ZipArchive zip;
  std::map<std::string, const ZipEntry*> records;  // by name inside the archive's folder
  std::string pickle;
  std::string byteorder;                        // the record's bytes, if any
  std::map<std::string, StorageInfo> storages;  // by key, sorted as torch 1.13 writes them
  std::map<std::string, TensorInfo> tensors;    // by path
  // The parsed data.pkl, kept only when asked for (LoadTorchArchive's
  // keep_graph): an average of many members does not hold every graph.
  pickle::Unpickled graph;
};

// "[2,3]"
std::string Shape(const std::vector<int64_t>& v);

// Opens and checks path (see the file comment); kCorrupt or kUnsupported
// naming the file and the record or tensor otherwise.
Status LoadTorchArchive(const std::string& path, TorchArchive* m, bool keep_graph = false);

// Members must agree with the newest on every tensor: the same paths, shapes,
// dtypes and layout in their storages, and the same storage sharing. Storage
// keys may differ (they are numbered in pickling order); `key_map` receives,
// for each storage key of the newest member, the member's key.
Status CompareTorchArchives(const TorchArchive& newest, const TorchArchive& m,
                            std::map<std::string, std::string>* key_map);

// Reads the storage `key`'s first info.nbytes bytes in pieces, in order,
// into `sink` (the record may hold more; all of it is read, for its
// CRC-32). `piece` is scratch space (see ZipArchive::ReadChunks). Errors
// other than I/O and cancellation name the tensor.
Status ReadStorage(const TorchArchive& m, const std::string& key, const StorageInfo& info,
                   const std::function<void(uint64_t offset, const char* data, size_t n)>& sink,
                   std::vector<char>* piece);

}  // namespace ckptfs::core

#endif  // CKPTFS_CORE_TORCH_ARCHIVE_H_
