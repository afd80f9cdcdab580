// A zip archive (PyTorch's checkpoint container) read with pread through
// bounded buffers, never mapped and never trusted: every offset and size is
// checked against the file before it is used, and nothing is allocated from
// a declared size before that size is checked against a budget.
//
// Open reads the end-of-central-directory record (zip64 too), the central
// directory and each entry's local header, and refuses (kCorrupt, naming the
// file and the entry) what no zip writer produces: entries outside the file
// or overlapping each other or the central directory, names that differ
// between the two headers or repeat, stored entries whose sizes differ, and
// deflated entries that declare more bytes than deflate can produce from
// their compressed size (kMaxDeflateRatio). Encrypted entries and methods
// other than stored (0) and deflated (8) are kUnsupported, as they are for
// libtorch's reader (miniz).
//
// Reading an entry decompresses it when deflated (libtorch's getRecord does
// the same; torch.load reads such files), never past its declared size and
// never beyond kMaxInflatedEntryBytes, and checks its CRC-32 and length as
// miniz does: a corrupt entry is an error, never data.
//
// Budgets (each error names the file, the entry and the budget):
//   kMaxZipEntries             entries in one archive
//   kMaxZipCentralDirectory    bytes of central directory held in memory
//   kMaxInflatedEntryBytes     declared size of one deflated entry
//   kMaxDeflateRatio           declared size / compressed size of one entry
//
// Owns its file; thread-compatible (reads keep no position, so concurrent
// reads of one archive are safe).
#ifndef CKPTFS_CORE_ZIP_READER_H_
#define CKPTFS_CORE_ZIP_READER_H_

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "core/file_util.h"
#include "core/status.h"

namespace ckptfs::core {

inline constexpr uint64_t kMaxZipEntries = uint64_t{1} << 20;
inline constexpr uint64_t kMaxZipCentralDirectory = uint64_t{256} << 20;
// torch.save never deflates; an archive rewritten deflated (Python's
// zipfile) is read if each entry inflates to at most this. Memory for an
// average grows with the largest storage, so this caps what a small file can
// make the daemon allocate.
inline constexpr uint64_t kMaxInflatedEntryBytes = uint64_t{4} << 30;
// Deflate emits at least one bit per 258-byte match (two codes of one bit
// each, per 516 bytes at best), so no stream expands more than 1032 times.
inline constexpr uint64_t kMaxDeflateRatio = 1032;

struct ZipEntry {
  static constexpr uint16_t kStored = 0;
  static constexpr uint16_t kDeflated = 8;

  std::string name;
  uint16_t method = kStored;
  uint32_t crc32 = 0;
  uint64_t compressed_size = 0;
  uint64_t size = 0;           // uncompressed, as declared (and checked on reading)
  uint64_t header_offset = 0;  // the local header
  uint64_t data_offset = 0;    // the first byte of the stored or compressed data
};

class ZipArchive {
 public:
  Status Open(const std::string& path);

  const std::vector<ZipEntry>& entries() const { return entries_; }  // central directory order
  const ZipEntry* Find(std::string_view name) const;
  const InputFile& file() const { return file_; }
  const std::string& path() const { return file_.path(); }

  // The whole entry, if its declared size is at most `limit` (checked before
  // anything is allocated); `budget` names the limit in the error.
  Result<std::string> Read(const ZipEntry& entry, uint64_t limit, const char* budget) const;

  // Streams the entry's uncompressed bytes: fn(offset, data, n) for
  // consecutive pieces of at most kReadChunk bytes, each but the last exactly
  // kReadChunk. Checks the length and CRC-32 at the end (a piece already
  // delivered may belong to an entry found corrupt: use the data only when
  // this returns Ok). Returns CancelledStatus when cancellation is requested
  // (polled between pieces), fn's first error, or the read error. `buffer`
  // is scratch space, grown to at most kReadChunk + 1 MiB: reused across
  // calls, it spares an allocation (and its page faults) per entry.
  using ChunkFn = std::function<Status(uint64_t offset, const char* data, size_t n)>;
  Status ReadChunks(const ZipEntry& entry, const ChunkFn& fn, std::vector<char>* buffer) const;

 private:
  Status ReadDirectory(uint64_t offset, uint64_t size, uint64_t count);
  Status CheckLocalHeaders(uint64_t data_end);
  Status Inflate(const ZipEntry& entry, const ChunkFn& fn, std::vector<char>* buffer,
                 uint32_t* crc) const;
  std::string Where(const ZipEntry& entry) const;

  InputFile file_;
  std::vector<ZipEntry> entries_;
  std::map<std::string, size_t, std::less<>> by_name_;
};

}  // namespace ckptfs::core

#endif  // CKPTFS_CORE_ZIP_READER_H_
