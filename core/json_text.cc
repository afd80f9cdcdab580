#include "core/json_text.h"

#include <nlohmann/json.hpp>

namespace ckptfs::core {
namespace {

const char kHex[] = "0123456789abcdef";

// The length of the well-formed UTF-8 sequence at p (1 to 4), or 0 when the
// byte at p does not start one (RFC 3629, Unicode Table 3-7).
size_t SequenceLength(const unsigned char* p, size_t avail) {
  const unsigned char b = p[0];
  if (b < 0x80) return 1;
  size_t len;
  unsigned char lo = 0x80, hi = 0xBF;  // bounds of the second byte
  if (b >= 0xC2 && b <= 0xDF) {
    len = 2;
  } else if (b >= 0xE0 && b <= 0xEF) {
    len = 3;
    if (b == 0xE0) lo = 0xA0;  // overlong below U+0800
    if (b == 0xED) hi = 0x9F;  // U+D800..U+DFFF: surrogates
  } else if (b >= 0xF0 && b <= 0xF4) {
    len = 4;
    if (b == 0xF0) lo = 0x90;  // overlong below U+10000
    if (b == 0xF4) hi = 0x8F;  // past U+10FFFF
  } else {
    return 0;  // a continuation byte, C0/C1 (overlong), F5..FF
  }
  if (avail < len || p[1] < lo || p[1] > hi) return 0;
  for (size_t i = 2; i < len; ++i) {
    if (p[i] < 0x80 || p[i] > 0xBF) return 0;
  }
  return len;
}

void AppendQuoted(std::string_view bytes, std::string* out) {
  const auto* p = reinterpret_cast<const unsigned char*>(bytes.data());
  const size_t n = bytes.size();
  out->push_back('"');
  for (size_t i = 0; i < n;) {
    const unsigned char b = p[i];
    if (b >= 0x80) {
      const size_t len = SequenceLength(p + i, n - i);
      if (len == 0) {  // a byte that is not text: surrogateescape
        out->append("\\udc");
        out->push_back(kHex[b >> 4]);
        out->push_back(kHex[b & 0xF]);
        ++i;
      } else {
        out->append(bytes.data() + i, len);
        i += len;
      }
      continue;
    }
    switch (b) {
      case '"':
        out->append("\\\"");
        break;
      case '\\':
        out->append("\\\\");
        break;
      case '\b':
        out->append("\\b");
        break;
      case '\f':
        out->append("\\f");
        break;
      case '\n':
        out->append("\\n");
        break;
      case '\r':
        out->append("\\r");
        break;
      case '\t':
        out->append("\\t");
        break;
      default:
        if (b < 0x20) {
          out->append("\\u00");
          out->push_back(kHex[b >> 4]);
          out->push_back(kHex[b & 0xF]);
        } else {
          out->push_back(static_cast<char>(b));
        }
    }
    ++i;
  }
  out->push_back('"');
}

void NewLine(int indent, int depth, std::string* out) {
  if (indent < 0) return;
  out->push_back('\n');
  out->append(static_cast<size_t>(indent) * static_cast<size_t>(depth), ' ');
}

void Dump(const nlohmann::ordered_json& v, int indent, int depth, std::string* out) {
  if (v.is_string()) {
    AppendQuoted(v.get_ref<const std::string&>(), out);
  } else if (v.is_object()) {
    if (v.empty()) {
      out->append("{}");
      return;
    }
    out->push_back('{');
    bool first = true;
    for (auto it = v.begin(); it != v.end(); ++it) {
      if (!first) out->push_back(',');
      first = false;
      NewLine(indent, depth + 1, out);
      AppendQuoted(it.key(), out);
      out->append(indent < 0 ? ":" : ": ");
      Dump(it.value(), indent, depth + 1, out);
    }
    NewLine(indent, depth, out);
    out->push_back('}');
  } else if (v.is_array()) {
    if (v.empty()) {
      out->append("[]");
      return;
    }
    out->push_back('[');
    bool first = true;
    for (const auto& e : v) {
      if (!first) out->push_back(',');
      first = false;
      NewLine(indent, depth + 1, out);
      Dump(e, indent, depth + 1, out);
    }
    NewLine(indent, depth, out);
    out->push_back(']');
  } else {
    out->append(v.dump());  // null, bool, number: no string inside
  }
}

int HexValue(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

// nlohmann's parser refuses a lone low surrogate, so before parsing each
// escaped byte \udcXY becomes \u0001 followed by the two hex digits XY, and
// a real \u0001 becomes \u0001 followed by "01" (raw control bytes are not
// JSON): after parsing, every U+0001 in a string starts such a triple.
std::string Protect(std::string_view text) {
  std::string out;
  out.reserve(text.size());
  bool in_string = false;
  bool after_high = false;  // the last escape was a high surrogate
  for (size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (!in_string || c != '\\') {
      if (c == '"') in_string = !in_string;
      after_high = false;
      out.push_back(c);
      continue;
    }
    if (i + 1 < text.size() && text[i + 1] != 'u') {  // a one-letter escape
      out.append(text.substr(i, 2));
      after_high = false;
      ++i;
      continue;
    }
    unsigned unit = 0;
    bool hex = i + 5 < text.size();
    for (size_t k = 2; hex && k < 6; ++k) {
      const int d = HexValue(text[i + k]);
      hex = d >= 0;
      unit = unit * 16 + static_cast<unsigned>(d);
    }
    if (!hex) {  // malformed: the parser says so
      out.push_back(c);
      continue;
    }
    if (unit >= 0xDC80 && unit <= 0xDCFF && !after_high) {
      out.append("\\u0001");
      out.push_back(kHex[(unit >> 4) & 0xF]);
      out.push_back(kHex[unit & 0xF]);
    } else if (unit == 0x0001) {
      out.append("\\u000101");
    } else {
      out.append(text.substr(i, 6));
    }
    after_high = unit >= 0xD800 && unit <= 0xDBFF;
    i += 5;
  }
  return out;
}

std::string Restore(const std::string& s) {
  if (s.find('\x01') == std::string::npos) return s;
  std::string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '\x01' && i + 2 < s.size() && HexValue(s[i + 1]) >= 0 && HexValue(s[i + 2]) >= 0) {
      out.push_back(static_cast<char>(HexValue(s[i + 1]) * 16 + HexValue(s[i + 2])));
      i += 2;
    } else {
      out.push_back(s[i]);
    }
  }
  return out;
}

void RestoreAll(nlohmann::json* v) {
  if (v->is_string()) {
    *v = Restore(v->get_ref<const std::string&>());
  } else if (v->is_array()) {
    for (auto& e : *v) RestoreAll(&e);
  } else if (v->is_object()) {
    nlohmann::json restored = nlohmann::json::object();
    for (auto it = v->begin(); it != v->end(); ++it) {
      nlohmann::json value = std::move(it.value());
      RestoreAll(&value);
      restored[Restore(it.key())] = std::move(value);
    }
    *v = std::move(restored);
  }
}

}  // namespace

bool IsUtf8(std::string_view bytes) {
  const auto* p = reinterpret_cast<const unsigned char*>(bytes.data());
  for (size_t i = 0; i < bytes.size();) {
    const size_t len = SequenceLength(p + i, bytes.size() - i);
    if (len == 0) return false;
    i += len;
  }
  return true;
}

std::string JsonQuote(std::string_view bytes) {
  std::string out;
  out.reserve(bytes.size() + 2);
  AppendQuoted(bytes, &out);
  return out;
}

std::string DumpJson(const nlohmann::ordered_json& value, int indent) {
  std::string out;
  Dump(value, indent, 0, &out);
  return out;
}

bool ParseJson(std::string_view text, nlohmann::json* out) {
  nlohmann::json parsed = nlohmann::json::parse(Protect(text), nullptr, /*allow_exceptions=*/false);
  if (parsed.is_discarded()) return false;
  RestoreAll(&parsed);
  *out = std::move(parsed);
  return true;
}

}  // namespace ckptfs::core
