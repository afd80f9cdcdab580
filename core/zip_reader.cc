#include "core/zip_reader.h"

#include <zlib.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <utility>

#include "core/cancel.h"
#include "core/crc32.h"

namespace ckptfs::core {
namespace {

constexpr size_t kEndRecord = 22;  // end of central directory, without comment
constexpr size_t kZip64Locator = 20;
constexpr size_t kZip64EndRecord = 56;
constexpr size_t kCentralHeader = 46;
constexpr size_t kLocalHeader = 30;
constexpr size_t kMaxComment = 65535;
constexpr size_t kInflateInput = size_t{1} << 20;

uint16_t U16(const unsigned char* p) { return static_cast<uint16_t>(p[0] | p[1] << 8); }
uint32_t U32(const unsigned char* p) {
  return static_cast<uint32_t>(p[0]) | static_cast<uint32_t>(p[1]) << 8 |
         static_cast<uint32_t>(p[2]) << 16 | static_cast<uint32_t>(p[3]) << 24;
}
uint64_t U64(const unsigned char* p) { return U32(p) | static_cast<uint64_t>(U32(p + 4)) << 32; }

// [offset, offset + length) lies within [0, limit), without overflow.
bool Within(uint64_t offset, uint64_t length, uint64_t limit) {
  return offset <= limit && length <= limit - offset;
}

// The zip64 extended information extra field (id 1) holds, in this order,
// the 64-bit values of those header fields that are saturated.
Status ApplyZip64Extra(const unsigned char* extra, size_t len, bool want_size, bool want_csize,
                       bool want_offset, ZipEntry* e, const std::string& where) {
  size_t pos = 0;
  while (pos + 4 <= len) {
    const uint16_t id = U16(extra + pos), n = U16(extra + pos + 2);
    if (n > len - pos - 4) break;
    if (id == 1) {
      const unsigned char* p = extra + pos + 4;
      size_t left = n;
      auto take = [&](uint64_t* v) {
        if (left < 8) return false;
        *v = U64(p);
        p += 8, left -= 8;
        return true;
      };
      if ((want_size && !take(&e->size)) || (want_csize && !take(&e->compressed_size)) ||
          (want_offset && !take(&e->header_offset))) {
        return Status::Corrupt(where + ": zip64 extra field is too short");
      }
      return Status::Ok();
    }
    pos += 4 + n;
  }
  if (want_size || want_csize || want_offset) {
    return Status::Corrupt(where + ": sizes need a zip64 extra field, which is missing");
  }
  return Status::Ok();
}

class Inflater {
 public:
  Inflater() { ok_ = inflateInit2(&z_, -MAX_WBITS) == Z_OK; }  // raw deflate, as in zip
  ~Inflater() {
    if (ok_) inflateEnd(&z_);
  }
  Inflater(const Inflater&) = delete;
  Inflater& operator=(const Inflater&) = delete;
  bool ok() const { return ok_; }
  z_stream* z() { return &z_; }

