#include "core/json_text.h"

#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

namespace ckptfs::core {
namespace {

using nlohmann::ordered_json;

TEST(JsonTextTest, WellFormedUtf8IsStrict) {
  const std::vector<std::string> valid = {
      "",
      "abc",
      "\xc3\xa9",          // é
      "\xe2\x82\xac",      // €
      "\xf0\x9f\x98\x80",  // 😀
      "\xf4\x8f\xbf\xbf",  // U+10FFFF
      "\xee\x80\x80",      // U+E000, just past the surrogates
      "\xed\x9f\xbf",      // U+D7FF, just before them
  };
  for (const std::string& s : valid) EXPECT_TRUE(IsUtf8(s)) << JsonQuote(s);
  const std::vector<std::string> invalid = {
      "\xff",
      "\xfe",
      "\x80",              // never a first byte
      "\xc0\xaf",          // overlong '/'
      "\xc1\xbf",          // overlong
      "\xe0\x80\xaf",      // overlong '/'
      "\xf0\x80\x80\xaf",  // overlong '/'
      "\xed\xa0\x80",      // U+D800, an encoded surrogate
      "\xed\xb3\xbf",      // U+DCFF, an encoded surrogate
      "\xf4\x90\x80\x80",  // past U+10FFFF
      "\xf5\x80\x80\x80",  // past U+10FFFF
      "\xe2\x82",          // cut short
      "a\xe2\x82"
      "b",  // cut short in the middle
  };
  for (const std::string& s : invalid) EXPECT_FALSE(IsUtf8(s)) << JsonQuote(s);
}

TEST(JsonTextTest, QuoteEscapesBytesThatAreNotText) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"CKPT+\xff\xfe", R"("CKPT+\udcff\udcfe")"},
      {"caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80",
       "\"caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80\""},
      {"\xc0\xaf", R"("\udcc0\udcaf")"},            // overlong: each byte escaped
      {"\xed\xa0\x80", R"("\udced\udca0\udc80")"},  // surrogate: each byte escaped
      {"\xe2\x82"
       "b",
       R"("\udce2\udc82b")"},  // cut short, then text again
      {"\xf4\x90\x80\x80", R"("\udcf4\udc90\udc80\udc80")"},
      {"say \"hi\"\\", R"("say \"hi\"\\")"},
      {std::string("a\0b", 3), R"("a\u0000b")"},
      {"\b\f\n\r\t\x01\x1f\x7f", "\"\\b\\f\\n\\r\\t\\u0001\\u001f\x7f\""},
      {"", R"("")"},
  };
  for (const auto& [in, want] : cases) EXPECT_EQ(JsonQuote(in), want);
}

// For text, DumpJson writes what nlohmann writes, byte for byte.
TEST(JsonTextTest, DumpMatchesNlohmannForText) {
  ordered_json j;
  j["name"] = "CKPT+2024-01-01 caf\xc3\xa9 \xf0\x9f\x98\x80";
  j["quote"] = "a \"b\" \\ c\n\t\x01";
  j["int"] = 42;
  j["negative"] = -7;
  j["unsigned"] = 18446744073709551615ull;
  j["double"] = 0.1;
  j["recency"] = 1795564741.2244267;
  j["big"] = 1e300;
  j["true"] = true;
  j["null"] = nullptr;
  j["empty_object"] = ordered_json::object();
  j["empty_array"] = ordered_json::array();
  j["list"] = {1, "two", {{"three", 3.5}}, ordered_json::array({ordered_json::array()})};
  j["nested"] = {{"a", {{"b", {{"c", "d"}}}}}};
  for (int indent : {-1, 0, 2, 4}) {
    EXPECT_EQ(DumpJson(j, indent), j.dump(indent)) << "indent " << indent;
  }
  EXPECT_EQ(DumpJson(ordered_json::array(), 2), "[]");
  EXPECT_EQ(DumpJson(ordered_json("x"), 2), "\"x\"");
}

