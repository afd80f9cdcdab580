#include "core/crc32.h"

#include <gtest/gtest.h>
#include <zlib.h>

#include <random>
#include <vector>

namespace ckptfs::core {
namespace {

uint32_t Zlib(uint32_t crc, const std::vector<unsigned char>& b, size_t at, size_t n) {
  return static_cast<uint32_t>(crc32_z(crc, b.data() + at, n));
}

// zlib is the reference: every length from 0 to 600 at every alignment
// (ISA-L folds 64 bytes at a time and handles heads and tails apart), then
// long buffers.
TEST(Crc32Test, EqualsZlibForEveryLengthAndAlignment) {
  std::mt19937 rng(7);
  std::vector<unsigned char> b(1 << 20);
  for (unsigned char& c : b) c = static_cast<unsigned char>(rng());
  for (size_t at = 0; at < 16; ++at) {
    for (size_t n = 0; n <= 600; ++n) {
      ASSERT_EQ(Crc32(0, b.data() + at, n), Zlib(0, b, at, n)) << "at " << at << " n " << n;
    }
  }
  EXPECT_EQ(Crc32(0, b.data(), b.size()), Zlib(0, b, 0, b.size()));
  EXPECT_EQ(Crc32(0, "123456789", 9), 0xCBF43926u);  // the CRC-32 check value
}

TEST(Crc32Test, ChainsLikeZlib) {
  std::mt19937 rng(11);
  std::vector<unsigned char> b(300000);
  for (unsigned char& c : b) c = static_cast<unsigned char>(rng());
  const uint32_t whole = Zlib(0, b, 0, b.size());
  for (size_t cut : {size_t{0}, size_t{1}, size_t{63}, size_t{64}, size_t{4097}, b.size()}) {
    const uint32_t head = Crc32(0, b.data(), cut);
    EXPECT_EQ(Crc32(head, b.data() + cut, b.size() - cut), whole) << cut;
    EXPECT_EQ(static_cast<uint32_t>(crc32_combine(head, Crc32(0, b.data() + cut, b.size() - cut),
                                                  static_cast<z_off_t>(b.size() - cut))),
              whole);
  }
}

}  // namespace
}  // namespace ckptfs::core
