// JSON text for strings that are bytes: a Linux path or name may hold any
// byte but '/' and NUL, and meta read from a file may hold anything, while
// JSON strings are Unicode. Every JSON document ckptfs writes (index.json,
// `ls --json`, the status file) goes through DumpJson, which never fails on
// such bytes and loses nothing: a byte 0xXY that is not part of well-formed
// UTF-8 is written as the escape \udcXY, Python's "surrogateescape"
// convention, so `os.fsencode(json.loads(text)[...])` gives back the exact
// bytes and a path in index.json names the real file. Well-formed UTF-8
// passes through unchanged. Well-formed means what Python's strict decoder
// accepts: no overlong forms, no encoded surrogates, nothing past U+10FFFF.
//
// Pure functions, thread-safe, never throw except std::bad_alloc.
#ifndef CKPTFS_CORE_JSON_TEXT_H_
#define CKPTFS_CORE_JSON_TEXT_H_

#include <nlohmann/json_fwd.hpp>
#include <string>
#include <string_view>

namespace ckptfs::core {

// Whether `bytes` is well-formed UTF-8 (in the strict sense above).
bool IsUtf8(std::string_view bytes);

// `bytes` as a JSON string literal, quotes included: escapes as nlohmann's
// dump writes them (\" \\ \b \f \n \r \t, \u00XX for other control bytes),
// non-ASCII UTF-8 as is, and every other byte 0x80-0xFF as \udcXY.
std::string JsonQuote(std::string_view bytes);

// `value` as nlohmann's dump(indent) writes it (indent < 0: compact; else
// pretty with that many spaces), except that every string and key goes
// through JsonQuote: invalid UTF-8 never throws (nlohmann's type_error 316).
std::string DumpJson(const nlohmann::ordered_json& value, int indent = -1);

// Parses JSON text such as DumpJson writes: an escape \udcXY (XY >= 80) that
// is not the second half of a surrogate pair becomes the byte XY again, in
// strings and keys. False (and *out untouched) when `text` is not JSON.
bool ParseJson(std::string_view text, nlohmann::json* out);

}  // namespace ckptfs::core

#endif  // CKPTFS_CORE_JSON_TEXT_H_