// Where nlohmann throws (type_error 316: what crashed the daemon), DumpJson
// writes escapes, in values and keys.
TEST(JsonTextTest, DumpNeverThrowsOnBytes) {
  ordered_json j;
  j["path"] = "/src/exp/CKPT+\xff\xfe";
  j["meta"] = {{"k\xe9y", "v\xc0\xaf"}};
  EXPECT_THROW(j.dump(2), nlohmann::json::type_error);
  std::string out;
  ASSERT_NO_THROW(out = DumpJson(j, 2));
  EXPECT_EQ(out,
            "{\n"
            "  \"path\": \"/src/exp/CKPT+\\udcff\\udcfe\",\n"
            "  \"meta\": {\n"
            "    \"k\\udce9y\": \"v\\udcc0\\udcaf\"\n"
            "  }\n"
            "}");
}

std::string ParsedString(const std::string& json_text) {
  nlohmann::json j;
  EXPECT_TRUE(ParseJson(json_text, &j)) << json_text;
  return j.is_string() ? j.get<std::string>() : "<not a string>";
}

// What DumpJson writes, ParseJson reads back as the same bytes.
TEST(JsonTextTest, ParseReadsBackEveryByteString) {
  std::vector<std::string> samples = {"CKPT+\xff\xfe",
                                      "\xed\xb3\xbf",
                                      "\xc0\xaf",
                                      "plain",
                                      "caf\xc3\xa9",
                                      "\x01\x01"
                                      "ff",
                                      std::string("\0\x01", 2)};
  for (int b = 0; b < 256; ++b) samples.push_back(std::string(1, static_cast<char>(b)));
  std::mt19937 rng(7);
  for (int i = 0; i < 500; ++i) {
    std::string s(static_cast<size_t>(rng() % 12), '\0');
    for (char& c : s) c = static_cast<char>(rng() & 0xFF);
    samples.push_back(s);
  }
  for (const std::string& s : samples) {
    ordered_json j = ordered_json::object();
    j[s] = ordered_json::array({s, {{"inner", s}}});
    nlohmann::json back;
    ASSERT_TRUE(ParseJson(DumpJson(j, 2), &back)) << DumpJson(j, 2);
    ASSERT_TRUE(back.is_object());
    ASSERT_EQ(back.size(), 1u);
    EXPECT_EQ(back.begin().key(), s) << JsonQuote(s);
    EXPECT_EQ(back.begin().value()[0].get<std::string>(), s) << JsonQuote(s);
    EXPECT_EQ(back.begin().value()[1]["inner"].get<std::string>(), s) << JsonQuote(s);
  }
}

TEST(JsonTextTest, ParseKeepsRealUnicodeEscapes) {
  EXPECT_EQ(ParsedString(R"("\ud83d\ude00")"), "\xf0\x9f\x98\x80");  // a pair, as Python writes it
  EXPECT_EQ(ParsedString(R"("\udbff\udcff")"),
            "\xf4\x8f\xb3\xbf");  // a pair whose low half is in DC80..DCFF
  EXPECT_EQ(ParsedString(R"("\u0001ff")"),
            "\x01"
            "ff");  // a real U+0001 before hex digits
  EXPECT_EQ(ParsedString(R"("\u00e9 \"\\\/")"), "\xc3\xa9 \"\\/");
}

TEST(JsonTextTest, ParseRefusesWhatIsNotJson) {
  nlohmann::json j = "untouched";
  EXPECT_FALSE(ParseJson("{\"a\": ", &j));
  EXPECT_FALSE(ParseJson("\"\\udc", &j));
  EXPECT_FALSE(ParseJson("\"\xff\"", &j));     // raw bytes are not JSON text
  EXPECT_FALSE(ParseJson(R"("\udc41")", &j));  // below 0x80: a lone surrogate, not a byte
  EXPECT_EQ(j, "untouched");
}

}  // namespace
}  // namespace ckptfs::core
