// Internal to core/meta*.cc: the key/value collector both meta parsers share.
#ifndef CKPTFS_CORE_META_FIELDS_H_
#define CKPTFS_CORE_META_FIELDS_H_

#include <optional>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "core/meta.h"
#include "core/status.h"

namespace ckptfs::core::meta_internal {

// Keys in first-seen order with their last value, as the Python dict that
// json.loads or yaml.safe_load builds; a nullopt value is a skipped key.
class Fields {
 public:
  explicit Fields(std::string origin) : origin_(std::move(origin)) {}

  Status Put(std::string key, std::optional<MetaValue> value) {
    auto it = positions_.find(key);
    if (it != positions_.end()) {
      items_[it->second].second = std::move(value);
      return Status::Ok();
    }
    if (items_.size() >= kMaxMetaKeys) {
      return Status::Corrupt(origin_ + ": more keys than the budget of " +
                             std::to_string(kMaxMetaKeys));
    }
    positions_.emplace(key, items_.size());
    items_.emplace_back(std::move(key), std::move(value));
    return Status::Ok();
  }

  Meta Take() {
    Meta meta;
    for (auto& [key, value] : items_) {
      if (value) {
        meta.Set(std::move(key), std::move(*value));
      } else {
        meta.skipped.push_back(std::move(key));
      }
    }
    items_.clear();
    positions_.clear();
    return meta;
  }

 private:
  std::string origin_;
  std::vector<std::pair<std::string, std::optional<MetaValue>>> items_;
  std::unordered_map<std::string, size_t> positions_;
};

}  // namespace ckptfs::core::meta_internal

#endif  // CKPTFS_CORE_META_FIELDS_H_
