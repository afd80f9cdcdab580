// Meta from JSON files (meta.json, trainer_state.json), read as Python's
// json.loads reads them (core/meta.h).
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <initializer_list>
#include <nlohmann/json.hpp>
#include <unordered_map>

#include "core/meta.h"
#include "core/meta_fields.h"

namespace ckptfs::core {
namespace {

using meta_internal::Fields;

// ---- JSON as Python's json.loads reads it ----

// A NaN, Infinity or -Infinity literal: its value and its place among all
// scalar values (not keys) of the document, in order.
struct JsonSpecial {
  size_t ordinal;
  double value;
};

bool IsJsonSpace(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

// Finds the literals Python accepts and nlohmann does not (NaN, Infinity,
// -Infinity, outside strings and where a value may start) and overwrites
// them, in a copy, with "0" and spaces, so that offsets stay the same. Other
// bytes are left for nlohmann to judge.
std::vector<JsonSpecial> RewritePythonLiterals(std::string_view text, std::string* rewritten) {
  std::vector<JsonSpecial> specials;
  size_t ordinal = 0;
  size_t i = 0;
  auto value_may_start = [&](size_t at) {
    if (at == 0) return true;
    char p = text[at - 1];
    return IsJsonSpace(p) || p == '[' || p == ':' || p == ',';
  };
  auto replace = [&](size_t at, size_t len, double value) {
    if (rewritten->empty()) rewritten->assign(text);
    (*rewritten)[at] = '0';
    for (size_t k = 1; k < len; ++k) (*rewritten)[at + k] = ' ';
    specials.push_back({ordinal++, value});
  };
  while (i < text.size()) {
    const char c = text[i];
    if (c == '"') {
      size_t j = i + 1;
      while (j < text.size() && text[j] != '"') j += text[j] == '\\' ? 2 : 1;
      i = j + 1;
      size_t k = i;
      while (k < text.size() && IsJsonSpace(text[k])) ++k;
      if (k >= text.size() || text[k] != ':') ++ordinal;  // a value, not a key
    } else if (c == 'N' && text.substr(i, 3) == "NaN" && value_may_start(i)) {
      replace(i, 3, std::nan(""));
      i += 3;
    } else if (c == 'I' && text.substr(i, 8) == "Infinity" && value_may_start(i)) {
      replace(i, 8, INFINITY);
      i += 8;
    } else if (c == '-' && text.substr(i + 1, 8) == "Infinity" && value_may_start(i)) {
      replace(i, 9, -INFINITY);
      i += 9;
    } else if (c == '-' || (c >= '0' && c <= '9')) {
      ++ordinal;
      while (i < text.size() &&
             (std::isdigit(static_cast<unsigned char>(text[i])) || text[i] == '-' ||
              text[i] == '+' || text[i] == '.' || text[i] == 'e' || text[i] == 'E')) {
        ++i;
      }
    } else if (c >= 'a' && c <= 'z') {  // true, false, null
      ++ordinal;
      while (i < text.size() && text[i] >= 'a' && text[i] <= 'z') ++i;
    } else {
      ++i;
    }
  }
  return specials;
}

// Reads a JSON document as a stream of events (no tree is built, and
// nlohmann's parser does not recurse), handing keys, scalar values and
// container starts and ends to a subclass. A hook's failure stops the parse
// and is the result.
class JsonReader {
 public:
  explicit JsonReader(std::string origin) : origin_(std::move(origin)) {}
  virtual ~JsonReader() = default;

  Status Parse(std::string_view text, size_t max_bytes) {
    if (text.size() > max_bytes) {
      return Status::Corrupt(origin_ + ": larger than the " + std::to_string(max_bytes) +
                             "-byte budget for a JSON meta file");
    }
    if (text.substr(0, 3) == "\xEF\xBB\xBF") {
      return Status::Corrupt(origin_ + ": not valid JSON: starts with a byte order mark");
    }
    std::string rewritten;
    std::vector<JsonSpecial> specials = RewritePythonLiterals(text, &rewritten);
    if (!rewritten.empty()) text = rewritten;
    Sax sax{this, &specials, 0, 0, Status::Ok(), {}};
    bool ok = false;
    try {
      ok = nlohmann::json::sax_parse(text.begin(), text.end(), &sax);
    } catch (const std::exception& e) {  // std::bad_alloc, or a hook's
      return Status::Corrupt(origin_ + ": not valid JSON: " + e.what());
    }
    if (!sax.status.ok()) return sax.status;
    if (!ok) {
      std::string why = sax.syntax_error.substr(0, 200);
      return Status::Corrupt(origin_ + ": not valid JSON" + (why.empty() ? "" : ": " + why));
    }
    return Status::Ok();
  }

 protected:
  // depth(): how many containers are open around the event (for Close: the
  // one closing included).
  virtual Status Key(std::string key) = 0;
  virtual Status Value(std::optional<MetaValue> value) = 0;  // nullopt: null
  virtual Status Open(bool object) = 0;
  virtual Status Close() { return Status::Ok(); }

  int depth() const { return depth_; }
  const std::string& origin() const { return origin_; }
  Status NotAnObject() const {
    return Status::Corrupt(origin_ + ": JSON top level is not an object");
  }

 private:
  struct Sax {
    JsonReader* reader;
    const std::vector<JsonSpecial>* specials;
    size_t next_special = 0;
    size_t ordinal = 0;
    Status status = Status::Ok();
    std::string syntax_error;

    bool Done(Status s) {
      if (s.ok()) return true;
      status = std::move(s);
      return false;
    }
    bool Scalar(std::optional<MetaValue> v) {
      const size_t n = ordinal++;
      if (next_special < specials->size() && (*specials)[next_special].ordinal == n) {
        v = MetaValue::Number((*specials)[next_special++].value);
      }
      return Done(reader->Value(std::move(v)));
    }
    bool Open(bool object) {
      if (reader->depth_ >= kMaxJsonDepth) {
        return Done(Status::Corrupt(reader->origin_ + ": JSON nested deeper than the budget of " +
                                    std::to_string(kMaxJsonDepth) + " levels"));
      }
      if (!Done(reader->Open(object))) return false;
      ++reader->depth_;
      return true;
    }
    bool Close() {
      bool ok = Done(reader->Close());
      --reader->depth_;
      return ok;
    }
    bool null() { return Scalar(std::nullopt); }
    bool boolean(bool b) { return Scalar(MetaValue::Bool(b)); }
    bool number_integer(nlohmann::json::number_integer_t v) {
      return Scalar(MetaValue::Number(static_cast<double>(v)));
    }
    bool number_unsigned(nlohmann::json::number_unsigned_t v) {
      return Scalar(MetaValue::Number(static_cast<double>(v)));
    }
    bool number_float(nlohmann::json::number_float_t v, const std::string& /*spelling*/) {
      return Scalar(MetaValue::Number(v));
    }
    bool string(std::string& s) { return Scalar(MetaValue::String(std::move(s))); }
    bool binary(nlohmann::json::binary_t& /*bytes*/) { return true; }  // not in JSON text
    bool start_object(std::size_t /*size*/) { return Open(true); }
    bool start_array(std::size_t /*size*/) { return Open(false); }
    bool end_object() { return Close(); }
    bool end_array() { return Close(); }
    bool key(std::string& k) { return Done(reader->Key(std::move(k))); }
    bool parse_error(std::size_t /*position*/, const std::string& /*token*/,
                     const nlohmann::json::exception& e) {
      syntax_error = e.what();
      return false;
    }
  };

  std::string origin_;
  int depth_ = 0;
};

}  // namespace

Result<Meta> ParseNativeJson(std::string_view text, const std::string& origin) {
  class Reader : public JsonReader {
   public:
    explicit Reader(const std::string& origin) : JsonReader(origin), fields_(origin) {}
    Meta Take() { return fields_.Take(); }

   private:
    Status Key(std::string key) override {
      if (depth() == 1) key_ = std::move(key);
      return Status::Ok();
    }
    Status Value(std::optional<MetaValue> v) override {
      if (depth() == 0) return NotAnObject();
      if (depth() == 1) return fields_.Put(key_, std::move(v));
      return Status::Ok();
    }
    Status Open(bool object) override {
      if (depth() == 0) return object ? Status::Ok() : NotAnObject();
      if (depth() == 1) return fields_.Put(key_, std::nullopt);  // nested: skipped
      return Status::Ok();
    }
    Fields fields_;
    std::string key_;
  } reader(origin);
  if (Status s = reader.Parse(text, kMaxJsonMetaBytes); !s.ok()) return s;
  return reader.Take();
}

Result<Meta> ParseTrainerState(std::string_view text, const std::string& origin) {
  // Reads global_step and epoch at the top, and from each log_history entry
  // its step and eval_* values; entries whose step is not global_step are
  // dropped as soon as global_step is known (the Trainer writes keys sorted,
  // so it comes before log_history).
  class Reader : public JsonReader {
   public:
    explicit Reader(const std::string& origin) : JsonReader(origin), entry_(origin) {}

    Result<Meta> Take() {
      if (!global_step_ || global_step_->type != MetaType::kNumber ||
          std::isnan(global_step_->number)) {
        return Status::Corrupt(origin() + ": no numeric global_step");
      }
      Meta meta;
      const double step = global_step_->number;
      meta.Set("global_step", MetaValue::Number(step));
      if (epoch_ && epoch_->type == MetaType::kNumber) meta.Set("epoch", *epoch_);
      for (auto& [entry_step, values] : candidates_) {
        if (entry_step != step) continue;
        for (auto& [key, value] : values.entries) meta.Set(key, std::move(value));
      }
      return meta;
    }

   private:
    Status Key(std::string key) override {
      if (depth() == 1) top_key_ = std::move(key);
      if (depth() == 3 && in_entry_) entry_key_ = std::move(key);
      return Status::Ok();
    }
    Status Value(std::optional<MetaValue> v) override {
      if (depth() == 0) return NotAnObject();
      if (depth() == 1) {
        if (top_key_ == "global_step") global_step_ = std::move(v);
        if (top_key_ == "epoch") epoch_ = std::move(v);
        if (top_key_ == "log_history") return NotAList();
      }
      if (depth() == 3 && in_entry_) return EntryValue(std::move(v));
      return Status::Ok();
    }
    Status Open(bool object) override {
      if (depth() == 0) return object ? Status::Ok() : NotAnObject();
      if (depth() == 1) {
        if (top_key_ == "global_step") global_step_.reset();
        if (top_key_ == "epoch") epoch_.reset();
        if (top_key_ == "log_history") {
          if (object) return NotAList();
          in_history_ = true;
          candidates_.clear();  // a later log_history replaces an earlier one
          candidate_values_ = 0;
        }
      }
      if (depth() == 2 && in_history_ && object) {
        in_entry_ = true;
        entry_ = Fields(origin());
        entry_step_.reset();
      }
      if (depth() == 3 && in_entry_) return EntryValue(std::nullopt);
      return Status::Ok();
    }
    Status Close() override {
      // depth() is the depth of the container being closed.
      if (depth() == 2) in_history_ = false;
      if (depth() == 3 && in_entry_) {
        in_entry_ = false;
        return EndEntry();
      }
      return Status::Ok();
    }

    Status EntryValue(std::optional<MetaValue> v) {
      if (entry_key_ == "step") {
        entry_step_.reset();
        if (v && v->type == MetaType::kNumber) entry_step_ = v->number;
        return Status::Ok();
      }
      if (entry_key_.rfind("eval_", 0) != 0) return Status::Ok();
      return entry_.Put(entry_key_, std::move(v));
    }

    Status EndEntry() {
      if (!entry_step_) return Status::Ok();
      if (global_step_ && global_step_->type == MetaType::kNumber &&
          global_step_->number != *entry_step_) {
        return Status::Ok();
      }
      Meta values = entry_.Take();
      if (values.entries.empty()) return Status::Ok();
      candidate_values_ += values.entries.size();
      if (candidate_values_ > kMaxMetaKeys) {
        return Status::Corrupt(origin() + ": more than the budget of " +
                               std::to_string(kMaxMetaKeys) +
                               " eval_* values in log_history before global_step");
      }
      candidates_.emplace_back(*entry_step_, std::move(values));
      return Status::Ok();
    }

    Status NotAList() { return Status::Corrupt(origin() + ": log_history is not a list"); }

    std::string top_key_, entry_key_;
    std::optional<MetaValue> global_step_, epoch_;
    bool in_history_ = false, in_entry_ = false;
    Fields entry_;
    std::optional<double> entry_step_;
    std::vector<std::pair<double, Meta>> candidates_;
    size_t candidate_values_ = 0;
  } reader(origin);
  if (Status s = reader.Parse(text, kMaxJsonMetaBytes); !s.ok()) return s;
  return reader.Take();
}

}  // namespace ckptfs::core