 private:
  z_stream z_{};
  bool ok_ = false;
};

}  // namespace

std::string ZipArchive::Where(const ZipEntry& entry) const {
  return path() + ": entry '" + entry.name + "'";
}

const ZipEntry* ZipArchive::Find(std::string_view name) const {
  auto it = by_name_.find(name);
  return it == by_name_.end() ? nullptr : &entries_[it->second];
}

Status ZipArchive::Open(const std::string& path) {
  entries_.clear();
  by_name_.clear();
  if (Status s = file_.Open(path); !s.ok()) return s;
  const uint64_t size = file_.size();
  if (size < kEndRecord) return Status::Corrupt(path + ": too short for a zip file");
  // The end record is in the last 22 + 65535 bytes; a zip64 locator just before it.
  const size_t tail_len =
      static_cast<size_t>(std::min<uint64_t>(size, kEndRecord + kMaxComment + kZip64Locator));
  const uint64_t tail_at = size - tail_len;
  std::vector<unsigned char> tail(tail_len);
  if (Status s = file_.ReadAt(tail_at, tail.data(), tail_len); !s.ok()) return s;
  size_t end = std::string::npos;
  for (size_t i = tail_len - kEndRecord + 1; i-- > 0;) {
    if (std::memcmp(tail.data() + i, "PK\x05\x06", 4) == 0 &&
        i + kEndRecord + U16(tail.data() + i + 20) <= tail_len) {
      end = i;
      break;
    }
  }
  if (end == std::string::npos) {
    return Status::Corrupt(path + ": no end of central directory (not a zip file, or incomplete)");
  }
  const unsigned char* e = tail.data() + end;
  uint64_t count = U16(e + 10), cd_size = U32(e + 12), cd_offset = U32(e + 16);
  uint64_t limit = tail_at + end;  // the central directory ends before this
  if (U16(e + 4) != 0 || U16(e + 6) != 0 || U16(e + 8) != U16(e + 10)) {
    return Status::Unsupported(path + ": multi-disk zip archives are not supported");
  }
  if (end >= kZip64Locator && std::memcmp(e - kZip64Locator, "PK\x06\x07", 4) == 0) {
    const unsigned char* loc = e - kZip64Locator;
    const uint64_t at = U64(loc + 8);
    if (U32(loc + 4) != 0 || U32(loc + 16) > 1 ||
        !Within(at, kZip64EndRecord, tail_at + end - kZip64Locator)) {
      return Status::Corrupt(path + ": bad zip64 end of central directory locator");
    }
    unsigned char rec[kZip64EndRecord];
    if (Status s = file_.ReadAt(at, rec, sizeof(rec)); !s.ok()) return s;
    if (std::memcmp(rec, "PK\x06\x06", 4) != 0 || U32(rec + 16) != 0 || U32(rec + 20) != 0 ||
        U64(rec + 24) != U64(rec + 32)) {
      return Status::Corrupt(path + ": bad zip64 end of central directory record");
    }
    count = U64(rec + 32), cd_size = U64(rec + 40), cd_offset = U64(rec + 48);
    limit = at;
  } else if (count == 0xFFFF || cd_size == 0xFFFFFFFF || cd_offset == 0xFFFFFFFF) {
    return Status::Corrupt(path +
                           ": needs a zip64 end of central directory record, which is missing");
  }
  if (count > kMaxZipEntries) {
    return Status::Unsupported(path + ": " + std::to_string(count) +
                               " zip entries, more than the " + std::to_string(kMaxZipEntries) +
                               " of kMaxZipEntries");
  }
  if (cd_size > kMaxZipCentralDirectory) {
    return Status::Unsupported(path + ": central directory of " + std::to_string(cd_size) +
                               " bytes, more than the " + std::to_string(kMaxZipCentralDirectory) +
                               " of kMaxZipCentralDirectory");
  }
  if (!Within(cd_offset, cd_size, limit) || count > cd_size / kCentralHeader) {
    return Status::Corrupt(path + ": central directory (" + std::to_string(count) + " entries, " +
                           std::to_string(cd_size) + " bytes at " + std::to_string(cd_offset) +
                           ") does not fit the file");
  }
  if (Status s = ReadDirectory(cd_offset, cd_size, count); !s.ok()) return s;
  return CheckLocalHeaders(cd_offset);
}

Status ZipArchive::ReadDirectory(uint64_t offset, uint64_t size, uint64_t count) {
  std::vector<unsigned char> cd(static_cast<size_t>(size));
  if (Status s = file_.ReadAt(offset, cd.data(), cd.size()); !s.ok()) return s;
  entries_.reserve(static_cast<size_t>(count));
  size_t pos = 0;
  for (uint64_t i = 0; i < count; ++i) {
    const std::string where = path() + ": central directory entry " + std::to_string(i);
    if (cd.size() - pos < kCentralHeader || std::memcmp(cd.data() + pos, "PK\x01\x02", 4) != 0) {
      return Status::Corrupt(where + ": bad header");
    }
    const unsigned char* h = cd.data() + pos;
    const size_t name_len = U16(h + 28), extra_len = U16(h + 30), comment_len = U16(h + 32);
    if (cd.size() - pos - kCentralHeader < name_len + extra_len + comment_len) {
      return Status::Corrupt(where + ": runs past the central directory");
    }
    ZipEntry entry;
    entry.name.assign(reinterpret_cast<const char*>(h + kCentralHeader), name_len);
    const std::string named = path() + ": entry '" + entry.name + "'";
    const uint16_t flags = U16(h + 8);
    entry.method = U16(h + 10);
    entry.crc32 = U32(h + 16);
    entry.compressed_size = U32(h + 20);
    entry.size = U32(h + 24);
    entry.header_offset = U32(h + 42);
    if (Status s = ApplyZip64Extra(h + kCentralHeader + name_len, extra_len,
                                   entry.size == 0xFFFFFFFF, entry.compressed_size == 0xFFFFFFFF,
                                   entry.header_offset == 0xFFFFFFFF, &entry, named);
        !s.ok()) {
      return s;
    }
    if ((flags & 0x41) != 0) return Status::Unsupported(named + ": is encrypted");
    if (entry.method != ZipEntry::kStored && entry.method != ZipEntry::kDeflated) {
      return Status::Unsupported(named + ": compression method " + std::to_string(entry.method) +
                                 " (only stored and deflated entries are read)");
    }
    if (entry.method == ZipEntry::kStored && entry.compressed_size != entry.size) {
      return Status::Corrupt(named + ": stored, but its sizes differ (" +
                             std::to_string(entry.size) + " and " +
                             std::to_string(entry.compressed_size) + ")");
    }
    if (entry.method == ZipEntry::kDeflated) {
      if (entry.size / kMaxDeflateRatio > entry.compressed_size) {
        return Status::Corrupt(named + ": declares " + std::to_string(entry.size) + " bytes from " +
                               std::to_string(entry.compressed_size) +
                               " compressed, more than deflate can produce (kMaxDeflateRatio)");
      }
      if (entry.size > kMaxInflatedEntryBytes) {
        return Status::Unsupported(
            named + ": deflated to " + std::to_string(entry.size) + " bytes, more than the " +
            std::to_string(kMaxInflatedEntryBytes) + " of kMaxInflatedEntryBytes");
      }
    }
    if (!by_name_.emplace(entry.name, entries_.size()).second) {
      return Status::Corrupt(named + ": appears twice in the central directory");
    }
    entries_.push_back(std::move(entry));
    pos += kCentralHeader + name_len + extra_len + comment_len;
  }
  return Status::Ok();
}

// Each entry's local header must be where the central directory says, name
// the same entry, and its data must end before the next entry begins.
Status ZipArchive::CheckLocalHeaders(uint64_t data_end) {
  std::vector<size_t> order(entries_.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    return entries_[a].header_offset < entries_[b].header_offset;
  });
  std::vector<unsigned char> header;
  for (size_t k = 0; k < order.size(); ++k) {
    ZipEntry& entry = entries_[order[k]];
    const std::string where = Where(entry);
    const uint64_t next = k + 1 < order.size() ? entries_[order[k + 1]].header_offset : data_end;
    if (!Within(entry.header_offset, kLocalHeader + entry.name.size(), next)) {
      return Status::Corrupt(where + ": local header at " + std::to_string(entry.header_offset) +
                             " overlaps the next entry or lies outside the file");
    }
    header.resize(kLocalHeader + entry.name.size());
    if (Status s = file_.ReadAt(entry.header_offset, header.data(), header.size()); !s.ok())
      return s;
    if (std::memcmp(header.data(), "PK\x03\x04", 4) != 0 ||
        std::memcmp(header.data() + kLocalHeader, entry.name.data(), entry.name.size()) != 0 ||
        U16(header.data() + 26) != entry.name.size()) {
      return Status::Corrupt(where + ": its local header is missing or names another entry");
    }
    entry.data_offset =
        entry.header_offset + kLocalHeader + entry.name.size() + U16(header.data() + 28);
    if (!Within(entry.data_offset, entry.compressed_size, next)) {
      return Status::Corrupt(where + ": its " + std::to_string(entry.compressed_size) +
                             " bytes of data overlap the next entry or lie outside the file");
    }
  }
  return Status::Ok();
}

