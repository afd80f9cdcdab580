#include "core/meta.h"

#include <yaml-cpp/yaml.h>

#include <cerrno>
#include <initializer_list>
#include <cmath>
#include <cstdlib>
#include <nlohmann/json.hpp>
#include <regex>

namespace ckptfs::core {
namespace {

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
  if (OneOf(s, {".inf", ".Inf", ".INF", "+.inf", "+.Inf", "+.INF"})) return MetaValue::Number(INFINITY);
  if (OneOf(s, {"-.inf", "-.Inf", "-.INF"})) return MetaValue::Number(-INFINITY);
  std::string no_underscore;
  for (char c : s) {
    if (c != '_') no_underscore += c;
  }
  if (auto v = ParseNumber(no_underscore)) return MetaValue::Number(*v);
  return MetaValue::String(s);
}

std::optional<MetaValue> FromJsonScalar(const nlohmann::json& v) {
  if (v.is_boolean()) return MetaValue::Bool(v.get<bool>());
  if (v.is_number()) return MetaValue::Number(v.get<double>());
  if (v.is_string()) return MetaValue::String(v.get<std::string>());
  return std::nullopt;
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
  for (auto& [k, v] : entries) {
    if (k == key) {
      v = std::move(value);
      return;
    }
  }
  entries.emplace_back(std::move(key), std::move(value));
}

Result<Meta> ParseSpeechBrainYaml(std::string_view text, const std::string& origin) {
  if (!IsPrintableUtf8(text)) {
    return Status::Corrupt(origin + ": not valid YAML: invalid UTF-8 or control character");
  }
  YAML::Node root;
  try {
    root = YAML::Load(std::string(text));
  } catch (const YAML::Exception& e) {
    return Status::Corrupt(origin + ": not valid YAML: " + e.what());
  } catch (const std::exception& e) {
    return Status::Corrupt(origin + ": not valid YAML: " + e.what());
  }
  Meta meta;
  if (root.IsNull()) return meta;  // an empty CKPT.yaml: no user keys
  if (!root.IsMap()) return Status::Corrupt(origin + ": YAML top level is not a map");
  try {
    for (const auto& item : root) {
      if (!item.first.IsScalar()) {
        return Status::Corrupt(origin + ": YAML map has a non-scalar key");
      }
      std::string key = item.first.Scalar();
      std::optional<MetaValue> value;
      if (item.second.IsScalar()) value = ResolveYamlScalar(item.second);
      if (value) {
        meta.Set(key, std::move(*value));
      } else {
        meta.skipped.push_back(key);
      }
    }
  } catch (const std::exception& e) {
    return Status::Corrupt(origin + ": " + e.what());
  }
  return meta;
}

Result<Meta> ParseNativeJson(std::string_view text, const std::string& origin) {
  nlohmann::json doc = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (doc.is_discarded()) return Status::Corrupt(origin + ": not valid JSON");
  if (!doc.is_object()) return Status::Corrupt(origin + ": JSON top level is not an object");
  Meta meta;
  for (const auto& [key, value] : doc.items()) {
    if (auto v = FromJsonScalar(value)) {
      meta.Set(key, std::move(*v));
    } else {
      meta.skipped.push_back(key);
    }
  }
  return meta;
}

Result<Meta> ParseTrainerState(std::string_view text, const std::string& origin) {
  nlohmann::json doc = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (doc.is_discarded()) return Status::Corrupt(origin + ": not valid JSON");
  if (!doc.is_object()) return Status::Corrupt(origin + ": JSON top level is not an object");
  auto step_it = doc.find("global_step");
  if (step_it == doc.end() || !step_it->is_number()) {
    return Status::Corrupt(origin + ": no numeric global_step");
  }
  Meta meta;
  double step = step_it->get<double>();
  meta.Set("global_step", MetaValue::Number(step));
  auto epoch_it = doc.find("epoch");
  if (epoch_it != doc.end() && epoch_it->is_number()) {
    meta.Set("epoch", MetaValue::Number(epoch_it->get<double>()));
  }
  auto history = doc.find("log_history");
  if (history != doc.end()) {
    if (!history->is_array()) return Status::Corrupt(origin + ": log_history is not a list");
    for (const auto& entry : *history) {
      if (!entry.is_object()) continue;
      auto s = entry.find("step");
      if (s == entry.end() || !s->is_number() || s->get<double>() != step) continue;
      for (const auto& [key, value] : entry.items()) {
        if (key.rfind("eval_", 0) != 0) continue;
        if (auto v = FromJsonScalar(value)) meta.Set(key, std::move(*v));
      }
    }
  }
  return meta;
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
