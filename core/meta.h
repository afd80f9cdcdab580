// Checkpoint meta: a flat, ordered map key -> number | string | bool, and the
// parsers for every layout's meta source (DESIGN.md §1).
//
// Parsers are pure functions over bytes or names: they never touch the disk,
// never throw, and report malformed input as a kCorrupt Status naming the
// origin passed in. Keys whose values are not scalars (nested maps, lists,
// Python-tagged objects) are skipped and listed in Meta::skipped.
#ifndef CKPTFS_CORE_META_H_
#define CKPTFS_CORE_META_H_

#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "core/status.h"

namespace ckptfs::core {

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

struct Meta {
  std::vector<std::pair<std::string, MetaValue>> entries;  // in source order
  std::vector<std::string> skipped;                         // non-scalar keys

  const MetaValue* Find(std::string_view key) const;
  std::optional<double> Number(std::string_view key) const;
  void Set(std::string key, MetaValue value);  // replaces an existing key
};

// SpeechBrain CKPT.yaml: a YAML map of scalars. Anything YAML cannot parse
// (PyYAML would refuse it too) is kCorrupt.
Result<Meta> ParseSpeechBrainYaml(std::string_view text, const std::string& origin);

// ckptfs native meta.json: a JSON object.
Result<Meta> ParseNativeJson(std::string_view text, const std::string& origin);

// Hugging Face trainer_state.json: global_step, epoch and every eval_* metric
// logged in log_history at global_step.
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
