// Checkpoint meta: a flat, ordered map key -> number | string | bool, and the
// parsers for every layout's meta source (DESIGN.md §1).
//
// Parsers are pure functions over bytes or names: they never touch the disk,
// never throw, and report malformed input as a kCorrupt Status naming the
// origin passed in. Keys whose values are not scalars (nested maps, lists,
// Python-tagged objects) are skipped and listed in Meta::skipped.
//
// What they accept is what the tool that reads the file accepts: CKPT.yaml as
// PyYAML's yaml.safe_load (SpeechBrain), meta.json and trainer_state.json as
// Python's json.loads (Hugging Face), so NaN, Infinity and -Infinity are
// numbers. A key given twice keeps its first position and its last value, as
// a Python dict does.
//
// Budgets. Meta files are small (a CKPT.yaml is ~150 bytes; the
// trainer_state.json of a 100k-step run logging every 10 steps is 1.7 MB, one
// logging every step 17 MB), and parsing is bounded by these; input beyond a
// budget is kCorrupt with a message naming the origin and the budget:
//  - kMaxYamlMetaBytes: yaml-cpp builds ~100 bytes of nodes per input byte
//    (a 60 MB CKPT.yaml took 3 GB and 80 s; 350 KB of flow list, 100 MB),
//    so YAML gets a low ceiling, ~1700 times a real CKPT.yaml.
//  - kMaxJsonMetaBytes: JSON is read as a stream of events and never built
//    as a tree, so memory stays near the input size.
//  - kMaxMetaKeys: keys of the top-level map (kept or skipped), and eval_*
//    metrics of trainer_state.json held while looking for global_step.
//  - kMaxYamlDepth / kMaxJsonDepth: nesting. PyYAML's composer recurses and
//    gives up near depth 490 (Python's default recursion limit of 1000, two
//    frames a level); json.loads near depth 990. Deeper input is refused, as
//    there. JSON is parsed without recursion; yaml-cpp's recursion is cut by
//    its own guard (depth 2000) before the stack is at risk.
#ifndef CKPTFS_CORE_META_H_
#define CKPTFS_CORE_META_H_

#include <cstddef>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "core/status.h"

namespace ckptfs::core {

inline constexpr size_t kMaxYamlMetaBytes = size_t{256} << 10;  // 256 KiB
inline constexpr size_t kMaxJsonMetaBytes = size_t{64} << 20;   // 64 MiB
inline constexpr size_t kMaxMetaKeys = 10000;
inline constexpr int kMaxYamlDepth = 480;
inline constexpr int kMaxJsonDepth = 990;

enum class MetaType { kNumber = 0, kString = 1, kBool = 2 };

struct MetaValue {
  MetaType type = MetaType::kString;
  double number = 0;  // kNumber; 0/1 for kBool
  std::string text;   // kString; the canonical spelling for the others

  static MetaValue Number(double v);
  static MetaValue String(std::string v);
  static MetaValue Bool(bool v);
  // Types a bare token as a user or a file name writes it: "0.25" is a
  // number, "true"/"false" a bool, anything else a string.
  static MetaValue FromToken(std::string_view token);

  bool operator==(const MetaValue& o) const {
    return type == o.type && number == o.number && text == o.text;
  }
};

// Not thread-safe for writes; const use from several threads is.
struct Meta {
  std::vector<std::pair<std::string, MetaValue>> entries;  // in source order
  std::vector<std::string> skipped;                        // non-scalar keys

  const MetaValue* Find(std::string_view key) const;
  // The value of key when it is a number other than NaN.
  std::optional<double> Number(std::string_view key) const;
  // Replaces an existing key's value in place, else appends: O(1) on average
  // (a key -> position index, rebuilt when entries was appended to directly).
  void Set(std::string key, MetaValue value);

 private:
  // A position found here is checked against entries before it is trusted.
  std::unordered_map<std::string, size_t> positions_;
};

// SpeechBrain CKPT.yaml: a YAML map of scalars. What PyYAML's safe_load
// refuses is kCorrupt: among others a stream of more than one document, text
// after a "..." document end marker, a "..." before any document, and a tab
// where a token should start outside the document. Where yaml-cpp is more
// lenient than PyYAML inside a document, a few known cases are checked (a
// plain key without ':'); see meta.cc.
Result<Meta> ParseSpeechBrainYaml(std::string_view text, const std::string& origin);

// ckptfs native meta.json: a JSON object, read as json.loads reads it.
Result<Meta> ParseNativeJson(std::string_view text, const std::string& origin);

// Hugging Face trainer_state.json: global_step, epoch and every eval_* metric
// logged in log_history at global_step. A NaN metric is kept (Number() does
// not return it, so it never competes in best/ or retention); an infinite one
// is a number like any other.
Result<Meta> ParseTrainerState(std::string_view text, const std::string& origin);

// A single-file checkpoint name such as "epoch=3-step=100-val_loss=0.25.ckpt",
// "best_model_9_val_acc=0.77.pt" or "checkpoint_12.pt". Returns nullopt when
// the name is not a checkpoint name (wrong extension, or neither key=value
// pairs nor a trailing index). A trailing index is stored as "index".
std::optional<Meta> ParseSingleFileName(std::string_view file_name);

// The extension of a single-file checkpoint name ("ckpt" -> ".ckpt").
std::string FileExtension(std::string_view file_name);

}  // namespace ckptfs::core

#endif  // CKPTFS_CORE_META_H_
