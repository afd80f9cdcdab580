#include "core/meta.h"

#include <yaml-cpp/eventhandler.h>
#include <yaml-cpp/yaml.h>

#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <initializer_list>
#include <regex>
#include <sstream>
#include <unordered_map>

#include "core/meta_fields.h"

namespace ckptfs::core {
namespace {

using meta_internal::Fields;

std::string FormatNumber(double v) {
  if (std::isfinite(v) && v == std::floor(v) && std::fabs(v) < 1e15) {
    return std::to_string(static_cast<long long>(v));
  }
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%.17g", v);
  // Prefer the shortest spelling that reads back exactly.
  for (int prec = 6; prec < 17; ++prec) {
    char shorter[64];
    std::snprintf(shorter, sizeof(shorter), "%.*g", prec, v);
    if (std::strtod(shorter, nullptr) == v) return shorter;
  }
  return buf;
}

// Whether token is spelled [+-]digits[.digits][e[+-]digits] (or .digits):
// what a file name or query value means as a number. strtod alone would also
// take hex floats, "nan", "inf" and leading spaces.
bool IsDecimal(std::string_view t) {
  size_t i = 0;
  auto digits = [&]() {
    size_t start = i;
    while (i < t.size() && t[i] >= '0' && t[i] <= '9') ++i;
    return i - start;
  };
  if (i < t.size() && (t[i] == '+' || t[i] == '-')) ++i;
  size_t mantissa = digits();
  if (i < t.size() && t[i] == '.') {
    ++i;
    mantissa += digits();
  }
  if (mantissa == 0) return false;
  if (i < t.size() && (t[i] == 'e' || t[i] == 'E')) {
    ++i;
    if (i < t.size() && (t[i] == '+' || t[i] == '-')) ++i;
    if (digits() == 0) return false;
  }
  return i == t.size();
}

// Parses a whole token as a decimal number.
std::optional<double> ParseNumber(std::string_view token) {
  if (token.empty() || token.size() > 64 || !IsDecimal(token)) return std::nullopt;
  std::string s(token);
  char* end = nullptr;
  double v = std::strtod(s.c_str(), &end);
  if (end != s.c_str() + s.size()) return std::nullopt;
  return v;
}

bool OneOf(const std::string& s, std::initializer_list<const char*> words) {
  for (const char* w : words) {
    if (s == w) return true;
  }
  return false;
}

// YAML 1.1 scalars as PyYAML's SafeLoader resolves them.
std::optional<MetaValue> ResolveYamlScalar(const YAML::Node& node) {
  const std::string& tag = node.Tag();
  const std::string& s = node.Scalar();
  if (tag == "!") return MetaValue::String(s);  // quoted
  if (!tag.empty() && tag != "?" && tag.rfind("tag:yaml.org,2002:", 0) != 0) {
    return std::nullopt;  // !!python/... and other application tags
  }
  if (OneOf(s, {"~", "null", "Null", "NULL", ""})) return std::nullopt;
  if (OneOf(s, {"yes", "Yes", "YES", "true", "True", "TRUE", "on", "On", "ON"})) {
    return MetaValue::Bool(true);
  }
  if (OneOf(s, {"no", "No", "NO", "false", "False", "FALSE", "off", "Off", "OFF"})) {
    return MetaValue::Bool(false);
  }
  if (OneOf(s, {".nan", ".NaN", ".NAN"})) return MetaValue::Number(std::nan(""));
  if (OneOf(s, {".inf", ".Inf", ".INF", "+.inf", "+.Inf", "+.INF"}))
    return MetaValue::Number(INFINITY);
  if (OneOf(s, {"-.inf", "-.Inf", "-.INF"})) return MetaValue::Number(-INFINITY);
  std::string no_underscore;
  for (char c : s) {
    if (c != '_') no_underscore += c;
  }
  if (auto v = ParseNumber(no_underscore)) return MetaValue::Number(*v);
  return MetaValue::String(s);
}

// PyYAML, and so SpeechBrain, refuses a stream with invalid UTF-8 or control
// characters other than tab and line breaks; so do we.
bool IsPrintableUtf8(std::string_view text) {
  size_t i = 0;
  while (i < text.size()) {
    auto c = static_cast<unsigned char>(text[i]);
    if (c < 0x80) {
      if (c < 0x20 && c != '\t' && c != '\n' && c != '\r') return false;
      if (c == 0x7f) return false;
      ++i;
      continue;
    }
    int len = (c & 0xE0) == 0xC0 ? 2 : (c & 0xF0) == 0xE0 ? 3 : (c & 0xF8) == 0xF0 ? 4 : 0;
    if (len == 0 || c == 0xC0 || c == 0xC1 || i + len > text.size()) return false;
    for (int k = 1; k < len; ++k) {
      if ((static_cast<unsigned char>(text[i + k]) & 0xC0) != 0x80) return false;
    }
    i += static_cast<size_t>(len);
  }
  return true;
}

// ---- YAML as PyYAML's safe_load reads it ----

// The length of the line break at text[i], as PyYAML counts them (\r\n, \r,
// \n, NEL, LS, PS), or 0.
size_t LineBreakAt(std::string_view text, size_t i) {
  if (text[i] == '\n') return 1;
  if (text[i] == '\r') return i + 1 < text.size() && text[i + 1] == '\n' ? 2 : 1;
  if (text.substr(i, 2) == "\xC2\x85") return 2;
  if (text.substr(i, 3) == "\xE2\x80\xA8" || text.substr(i, 3) == "\xE2\x80\xA9") return 3;
  return 0;
}

// PyYAML's rules for the stream around the one document safe_load reads.
// Its scanner takes "---" and "..." followed by a blank as document markers
// at column 0 in any context (a block scalar ends before column 0, a quoted
// one refuses the marker), so whole lines decide:
//  - before the document: blank and comment lines, and directives ('%' at
//    column 0) that must be followed by "---"; "..." or a tab is an error;
//  - a second "---" is a second document, which safe_load refuses, even
//    after "..." and even if empty;
//  - after "...": only more "...", blank lines and comments (a tab cannot
//    start a token there).
// Returns the text up to the first "..." (all of it if none), which then
// holds at most one document marker.
Result<std::string_view> SingleYamlDocument(std::string_view text, const std::string& origin) {
  enum class State { kBefore, kDirectives, kInDocument, kEnded };
  State state = State::kBefore;
  size_t end = text.size();
  size_t i = text.substr(0, 3) == "\xEF\xBB\xBF" ? 3 : 0;  // PyYAML skips a leading BOM
  int line = 0;
  auto refuse = [&](const std::string& why) {
    return Status::Corrupt(origin + ": not valid YAML (PyYAML refuses it): " + why + " at line " +
                           std::to_string(line));
  };
  while (i < text.size()) {
    ++line;
    size_t eol = i;
    while (eol < text.size() && LineBreakAt(text, eol) == 0) ++eol;
    const std::string_view l = text.substr(i, eol - i);
    const size_t next = eol < text.size() ? eol + LineBreakAt(text, eol) : eol;
    auto is_marker = [&](std::string_view m) {
      return l.substr(0, 3) == m && (l.size() == 3 || l[3] == ' ' || l[3] == '\t');
    };
    size_t k = 0;
    while (k < l.size() && l[k] == ' ') ++k;
    const bool blank = k == l.size() || l[k] == '#';
    const bool tab = k < l.size() && l[k] == '\t';
    if (is_marker("---")) {
      if (state == State::kInDocument || state == State::kEnded) {
        return refuse("a second document ('---'); safe_load reads one");
      }
      state = State::kInDocument;
    } else if (is_marker("...")) {
      if (state != State::kInDocument && state != State::kEnded) {
        return refuse("document end marker '...' before any document");
      }
      if (state == State::kInDocument) end = i;
      state = State::kEnded;
      size_t r = 3;
      while (r < l.size() && l[r] == ' ') ++r;
      if (r < l.size() && l[r] != '#') return refuse("text after the document end marker '...'");
    } else if (state == State::kEnded) {
      if (!blank) {
        return refuse(tab ? "a tab where a token should start"
                          : "text after the document end marker '...'");
      }
    } else if (state != State::kInDocument && !blank) {
      if (l[0] == '%') {
        state = State::kDirectives;
      } else if (tab) {
        return refuse("a tab where a token should start");
      } else if (state == State::kDirectives) {
        return refuse("a directive not followed by '---'");
      } else {
        state = State::kInDocument;
      }
    }
    i = next;
  }
  if (state == State::kDirectives) return refuse("a directive not followed by '---'");
  return text.substr(0, end);
}

// How deep the node tree nests, against PyYAML's limit. A depth-first walk
// holding one iterator per open level, so memory follows the depth. Aliases
// share nodes, so a walk could revisit a shared subtree exponentially often
// ("billion laughs"): the number of visits has a budget, far above the
// ~130k nodes that kMaxYamlMetaBytes of text can spell without aliases.
Status CheckYamlDepth(const YAML::Node& root, const std::string& origin) {
  constexpr size_t kMaxVisits = size_t{1} << 20;
  struct Level {
    YAML::const_iterator next, end;
    bool map;
    std::optional<YAML::Node> pending_value;  // of the map item whose key is walked
  };
  std::vector<Level> stack;
  size_t visits = 0;
  auto enter = [&](const YAML::Node& node) -> Status {
    if (++visits > kMaxVisits) {
      return Status::Corrupt(origin + ": YAML aliases expand to more than " +
                             std::to_string(kMaxVisits) + " nodes");
    }
    if (!node.IsMap() && !node.IsSequence()) return Status::Ok();
    if (stack.size() + 1 > static_cast<size_t>(kMaxYamlDepth)) {
      return Status::Corrupt(origin + ": YAML nested deeper than the budget of " +
                             std::to_string(kMaxYamlDepth) + " levels (PyYAML's limit)");
    }
    stack.push_back({node.begin(), node.end(), node.IsMap(), std::nullopt});
    return Status::Ok();
  };
  if (Status s = enter(root); !s.ok()) return s;
  while (!stack.empty()) {
    Level& top = stack.back();  // invalid once enter() pushes
    // YAML::Node's operator= assigns through to the tree: only ever construct.
    std::optional<YAML::Node> child;
    if (top.pending_value) {
      child.emplace(*top.pending_value);
      top.pending_value.reset();
    } else if (top.next == top.end) {
      stack.pop_back();
      continue;
    } else {
      const auto item = *top.next;
      ++top.next;
      if (top.map) {
        top.pending_value.emplace(item.second);
        child.emplace(item.first);
      } else {
        child.emplace(item);
      }
    }
    if (Status s = enter(*child); !s.ok()) return s;
  }
  return Status::Ok();
}

// yaml-cpp reads a line holding only a plain scalar inside a block map
// ("loss: 1\nfoo\n") as the key "foo" with no value; PyYAML refuses it
// ("could not find expected ':'"). A simple key in a block map is on one
// line, so a key that starts its line must have ':' and a blank after it on
// that line. Keys that do not start their line (explicit "? key", tagged or
// anchored keys) are left alone.
Status CheckBlockKeyHasColon(std::string_view text, const YAML::Node& key,
                             const std::string& origin) {
  const YAML::Mark mark = key.Mark();
  if (mark.line < 0 || mark.column < 0) return Status::Ok();
  size_t start = 0;
  for (int line = 0; line < mark.line; ++line) {
    while (start < text.size() && text[start] != '\n') ++start;
    if (start >= text.size()) return Status::Ok();
    ++start;
  }
  size_t eol = text.find('\n', start);
  std::string_view l = text.substr(start, eol == std::string_view::npos ? eol : eol - start);
  const auto column = static_cast<size_t>(mark.column);
  if (column >= l.size()) return Status::Ok();
  for (size_t k = 0; k < column; ++k) {
    if (l[k] != ' ' && !(k == 0 && start == 0 && l.substr(0, 3) == "\xEF\xBB\xBF")) {
      return Status::Ok();
    }
  }
  for (size_t k = column; k < l.size(); ++k) {
    if (l[k] == ':' &&
        (k + 1 == l.size() || l[k + 1] == ' ' || l[k + 1] == '\t' || l[k + 1] == '\r')) {
      return Status::Ok();
    }
  }
  return Status::Corrupt(origin + ": not valid YAML (PyYAML refuses it): no ':' after the key '" +
                         key.Scalar().substr(0, 64) + "' at line " + std::to_string(mark.line + 1));
}

// Counts the documents yaml-cpp's parser finds, building nothing.
class DocumentCounter : public YAML::EventHandler {
 public:
  int documents() const { return documents_; }
  const YAML::Mark& last_start() const { return last_start_; }
  void OnDocumentStart(const YAML::Mark& mark) override {
    ++documents_;
    last_start_ = mark;
  }
  void OnDocumentEnd() override {}
  void OnNull(const YAML::Mark&, YAML::anchor_t) override {}
  void OnAlias(const YAML::Mark&, YAML::anchor_t) override {}
  void OnScalar(const YAML::Mark&, const std::string&, YAML::anchor_t,
                const std::string&) override {}
  void OnSequenceStart(const YAML::Mark&, const std::string&, YAML::anchor_t,
                       YAML::EmitterStyle::value) override {}
  void OnSequenceEnd() override {}
  void OnMapStart(const YAML::Mark&, const std::string&, YAML::anchor_t,
                  YAML::EmitterStyle::value) override {}
  void OnMapEnd() override {}

