// The zip layout of torch.save's archives: see zip_writer.h.
#include "core/zip_writer.h"

#include <algorithm>

namespace ckptfs::core {
namespace {

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

}  // namespace

size_t ZipLayout::Add(const std::string& name, uint64_t size) {
  Record r;
  r.name = "archive/" + name;
  r.size = size;
  r.header_offset = end_;
  const uint64_t base = end_ + 30 + r.name.size() + (size >= kZip32Max ? 20 : 0) + 4;
  r.data_offset = base + (kZipAlignment - base % kZipAlignment) % kZipAlignment;
  end_ = r.data_offset + size;
  records_.push_back(std::move(r));
  return records_.size() - 1;
}

std::string ZipLayout::LocalHeader(const Record& r) const {
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

std::string ZipLayout::Directory() const {
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

}  // namespace ckptfs::core