Result<std::string> ZipArchive::Read(const ZipEntry& entry, uint64_t limit,
                                     const char* budget) const {
  if (entry.size > limit) {
    return Status::Unsupported(Where(entry) + ": " + std::to_string(entry.size) +
                               " bytes, more than the " + std::to_string(limit) + " of " + budget);
  }
  std::string out(static_cast<size_t>(entry.size), '\0');
  std::vector<char> buffer;
  Status s = ReadChunks(
      entry,
      [&out](uint64_t offset, const char* data, size_t n) {
        std::memcpy(out.data() + offset, data, n);
        return Status::Ok();
      },
      &buffer);
  if (!s.ok()) return s;
  return out;
}

Status ZipArchive::ReadChunks(const ZipEntry& entry, const ChunkFn& fn,
                              std::vector<char>* buffer) const {
  uint32_t crc = 0;
  if (entry.method == ZipEntry::kDeflated) {
    if (Status s = Inflate(entry, fn, buffer, &crc); !s.ok()) return s;
  } else {
    const size_t piece = static_cast<size_t>(std::min<uint64_t>(entry.size, kReadChunk));
    if (buffer->size() < piece) buffer->resize(piece);
    char* buf = buffer->data();
    for (uint64_t done = 0; done < entry.size;) {
      if (CancelRequested()) return CancelledStatus(Where(entry));
      const size_t n = static_cast<size_t>(std::min<uint64_t>(entry.size - done, piece));
      if (Status s = file_.ReadAt(entry.data_offset + done, buf, n); !s.ok()) return s;
      crc = Crc32(crc, buf, n);
      if (Status s = fn(done, buf, n); !s.ok()) return s;
      done += n;
    }
  }
  if (crc != entry.crc32) {
    return Status::Corrupt(Where(entry) +
                           ": CRC-32 mismatch (corrupt, or changed while it was read)");
  }
  return Status::Ok();
}