 private:
  int documents_ = 0;
  YAML::Mark last_start_;
};

}  // namespace

MetaValue MetaValue::Number(double v) {
  MetaValue m;
  m.type = MetaType::kNumber;
  m.number = v;
  m.text = std::isnan(v) ? "nan" : FormatNumber(v);
  return m;
}

MetaValue MetaValue::String(std::string v) {
  MetaValue m;
  m.type = MetaType::kString;
  m.text = std::move(v);
  return m;
}

MetaValue MetaValue::Bool(bool v) {
  MetaValue m;
  m.type = MetaType::kBool;
  m.number = v ? 1 : 0;
  m.text = v ? "true" : "false";
  return m;
}

MetaValue MetaValue::FromToken(std::string_view token) {
  if (token == "true" || token == "True") return Bool(true);
  if (token == "false" || token == "False") return Bool(false);
  if (auto v = ParseNumber(token)) return Number(*v);
  return String(std::string(token));
}

const MetaValue* Meta::Find(std::string_view key) const {
  if (auto it = positions_.find(std::string(key)); it != positions_.end()) {
    if (it->second < entries.size() && entries[it->second].first == key) {
      return &entries[it->second].second;
    }
  }
  for (const auto& [k, v] : entries) {
    if (k == key) return &v;
  }
  return nullptr;
}

std::optional<double> Meta::Number(std::string_view key) const {
  const MetaValue* v = Find(key);
  if (v == nullptr || v->type != MetaType::kNumber || std::isnan(v->number)) return std::nullopt;
  return v->number;
}

void Meta::Set(std::string key, MetaValue value) {
  auto trusted = [&]() -> MetaValue* {
    auto it = positions_.find(key);
    if (it == positions_.end() || it->second >= entries.size() ||
        entries[it->second].first != key) {
      return nullptr;
    }
    return &entries[it->second].second;
  };
  MetaValue* slot = trusted();
  if (slot == nullptr && (positions_.size() != entries.size() || positions_.count(key) != 0)) {
    // entries was changed without Set: index it again (the first of equal
    // keys is the one Find returns).
    positions_.clear();
    for (size_t i = 0; i < entries.size(); ++i) positions_.emplace(entries[i].first, i);
    slot = trusted();
  }
  if (slot != nullptr) {
    *slot = std::move(value);
    return;
  }
  positions_.emplace(key, entries.size());
  entries.emplace_back(std::move(key), std::move(value));
}

Result<Meta> ParseSpeechBrainYaml(std::string_view text, const std::string& origin) {
  if (text.size() > kMaxYamlMetaBytes) {
    return Status::Corrupt(origin + ": larger than the " + std::to_string(kMaxYamlMetaBytes) +
                           "-byte budget for a YAML meta file");
  }
  if (!IsPrintableUtf8(text)) {
    return Status::Corrupt(origin + ": not valid YAML: invalid UTF-8 or control character");
  }
  Result<std::string_view> document = SingleYamlDocument(text, origin);
  if (!document.ok()) return document.status();
  YAML::Node root;
  try {
    // yaml-cpp starts a new implicit document where PyYAML sees text after
    // the top-level node ("{a: 1} x", "{a: 1}\nb: 2") and refuses it. Count
    // documents with at most two parser steps: YAML::LoadAll loops forever
    // on some inputs (",..loss: 1\nfoos" makes empty documents without end).
    std::istringstream in{std::string(*document)};
    YAML::Parser parser(in);
    DocumentCounter counter;
    if (parser.HandleNextDocument(counter) && parser.HandleNextDocument(counter)) {
      return Status::Corrupt(origin + ": not valid YAML: text after the top-level node at line " +
                             std::to_string(counter.last_start().line + 1));
    }
    if (counter.documents() == 1) root = YAML::Load(std::string(*document));
  } catch (const YAML::Exception& e) {
    return Status::Corrupt(origin + ": not valid YAML: " + e.what());
  } catch (const std::exception& e) {
    return Status::Corrupt(origin + ": not valid YAML: " + e.what());
  }
  Fields fields(origin);
  if (!root.IsDefined() || root.IsNull()) return fields.Take();  // no user keys
  if (!root.IsMap()) return Status::Corrupt(origin + ": YAML top level is not a map");
  try {
    if (Status s = CheckYamlDepth(root, origin); !s.ok()) return s;
    for (const auto& item : root) {
      if (!item.first.IsScalar()) {
        return Status::Corrupt(origin + ": YAML map has a non-scalar key");
      }
      if (root.Style() == YAML::EmitterStyle::Block && item.second.IsNull()) {
        if (Status s = CheckBlockKeyHasColon(*document, item.first, origin); !s.ok()) return s;
      }
      std::optional<MetaValue> value;
      if (item.second.IsScalar()) value = ResolveYamlScalar(item.second);
      if (Status s = fields.Put(item.first.Scalar(), std::move(value)); !s.ok()) return s;
    }
  } catch (const std::exception& e) {
    return Status::Corrupt(origin + ": " + e.what());
  }
  return fields.Take();
}

std::string FileExtension(std::string_view file_name) {
  auto dot = file_name.rfind('.');
  if (dot == std::string_view::npos || dot == 0) return "";
  return std::string(file_name.substr(dot));
}

std::optional<Meta> ParseSingleFileName(std::string_view file_name) {
  static const char* const kExtensions[] = {".ckpt", ".pt", ".pth", ".bin", ".safetensors"};
  std::string ext = FileExtension(file_name);
  bool known = false;
  for (const char* e : kExtensions) known = known || ext == e;
  if (!known) return std::nullopt;
  std::string stem(file_name.substr(0, file_name.size() - ext.size()));

  Meta meta;
  // key=value pairs: a key is a word; a value a number or a word without
  // separators. Separators between pairs are '-' or '_'.
  static const std::regex kPair(
      R"(([A-Za-z][A-Za-z0-9_.]*)=([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|[A-Za-z0-9.]+))");
  // Ignite spells "<prefix>_<index>_<key>=<value>": the index sits in the key.
  static const std::regex kIndexedKey(R"(^(?:[A-Za-z0-9]*_)*?(\d+)_([A-Za-z].*)$)");
  std::optional<double> index;
  auto begin = std::sregex_iterator(stem.begin(), stem.end(), kPair);
  for (auto it = begin; it != std::sregex_iterator(); ++it) {
    const std::smatch& m = *it;
    std::string key = m[1].str();
    std::smatch km;
    if (std::regex_match(key, km, kIndexedKey)) {
      index = std::strtod(km[1].str().c_str(), nullptr);
      key = km[2].str();
    }
    meta.Set(key, MetaValue::FromToken(m[2].str()));
  }
  if (meta.entries.empty()) {
    static const std::regex kTrailingIndex(R"(^.*?[_-]?(\d+)$)");
    std::smatch m;
    if (!std::regex_match(stem, m, kTrailingIndex) || m[1].length() > 15) return std::nullopt;
    index = std::strtod(m[1].str().c_str(), nullptr);
  }
  if (index) meta.Set("index", MetaValue::Number(*index));
  return meta;
}

}  // namespace ckptfs::core
