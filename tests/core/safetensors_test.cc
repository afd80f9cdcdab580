#include "core/safetensors.h"

#include <gtest/gtest.h>

namespace ckptfs::core {
namespace {

Result<SafetensorsHeader> Parse(const std::string& json, uint64_t data_bytes) {
  return ParseSafetensorsHeader(json, json.size(), 8 + json.size() + data_bytes, "m.safetensors");
}

TEST(SafetensorsTest, ValidHeaders) {
  auto h = Parse(
      R"({"__metadata__":{"format":"pt"},"b":{"dtype":"I64","shape":[2],"data_offsets":[24,40]},)"
      R"("a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]}})",
      40);
  ASSERT_TRUE(h.ok()) << h.status().message();
  ASSERT_EQ(h->tensors.size(), 2u);
  EXPECT_EQ(h->tensors[0].name, "a");  // in data order
  EXPECT_EQ(h->tensors[1].dtype, DType::kI64);
  EXPECT_TRUE(Parse(R"({"s":{"dtype":"F16","shape":[],"data_offsets":[0,2]},)"
                    R"("e":{"dtype":"F32","shape":[0],"data_offsets":[2,2]}})",
                    2)
                  .ok());
  EXPECT_TRUE(Parse("{}", 0).ok());
  EXPECT_TRUE(Parse(R"({"a":{"dtype":"U16","shape":[3],"data_offsets":[0,6]}})", 6).ok());
}

TEST(SafetensorsTest, RejectsWhatTheReferenceReaderRejects) {
  struct Case {
    const char* json;
    uint64_t data;
    const char* why;
  } cases[] = {
      {R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}})", 4, "length vs shape"},
      {R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", 8, "hole at start"},
      {R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}})",
       12, "hole"},
      {R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})",
       4, "overlap"},
      {R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", 8, "trailing data"},
      {R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", 2, "short data"},
      {R"({"a":{"dtype":"X9","shape":[1],"data_offsets":[0,4]}})", 4, "dtype"},
      {R"({"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})", 4, "negative shape"},
      {R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}})", 4, "reversed"},
      {R"({"a":{"dtype":"F32","shape":[1]}})", 4, "no offsets"},
      {R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
       8, "duplicate"},
      {R"({"a":{"dtype":"F32","shape":[4294967296,4294967296,4294967296],"data_offsets":[0,4]}})",
       4, "overflow"},
      // 2^62 + 1 elements of 4 bytes wrap around to 4 bytes in 64 bits.
      {R"({"a":{"dtype":"F32","shape":[4611686018427387905],"data_offsets":[0,4]}})", 4,
       "bytes overflow"},
      {R"({"a":{"dtype":"F64","shape":[2305843009213693953],"data_offsets":[0,8]}})", 8,
       "bytes overflow 8"},
      {R"({"a":{"dtype":"F32","shape":[0,18446744073709551615],"data_offsets":[0,0]}})", 0,
       "dim > int64"},
      {R"({"a":{"dtype":"U16","shape":[3],"data_offsets":[0,3]}})", 3, "opaque length"},
      {R"({"a":{"dtype":"U64","shape":[2305843009213693953],"data_offsets":[0,8]}})", 8,
       "opaque overflow"},
      {R"([1,2])", 0, "not an object"},
      {R"({"a":)", 0, "truncated"},
  };
  for (const Case& c : cases) {
    auto h = Parse(c.json, c.data);
    EXPECT_FALSE(h.ok()) << c.why;
    if (!h.ok()) {
      EXPECT_NE(h.status().message().find("m.safetensors"), std::string::npos) << c.why;
    }
  }
  EXPECT_FALSE(ParseSafetensorsHeader("{}", kMaxSafetensorsHeader + 1, 1ull << 40, "big").ok());
  EXPECT_FALSE(ParseSafetensorsHeader("{}", 2, 5, "short").ok());
}

}  // namespace
}  // namespace ckptfs::core