Status ZipArchive::Inflate(const ZipEntry& entry, const ChunkFn& fn, std::vector<char>* buffer,
                           uint32_t* crc) const {
  Inflater inflater;
  if (!inflater.ok()) return Status::Corrupt(Where(entry) + ": cannot start inflating");
  z_stream* z = inflater.z();
  // buffer: [out: one piece][in: compressed bytes]
  const size_t out_size = static_cast<size_t>(std::min<uint64_t>(entry.size, kReadChunk));
  const size_t in_size =
      static_cast<size_t>(std::min<uint64_t>(entry.compressed_size, kInflateInput));
  if (buffer->size() < out_size + in_size) buffer->resize(out_size + in_size);
  char* out = buffer->data();
  char* in = buffer->data() + out_size;
  uint64_t read = 0;
  bool ended = false;
  // Inflates into buf until cap bytes are out or the stream ends; the bytes out.
  auto fill = [&](char* buf, size_t cap) -> Result<size_t> {
    z->next_out = reinterpret_cast<Bytef*>(buf);
    z->avail_out = static_cast<uInt>(cap);
    while (z->avail_out > 0 && !ended) {
      if (z->avail_in == 0 && read < entry.compressed_size) {
        const size_t n =
            static_cast<size_t>(std::min<uint64_t>(entry.compressed_size - read, in_size));
        if (Status s = file_.ReadAt(entry.data_offset + read, in, n); !s.ok()) return s;
        read += n;
        z->next_in = reinterpret_cast<Bytef*>(in);
        z->avail_in = static_cast<uInt>(n);
      }
      // With every compressed byte read, zlib may still hold output (its
      // window, the block's end): inflate is called until it makes no
      // progress, and only then does the stream end early.
      const uInt room = z->avail_out;
      const int rc = inflate(z, Z_NO_FLUSH);
      if (rc == Z_STREAM_END) {
        ended = true;
      } else if ((rc == Z_OK || rc == Z_BUF_ERROR) && z->avail_in == 0 &&
                 read == entry.compressed_size && z->avail_out == room) {
        return Status::Corrupt(Where(entry) + ": deflate data ends early");
      } else if (rc != Z_OK && rc != Z_BUF_ERROR) {
        return Status::Corrupt(Where(entry) + ": bad deflate data (" + (z->msg ? z->msg : "error") +
                               ")");
      }
    }
    return cap - z->avail_out;
  };
  for (uint64_t produced = 0; produced < entry.size;) {
    if (CancelRequested()) return CancelledStatus(Where(entry));
    const size_t want = static_cast<size_t>(std::min<uint64_t>(entry.size - produced, out_size));
    Result<size_t> n = fill(out, want);
    if (!n.ok()) return n.status();
    if (*n < want) {
      return Status::Corrupt(Where(entry) + ": inflates to " + std::to_string(produced + *n) +
                             " bytes, its header says " + std::to_string(entry.size));
    }
    *crc = Crc32(*crc, out, *n);
    if (Status s = fn(produced, out, *n); !s.ok()) return s;
    produced += *n;
  }
  // Every declared byte is out: the stream must end here, with nothing more.
  char extra;
  Result<size_t> more = fill(&extra, 1);
  if (!more.ok()) return more.status();
  if (*more != 0) {
    return Status::Corrupt(Where(entry) + ": inflates to more than its declared " +
                           std::to_string(entry.size) + " bytes");
  }
  return Status::Ok();
}

}  // namespace ckptfs::core
