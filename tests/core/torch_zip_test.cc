// The zip container of PyTorch checkpoints on crafted input (core's bounded
// zip reader) and the torch zip averaging on what real writers produce
// beyond torch.save: deflated entries (Python's zipfile), zip bombs, sizes
// that overflow.
#include <gtest/gtest.h>
#include <sys/resource.h>
#include <unistd.h>
#include <zlib.h>

#include <cstring>

#include "core/averaging.h"
#include "core/zip_reader.h"
#include "test_util.h"

namespace ckptfs::core {
namespace {

using testing::TempDir;

constexpr uint64_t kMiB = uint64_t{1} << 20;

// The fuzzing seeds double as fixtures: real torch.save files and crafted
// ones (tests/e2e/test_robust_average.py --write-seeds writes them).
std::string Seed(const std::string& name) {
  return std::string(CKPTFS_TENSOR_FIXTURES) + "/../../fuzz/corpus/zip/" + name;
}

std::string Deflate(const std::string& data) {
  z_stream z{};
  EXPECT_EQ(deflateInit2(&z, 9, Z_DEFLATED, -MAX_WBITS, 8, Z_DEFAULT_STRATEGY), Z_OK);
  std::string out(deflateBound(&z, data.size()), '\0');
  z.next_in = reinterpret_cast<Bytef*>(const_cast<char*>(data.data()));
  z.avail_in = static_cast<uInt>(data.size());
  z.next_out = reinterpret_cast<Bytef*>(out.data());
  z.avail_out = static_cast<uInt>(out.size());
  EXPECT_EQ(deflate(&z, Z_FINISH), Z_STREAM_END);
  out.resize(z.total_out);
  deflateEnd(&z);
  return out;
}

uint32_t Crc(const std::string& data) {
  return static_cast<uint32_t>(crc32(0, reinterpret_cast<const Bytef*>(data.data()), data.size()));
}

// `mib` MiB of zeros as raw deflate, one full-flush segment repeated (about
// 1 KiB per MiB): a zip bomb made in milliseconds.
std::string ZerosDeflated(uint64_t mib) {
  z_stream z{};
  deflateInit2(&z, 9, Z_DEFLATED, -MAX_WBITS, 8, Z_DEFAULT_STRATEGY);
  std::string zeros(kMiB, '\0'), seg(kMiB, '\0');
  z.next_in = reinterpret_cast<Bytef*>(zeros.data());
  z.avail_in = static_cast<uInt>(zeros.size());
  z.next_out = reinterpret_cast<Bytef*>(seg.data());
  z.avail_out = static_cast<uInt>(seg.size());
  deflate(&z, Z_FULL_FLUSH);
  seg.resize(seg.size() - z.avail_out);
  char tail[64];
  z.next_out = reinterpret_cast<Bytef*>(tail);
  z.avail_out = sizeof(tail);
  deflate(&z, Z_FINISH);
  std::string out;
  out.reserve(seg.size() * mib + 64);
  for (uint64_t i = 0; i < mib; ++i) out += seg;
  out.append(tail, sizeof(tail) - z.avail_out);
  deflateEnd(&z);
  return out;
}

void Put16(std::string* s, uint32_t v) { s->push_back(char(v)), s->push_back(char(v >> 8)); }
void Put32(std::string* s, uint32_t v) { Put16(s, v & 0xFFFF), Put16(s, v >> 16); }

// A zip file of entries whose payload is already compressed (or not), with
// every field under the test's control.
struct Entry {
  std::string name;
  std::string payload;  // as stored in the file
  uint16_t method = 0;
  uint32_t crc = 0;
  uint64_t size = 0;  // declared uncompressed
  uint16_t flags = 0;
  std::string local_name;    // when it should differ from name
  int64_t offset_shift = 0;  // added to the central directory's local header offset
};

Entry Raw(const std::string& name, std::string payload, uint16_t method, uint32_t crc,
          uint64_t size) {
  Entry e;
  e.name = name, e.payload = std::move(payload), e.method = method, e.crc = crc, e.size = size;
  return e;
}
Entry Stored(const std::string& name, const std::string& data) {
  return Raw(name, data, 0, Crc(data), data.size());
}
Entry Deflated(const std::string& name, const std::string& data) {
  return Raw(name, Deflate(data), 8, Crc(data), data.size());
}

// Sizes of 4 GiB and more go to a zip64 extra field, as zip writers do.
std::string BuildZip(const std::vector<Entry>& entries) {
  std::string out, central;
  for (const Entry& e : entries) {
    const uint32_t offset = static_cast<uint32_t>(out.size());
    const std::string& lname = e.local_name.empty() ? e.name : e.local_name;
    const bool zip64 = e.size >= 0xFFFFFFFF;
    std::string extra;
    if (zip64) {
      Put16(&extra, 1), Put16(&extra, 8), Put32(&extra, uint32_t(e.size)),
          Put32(&extra, uint32_t(e.size >> 32));
    }
    const uint32_t size32 = zip64 ? 0xFFFFFFFF : uint32_t(e.size);
    Put32(&out, 0x04034B50), Put16(&out, 20), Put16(&out, e.flags), Put16(&out, e.method);
    Put16(&out, 0), Put16(&out, 0x21), Put32(&out, e.crc), Put32(&out, uint32_t(e.payload.size()));
    Put32(&out, size32), Put16(&out, uint32_t(lname.size())), Put16(&out, uint32_t(extra.size()));
    out += lname + extra + e.payload;
    Put32(&central, 0x02014B50), Put16(&central, 20), Put16(&central, 20), Put16(&central, e.flags);
    Put16(&central, e.method), Put16(&central, 0), Put16(&central, 0x21), Put32(&central, e.crc);
    Put32(&central, uint32_t(e.payload.size())), Put32(&central, size32);
    Put16(&central, uint32_t(e.name.size())), Put16(&central, uint32_t(extra.size())),
        Put16(&central, 0);
    Put16(&central, 0), Put16(&central, 0), Put32(&central, 0);
    Put32(&central, uint32_t(int64_t{offset} + e.offset_shift));
    central += e.name + extra;
  }
  const uint32_t cd_offset = static_cast<uint32_t>(out.size());
  out += central;
  Put32(&out, 0x06054B50), Put16(&out, 0), Put16(&out, 0), Put16(&out, uint32_t(entries.size()));
  Put16(&out, uint32_t(entries.size())), Put32(&out, uint32_t(central.size())),
      Put32(&out, cd_offset);
  Put16(&out, 0);
  return out;
}

// The entries of a real torch.save file, stored as they are.
std::vector<Entry> EntriesOf(const std::string& path) {
  ZipArchive zip;
  EXPECT_TRUE(zip.Open(path).ok());
  std::vector<Entry> out;
  for (const ZipEntry& e : zip.entries())
    out.push_back(Stored(e.name, *zip.Read(e, 1 << 30, "test")));
  return out;
}

long MaxRssKiB() {
  struct rusage ru {};
  ::getrusage(RUSAGE_SELF, &ru);
  return ru.ru_maxrss;
}

class ZipArchiveTest : public ::testing::Test {
 protected:
  std::string Write(const std::string& bytes, const std::string& name = "t.zip") {
    const std::string p = dir_.path() + "/" + name;
    testing::WriteFile(p, bytes);
    return p;
  }
  TempDir dir_;
};

TEST_F(ZipArchiveTest, ReadsStoredAndDeflatedEntriesInBoundedPieces) {
  std::string big(9 * kMiB + 7, '\0');
  for (size_t i = 0; i < big.size(); ++i) big[i] = static_cast<char>(i * 7 % 251);
  ZipArchive zip;
  ASSERT_TRUE(
      zip.Open(Write(BuildZip({Stored("a/s", "hello"), Deflated("a/d", big), Stored("a/e", "")})))
          .ok());
  ASSERT_EQ(zip.entries().size(), 3u);
  EXPECT_EQ(*zip.Read(*zip.Find("a/s"), 100, "test"), "hello");
  EXPECT_EQ(*zip.Read(*zip.Find("a/e"), 100, "test"), "");
  std::vector<size_t> pieces;
  std::string got;
  std::vector<char> buffer;
  Status s = zip.ReadChunks(
      *zip.Find("a/d"),
      [&](uint64_t offset, const char* data, size_t n) {
        EXPECT_EQ(offset, got.size());
        pieces.push_back(n);
        got.append(data, n);
        return Status::Ok();
      },
      &buffer);
  ASSERT_TRUE(s.ok()) << s.message();
  EXPECT_EQ(got, big);
  EXPECT_EQ(pieces, (std::vector<size_t>{kReadChunk, kReadChunk, big.size() - 2 * kReadChunk}));
  EXPECT_EQ(zip.Find("a/missing"), nullptr);
}

TEST_F(ZipArchiveTest, ReadsWhatTorchSaveAndPythonZipfileWrite) {
  ZipArchive stored, deflated;
  ASSERT_TRUE(stored.Open(Seed("state_dict.pt")).ok());  // zip64 end records, data descriptors
  ASSERT_TRUE(deflated.Open(Seed("deflated.pt")).ok());  // the same, rewritten deflated
  ASSERT_EQ(stored.entries().size(), deflated.entries().size());
  for (const ZipEntry& e : stored.entries()) {
    const ZipEntry* d = deflated.Find(e.name);
    ASSERT_NE(d, nullptr) << e.name;
    EXPECT_EQ(d->method, ZipEntry::kDeflated);
    EXPECT_EQ(*deflated.Read(*d, kMiB, "test"), *stored.Read(e, kMiB, "test")) << e.name;
  }
}

TEST_F(ZipArchiveTest, RefusesCraftedArchivesNamingFileAndEntry) {
  const std::string data = "0123456789abcdef";
  auto with = [&](auto change) {
    std::vector<Entry> e = {Stored("a/x", data), Stored("a/y", data)};
    change(&e);
    return BuildZip(e);
  };
  const std::string good = with([](std::vector<Entry>*) {});
  const size_t cd_at = good.size() - 22 - 2 * (46 + 3);
  struct Case {
    const char* why;
    std::string bytes;
    StatusCode code;
    const char* names;
  } cases[] = {
      {"no end record", good.substr(0, good.size() - 22), StatusCode::kCorrupt,
       "end of central directory"},
      {"central directory past the end",
       good.substr(0, good.size() - 6) + std::string("\xff\xff\x00\x00", 4) +
           good.substr(good.size() - 2),
       StatusCode::kCorrupt, "does not fit"},
      {"more entries than fit",
       good.substr(0, good.size() - 14) + std::string("\xff\x00\xff\x00", 4) +
           good.substr(good.size() - 10),
       StatusCode::kCorrupt, "does not fit"},
      {"local header elsewhere", with([](auto* e) { (*e)[1].offset_shift = 3; }),
       StatusCode::kCorrupt, "a/y"},
      {"local header past the data", with([&](auto* e) { (*e)[1].offset_shift = int64_t(cd_at); }),
       StatusCode::kCorrupt, "a/y"},
      {"names differ", with([](auto* e) { (*e)[0].local_name = "a/z"; }), StatusCode::kCorrupt,
       "a/x"},
      {"duplicate", with([](auto* e) { (*e)[1].name = (*e)[1].local_name = "a/x"; }),
       StatusCode::kCorrupt, "twice"},
      {"overlapping entries",
       with([&](auto* e) { (*e)[1].offset_shift = -int64_t(30 + 3 + data.size()); }),
       StatusCode::kCorrupt, "overlaps"},
      {"encrypted", with([](auto* e) { (*e)[0].flags = 1; }), StatusCode::kUnsupported,
       "encrypted"},
      {"bzip2", with([](auto* e) { (*e)[1].method = 12; }), StatusCode::kUnsupported, "method 12"},
      {"stored sizes differ", with([](auto* e) { (*e)[0].size = 99; }), StatusCode::kCorrupt,
       "sizes differ"},
      {"impossible ratio", with([](auto* e) { (*e)[0].method = 8, (*e)[0].size = 0xFFFFFF00; }),
       StatusCode::kCorrupt, "more than deflate can produce"},
  };
  for (const Case& c : cases) {
    ZipArchive zip;
    Status s = zip.Open(Write(c.bytes));
    ASSERT_FALSE(s.ok()) << c.why;
    EXPECT_EQ(s.code(), c.code) << c.why << ": " << s.message();
    EXPECT_NE(s.message().find("t.zip"), std::string::npos) << c.why << ": " << s.message();
    EXPECT_NE(s.message().find(c.names), std::string::npos) << c.why << ": " << s.message();
  }
}

TEST_F(ZipArchiveTest, ReadingChecksLengthAndCrcOfWhatItInflates) {
  std::string data(100000, '\0');  // incompressible: half of its deflate stream is cut short
  uint32_t x = 1;
  for (char& c : data) c = static_cast<char>((x = x * 1103515245 + 12345) >> 24);
  Entry crc = Deflated("a/e", data);
  crc.crc ^= 1;
  Entry shorter = Deflated("a/e", data);  // declares less than it inflates to
  shorter.size = 1000;
  Entry longer = Deflated("a/e", data);
  longer.size = data.size() + 1;
  Entry cut = Deflated("a/e", data);
  cut.payload.resize(cut.payload.size() / 2);
  Entry junk = Stored("a/e", std::string(64, '\xff'));
  junk.method = 8, junk.size = 1000;
  Entry stored_crc = Stored("a/e", data);
  stored_crc.crc ^= 1;
  struct Case {
    Entry entry;
    const char* says;
  } cases[] = {
      {crc, "CRC-32 mismatch"},           {shorter, "more than its declared 1000 bytes"},
      {longer, "its header says 100001"}, {cut, "ends early"},
      {junk, "bad deflate data"},         {stored_crc, "CRC-32 mismatch"},
  };
  for (const Case& c : cases) {
    ZipArchive zip;
    ASSERT_TRUE(zip.Open(Write(BuildZip({c.entry}))).ok()) << c.says;
    Result<std::string> r = zip.Read(zip.entries()[0], 1 << 20, "test");
    ASSERT_FALSE(r.ok()) << c.says;
    EXPECT_EQ(r.status().code(), StatusCode::kCorrupt);
    EXPECT_NE(r.status().message().find("t.zip: entry 'a/e'"), std::string::npos)
        << r.status().message();
    EXPECT_NE(r.status().message().find(c.says), std::string::npos) << r.status().message();
  }
}

TEST_F(ZipArchiveTest, ZipBombIsRefusedBeforeAnythingIsAllocated) {
  // 3 MiB of deflate that inflates to 3 GiB, declared truthfully.
  Entry bomb = Raw("a/data.pkl", ZerosDeflated(3 << 10), 8, 0, uint64_t{3} << 30);
  ASSERT_LT(bomb.payload.size(), 4 * kMiB);
  ZipArchive zip;
  ASSERT_TRUE(zip.Open(Write(BuildZip({bomb}))).ok());
  const long before = MaxRssKiB();
  Result<std::string> r = zip.Read(zip.entries()[0], 256 * kMiB, "kMaxPickleBytes");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kUnsupported);
  EXPECT_NE(
      r.status().message().find("entry 'a/data.pkl': 3221225472 bytes, more than the 268435456 of "
                                "kMaxPickleBytes"),
      std::string::npos)
      << r.status().message();
  EXPECT_LT(MaxRssKiB() - before, 64 << 10) << "peak memory grew by more than 64 MiB";
  // Past kMaxInflatedEntryBytes no entry is read at all, whatever the caller's budget.
  Entry huge = Raw("a/big", std::string(5 * kMiB, '\0'), 8, 0, kMaxInflatedEntryBytes + 1);
  Status s = zip.Open(Write(BuildZip({huge})));
  EXPECT_EQ(s.code(), StatusCode::kUnsupported) << s.message();
  EXPECT_NE(s.message().find("kMaxInflatedEntryBytes"), std::string::npos) << s.message();
}

class TorchZipTest : public ZipArchiveTest {};

TEST_F(TorchZipTest, DeflatedMembersAverageExactlyAsStoredOnes) {
  const std::string out_stored = dir_.path() + "/stored.pt", out_mixed = dir_.path() + "/mixed.pt";
  Result<AverageResult> a =
      AverageFiles({Seed("state_dict.pt"), Seed("state_dict.pt")}, out_stored, nullptr);
  ASSERT_TRUE(a.ok()) << a.status().message();
  Result<AverageResult> b =
      AverageFiles({Seed("deflated.pt"), Seed("state_dict.pt")}, out_mixed, nullptr);
  ASSERT_TRUE(b.ok()) << b.status().message();
  EXPECT_EQ(b->tensors_averaged, a->tensors_averaged);
  EXPECT_EQ(testing::ReadFile(out_mixed), testing::ReadFile(out_stored));
  // Only data.pkl deflated: the same again.
  ASSERT_TRUE(
      AverageFiles({Seed("deflated_pickle_only.pt"), Seed("tied.pt")}, out_mixed, nullptr).ok());
  ASSERT_TRUE(AverageFiles({Seed("tied.pt"), Seed("tied.pt")}, out_stored, nullptr).ok());
  EXPECT_EQ(testing::ReadFile(out_mixed), testing::ReadFile(out_stored));
}

TEST_F(TorchZipTest, CraftedMembersFailNamingFileAndCause) {
  // A torch.save file with its data.pkl swapped for a bomb, or its records
  // changed in ways no writer produces.
  auto variant = [&](const std::string& name, auto change) {
    std::vector<Entry> e = EntriesOf(Seed("state_dict.pt"));
    change(&e);
    return Write(BuildZip(e), name);
  };
  const std::string bomb = variant("bomb.pt", [](auto* e) {
    (*e)[0] = Raw("state_dict/data.pkl", ZerosDeflated(3 << 10), 8, 0, uint64_t{3} << 30);
  });
  const std::string big_endian =
      variant("big.pt", [](auto* e) { e->push_back(Stored("state_dict/byteorder", "big")); });
  const std::string short_record = variant(
      "short.pt", [](auto* e) { (*e)[1] = Stored((*e)[1].name, (*e)[1].payload.substr(4)); });
  const std::string no_version = variant("nover.pt", [](auto* e) { e->pop_back(); });
  const std::string outside = variant("outside.pt", [](auto* e) { (*e)[3].name = "other/data/2"; });
  struct Case {
    std::string member;
    StatusCode code;
    const char* says;
  } cases[] = {
      {Seed("overflow_numel.pt"), StatusCode::kCorrupt, "storage size overflows int64"},
      {Seed("overflow_stride.pt"), StatusCode::kCorrupt, "tensor size arithmetic overflows int64"},
      {Seed("bomb_declared.pt"), StatusCode::kCorrupt, "more than deflate can produce"},
      {Seed("bomb_lying.pt"), StatusCode::kCorrupt, "more than its declared 1024 bytes"},
      {Seed("bomb_small.pt"), StatusCode::kCorrupt, "data.pkl"},
      {bomb, StatusCode::kUnsupported,
       "'state_dict/data.pkl': 3221225472 bytes, more than the 268435456 of kMaxPickleBytes"},
      {big_endian, StatusCode::kUnsupported, "byte order 'big'"},
      {short_record, StatusCode::kCorrupt, "record data/0 holds 156 bytes"},
      {no_version, StatusCode::kCorrupt, "no version record"},
      {outside, StatusCode::kCorrupt, "outside the archive's folder"},
  };
  // Loads the libtorch plugin (about 150 MB) before memory is measured.
  ASSERT_TRUE(AverageFiles({Seed("state_dict.pt")}, dir_.path() + "/warm.pt", nullptr).ok());
  for (const Case& c : cases) {
    const std::string out = dir_.path() + "/out.pt";
    const long before = MaxRssKiB();
    Result<AverageResult> r = AverageFiles({c.member, c.member}, out, nullptr);
    ASSERT_FALSE(r.ok()) << c.member;
    EXPECT_EQ(r.status().code(), c.code) << r.status().message();
    EXPECT_NE(r.status().message().find(c.member), std::string::npos) << r.status().message();
    EXPECT_NE(r.status().message().find(c.says), std::string::npos) << r.status().message();
    EXPECT_LT(MaxRssKiB() - before, 64 << 10) << c.member;
    EXPECT_NE(::access(out.c_str(), F_OK), 0);
  }
}

}  // namespace
}  // namespace ckptfs::core
