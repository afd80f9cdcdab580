// Internal to core's tensor code: a zip archive laid out as libtorch's
// PyTorchStreamWriter lays out torch.save's (stored records, data aligned to
// kZipAlignment by an "FB" extra field of 'Z's, zip64 extra fields where a
// size or offset needs 64 bits), before anything is written: where each
// record's local header and data go is known from the records' sizes, so
// records can be written in place (pwrite), by several threads at once.
#ifndef CKPTFS_CORE_ZIP_WRITER_H_
#define CKPTFS_CORE_ZIP_WRITER_H_

#include <cstdint>
#include <string>
#include <vector>

namespace ckptfs::core {

// torch.save aligns every record's data to this (PyTorchStreamWriter).
inline constexpr uint64_t kZipAlignment = 64;

class ZipLayout {
 public:
  struct Record {
    std::string name;  // in the archive, with its folder
    uint64_t size = 0;
    uint64_t header_offset = 0;
    uint64_t data_offset = 0;
    uint32_t crc = 0;  // set once its data is written
  };

  // Adds record "archive/NAME" of `size` bytes after the previous ones;
  // returns its index.
  size_t Add(const std::string& name, uint64_t size);
  Record& record(size_t i) { return records_[i]; }
  // Its local header, to write at header_offset (once crc is set).
  std::string LocalHeader(const Record& r) const;
  // The central directory and the end records, written at data_end().
  std::string Directory() const;
  uint64_t data_end() const { return end_; }

 private:
  std::vector<Record> records_;
  uint64_t end_ = 0;
};

}  // namespace ckptfs::core

#endif  // CKPTFS_CORE_ZIP_WRITER_H_
