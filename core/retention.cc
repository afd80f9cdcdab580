#include "core/retention.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>  // renameat2, RENAME_NOREPLACE
#include <map>
#include <nlohmann/json.hpp>
#include <set>

#include "core/log.h"

namespace ckptfs::core {
namespace {

Result<int> ParseCountValue(const std::string& name, const std::string& text) {
  if (text.empty() || text.size() > 9 || !std::all_of(text.begin(), text.end(), [](char c) {
        return std::isdigit(static_cast<unsigned char>(c));
      })) {
    return Status::InvalidArgument(name + ": expected a whole number, got '" + text + "'");
  }
  return std::stoi(text);
}

std::vector<std::string> SplitColons(const std::string& text) {
  std::vector<std::string> parts;
  size_t pos = 0;
  for (;;) {
    size_t c = text.find(':', pos);
    parts.push_back(text.substr(pos, c == std::string::npos ? std::string::npos : c - pos));
    if (c == std::string::npos) return parts;
    pos = c + 1;
  }
}

// Time buckets as restic and borg count them: UTC hours, days, and weeks.
int64_t Bucket(double unixtime, int64_t seconds) {
  return static_cast<int64_t>(std::floor(unixtime / static_cast<double>(seconds)));
}

}  // namespace

Result<int64_t> ParseSize(const std::string& text) {
  size_t digits = 0;
  while (digits < text.size() && std::isdigit(static_cast<unsigned char>(text[digits]))) ++digits;
  if (digits == 0 || digits > 15) return Status::InvalidArgument("bad size '" + text + "'");
  int64_t v = std::stoll(text.substr(0, digits));
  const std::string unit = text.substr(digits);
  int shift = 0;
  if (unit == "K" || unit == "k") {
    shift = 10;
  } else if (unit == "M") {
    shift = 20;
  } else if (unit == "G") {
    shift = 30;
  } else if (unit == "T") {
    shift = 40;
  } else if (!unit.empty()) {
    return Status::InvalidArgument("bad size unit in '" + text + "' (use K, M, G or T)");
  }
  if (v > (INT64_MAX >> shift)) return Status::InvalidArgument("size '" + text + "' too large");
  return v << shift;
}

bool RetentionPolicy::empty() const {
  return keep_last == 0 && keep_best.empty() && keep_every.empty() && keep_hourly == 0 &&
         keep_daily == 0 && keep_weekly == 0 && max_bytes < 0;
}

std::string RetentionPolicy::ToString() const {
  std::string s;
  auto add = [&](const std::string& part) { s += (s.empty() ? "" : " ") + part; };
  if (keep_last > 0) add("keep_last=" + std::to_string(keep_last));
  for (const KeepBest& b : keep_best) {
    add(std::string("keep_best=") + (b.order == Order::kMin ? "min:" : "max:") + b.key + ":" +
        std::to_string(b.n));
  }
  for (const KeepEvery& e : keep_every) add("keep_every=" + e.key + ":" + std::to_string(e.n));
  if (keep_hourly > 0) add("keep_hourly=" + std::to_string(keep_hourly));
  if (keep_daily > 0) add("keep_daily=" + std::to_string(keep_daily));
  if (keep_weekly > 0) add("keep_weekly=" + std::to_string(keep_weekly));
  if (max_bytes >= 0) add("max_bytes=" + std::to_string(max_bytes));
  return s.empty() ? "(none)" : s;
}

bool IsPolicyOption(const std::string& name) {
  static const std::set<std::string> kNames = {"--keep-last",   "--keep-best",  "--keep-every",
                                               "--keep-hourly", "--keep-daily", "--keep-weekly",
                                               "--max-bytes"};
  return kNames.count(name) != 0;
}

Status AddPolicyOption(const std::string& name, const std::string& value, RetentionPolicy* p) {
  auto count = [&](int* out) -> Status {
    Result<int> n = ParseCountValue(name, value);
    if (!n.ok()) return n.status();
    if (*n == 0) return Status::InvalidArgument(name + ": must be at least 1");
    *out = *n;
    return Status::Ok();
  };
  if (name == "--keep-last") return count(&p->keep_last);
  if (name == "--keep-hourly") return count(&p->keep_hourly);
  if (name == "--keep-daily") return count(&p->keep_daily);
  if (name == "--keep-weekly") return count(&p->keep_weekly);
  if (name == "--max-bytes") {
    Result<int64_t> bytes = ParseSize(value);
    if (!bytes.ok()) return Status::InvalidArgument(name + ": " + bytes.status().message());
    p->max_bytes = *bytes;
    return Status::Ok();
  }
  const std::vector<std::string> parts = SplitColons(value);
  if (name == "--keep-best") {
    if (parts.size() != 3 || (parts[0] != "min" && parts[0] != "max") || parts[1].empty()) {
      return Status::InvalidArgument(name + ": expected min:KEY:N or max:KEY:N, got '" + value +
                                     "'");
    }
    KeepBest b;
    b.order = parts[0] == "min" ? Order::kMin : Order::kMax;
    b.key = parts[1];
    Result<int> n = ParseCountValue(name, parts[2]);
    if (!n.ok()) return n.status();
    if (*n == 0) return Status::InvalidArgument(name + ": N must be at least 1");
    b.n = *n;
    p->keep_best.push_back(b);
    return Status::Ok();
  }
  if (name == "--keep-every") {
    if (parts.size() != 2 || parts[0].empty()) {
      return Status::InvalidArgument(name + ": expected KEY:N, got '" + value + "'");
    }
    Result<int> n = ParseCountValue(name, parts[1]);
    if (!n.ok()) return n.status();
    if (*n == 0) return Status::InvalidArgument(name + ": N must be at least 1");
    p->keep_every.push_back({parts[0], *n});
    return Status::Ok();
  }
  return Status::InvalidArgument("unknown policy option " + name);
}

Result<RetentionPolicy> ParsePolicyJson(std::string_view text, const std::string& origin) {
  nlohmann::json doc = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (doc.is_discarded() || !doc.is_object()) {
    return Status::InvalidArgument(origin + ": a policy is a JSON object");
  }
  RetentionPolicy p;
  for (const auto& [key, value] : doc.items()) {
    std::string option = "--" + key;
    std::replace(option.begin(), option.end(), '_', '-');
    if (!IsPolicyOption(option))
      return Status::InvalidArgument(origin + ": unknown rule '" + key + "'");
    std::vector<nlohmann::json> values;
    if (value.is_array()) {
      values.assign(value.begin(), value.end());
    } else {
      values.push_back(value);
    }
    for (const auto& v : values) {
      std::string s;
      if (v.is_string()) {
        s = v.get<std::string>();
      } else if (v.is_number_unsigned()) {
        s = std::to_string(v.get<uint64_t>());
      } else {
        return Status::InvalidArgument(origin + ": rule '" + key + "' needs a number or string");
      }
      if (Status st = AddPolicyOption(option, s, &p); !st.ok()) {
        return Status::InvalidArgument(origin + ": " + st.message());
      }
    }
  }
  return p;
}

std::vector<RetentionDecision> DecideRetention(const RetentionPolicy& policy,
                                               const std::vector<RetentionCandidate>& candidates) {
  const size_t n = candidates.size();
  std::vector<std::string> kept_by(n), ranked_by(n);
  auto rank = [&](size_t i, const std::string& rule) {
    if (ranked_by[i].empty()) ranked_by[i] = rule;
  };
  auto keep = [&](size_t i, const std::string& rule) {
    if (kept_by[i].empty()) kept_by[i] = rule;
  };
  // Valid checkpoints newest first: the order of recency-based rules and of ties.
  std::vector<size_t> newest;
  for (size_t i = 0; i < n; ++i) {
    if (candidates[i].checkpoint.valid) newest.push_back(i);
  }
  std::stable_sort(newest.begin(), newest.end(), [&](size_t a, size_t b) {
    return IsNewer(candidates[a].checkpoint, candidates[b].checkpoint);
  });

  for (size_t i = 0; i < n; ++i) {
    const RetentionCandidate& c = candidates[i];
    if (!c.checkpoint.valid) keep(i, "invalid (never deleted)");
    if (c.pinned) keep(i, std::string("pinned (") + kPinMarker + ")");
    if (c.open) keep(i, "open through the mount (deferred)");
  }
  if (!newest.empty()) keep(newest.front(), "newest");

  if (policy.keep_last > 0) {
    const std::string rule = "keep_last=" + std::to_string(policy.keep_last);
    for (size_t r = 0; r < newest.size(); ++r) {
      rank(newest[r], rule);
      if (static_cast<int>(r) < policy.keep_last) keep(newest[r], rule);
    }
  }
  for (const KeepBest& b : policy.keep_best) {
    const std::string rule = std::string("keep_best=") +
                             (b.order == Order::kMin ? "min:" : "max:") + b.key + ":" +
                             std::to_string(b.n);
    std::vector<size_t> having;
    for (size_t i : newest) {
      if (candidates[i].checkpoint.meta.Number(b.key)) having.push_back(i);
    }
    // Stable on the newest-first order: equal values keep the newer.
    std::stable_sort(having.begin(), having.end(), [&](size_t x, size_t y) {
      double vx = *candidates[x].checkpoint.meta.Number(b.key);
      double vy = *candidates[y].checkpoint.meta.Number(b.key);
      return b.order == Order::kMin ? vx < vy : vx > vy;
    });
    for (size_t r = 0; r < having.size(); ++r) {
      rank(having[r], rule);
      if (static_cast<int>(r) < b.n) keep(having[r], rule);
    }
  }
  for (const KeepEvery& e : policy.keep_every) {
    const std::string rule = "keep_every=" + e.key + ":" + std::to_string(e.n);
    for (size_t i : newest) {
      std::optional<double> v = candidates[i].checkpoint.meta.Number(e.key);
      if (!v) continue;
      rank(i, rule);
      if (std::fmod(*v, static_cast<double>(e.n)) == 0) keep(i, rule);
    }
  }
  struct BucketRule {
    int count;
    int64_t seconds;
    int64_t offset;  // weeks start on Monday: the epoch was a Thursday
    const char* name;
  };
  const BucketRule buckets[] = {{policy.keep_hourly, 3600, 0, "keep_hourly"},
                                {policy.keep_daily, 86400, 0, "keep_daily"},
                                {policy.keep_weekly, 604800, 3 * 86400, "keep_weekly"}};
  for (const BucketRule& br : buckets) {
    if (br.count <= 0) continue;
    const std::string rule = std::string(br.name) + "=" + std::to_string(br.count);
    std::set<int64_t> seen;
    for (size_t i : newest) {
      rank(i, rule);
      const int64_t bucket =
          Bucket(candidates[i].checkpoint.recency + static_cast<double>(br.offset), br.seconds);
      if (seen.count(bucket) == 0 && static_cast<int>(seen.size()) < br.count) {
        seen.insert(bucket);
        keep(i, rule);
      }
    }
  }
  if (policy.max_bytes >= 0) {
    const std::string rule = "max_bytes=" + std::to_string(policy.max_bytes);
    int64_t used = 0;
    bool full = false;
    for (size_t i : newest) {
      rank(i, rule);
      if (!full && used + candidates[i].bytes <= policy.max_bytes) {
        used += candidates[i].bytes;
        keep(i, rule);
      } else {
        full = true;  // newest first, no gaps: an older one never jumps the queue
      }
    }
  }

  std::vector<RetentionDecision> out;
  for (size_t i = 0; i < n; ++i) {
    RetentionDecision d;
    d.path = candidates[i].checkpoint.path;
    if (!kept_by[i].empty()) {
      d.keep = true;
      d.why = kept_by[i];
    } else if (ranked_by[i].empty()) {
      d.keep = true;
      d.why = "no rule ranks it";
    } else {
      d.keep = false;
      d.why = "ranked by " + ranked_by[i] + ", kept by none of " + policy.ToString();
    }
    out.push_back(std::move(d));
  }
  return out;
}

namespace {

// Whether name exists in dir_fd, not following a link at any component.
bool ExistsAt(int dir_fd, const std::string& name) {
  return OpenBeneathFd(dir_fd, name, O_PATH, 0, name).ok();
}

}  // namespace

bool IsPinned(const Beneath& source, const Checkpoint& c) {
  Result<ScopedFd> exp = source.OpenAt(c.experiment, O_PATH | O_DIRECTORY);
  if (!exp.ok()) return false;
  return ExistsAt(exp->get(), c.layout == Layout::kSingleFile ? c.name + kPinMarker
                                                              : c.name + "/" + kPinMarker);
}

Status DeleteCheckpoint(const Beneath& source, const Checkpoint& c) {
  Result<ScopedFd> exp = source.OpenAt(c.experiment, O_RDONLY | O_DIRECTORY);
  if (!exp.ok()) return exp.status();
  // Only what is still, right now, the checkpoint we decided about.
  struct stat est {
  }, st{};
  if (::fstat(exp->get(), &est) != 0) return Status::FromErrno(c.experiment, errno);
  if (::fstatat(exp->get(), c.name.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0) {
    return Status::FromErrno(c.path, errno);
  }
  if (c.layout != Layout::kSingleFile) {
    if (!S_ISDIR(st.st_mode) || !ExistsAt(exp->get(), c.name + "/" + MetaFileName(c.layout))) {
      return Status::InvalidArgument(c.path + ": no longer looks like a checkpoint; not deleted");
    }
  } else if (!S_ISREG(st.st_mode)) {
    return Status::InvalidArgument(c.path + ": not a regular file; not deleted");
  }
  if (!CountsForRetention(est.st_uid, st.st_uid)) {
    return Status::Permission(c.path + ": owned by uid " + std::to_string(st.st_uid) +
                              ", not the experiment's owner (uid " + std::to_string(est.st_uid) +
                              "); not deleted");
  }
  if (IsPinned(source, c)) return Status::Permission(c.path + ": pinned; not deleted", EPERM);
  Result<std::pair<ScopedFd, std::string>> moved = MoveToTrashAt(exp->get(), c.experiment, c.name);
  if (!moved.ok()) return moved.status();
  return RemoveTreeAt(moved->first.get(), moved->second,
                      c.experiment + "/" + kTrashDir + "/" + moved->second);
}

Result<std::pair<ScopedFd, std::string>> MoveToTrashAt(int exp_fd, const std::string& experiment,
                                                       const std::string& name) {
  Result<ScopedFd> trash = OpenOwnDir(exp_fd, experiment, kTrashDir, ::geteuid(), true);
  if (!trash.ok()) return trash.status();
  const auto now = std::chrono::system_clock::now().time_since_epoch();
  const std::string target =
      name + "." +
      std::to_string(std::chrono::duration_cast<std::chrono::nanoseconds>(now).count());
  const std::string trash_path = experiment + "/" + kTrashDir;
  if (::renameat2(exp_fd, name.c_str(), trash->get(), target.c_str(), RENAME_NOREPLACE) != 0) {
    return Status::FromErrno("cannot move " + experiment + "/" + name + " to " + trash_path, errno);
  }
  return std::make_pair(std::move(*trash), target);
}

Status RemoveTrash(const Beneath& source, const std::string& experiment,
                   std::chrono::seconds min_age) {
  Result<ScopedFd> exp = source.OpenAt(experiment, O_RDONLY | O_DIRECTORY);
  if (!exp.ok()) return exp.status();
  Result<ScopedFd> trash = OpenOwnDir(exp->get(), experiment, kTrashDir, ::geteuid(), false);
  if (!trash.ok()) {
    return trash.status().code() == StatusCode::kNotFound ? Status::Ok() : trash.status();
  }
  const std::string trash_path = experiment + "/" + kTrashDir;
  Result<std::vector<std::string>> listed = ListDirAt(trash->get(), trash_path);
  if (!listed.ok()) return listed.status();
  const std::vector<std::string>& names = *listed;
  Status status;
  bool left = false;
  const auto now = std::chrono::system_clock::now().time_since_epoch();
  const int64_t now_s = std::chrono::duration_cast<std::chrono::seconds>(now).count();
  for (const std::string& n : names) {
    const std::string what = trash_path + "/" + n;
    struct stat st {};
    if (min_age.count() > 0 && ::fstatat(trash->get(), n.c_str(), &st, AT_SYMLINK_NOFOLLOW) == 0 &&
        std::max(st.st_mtim.tv_sec, st.st_ctim.tv_sec) > now_s - min_age.count()) {
      left = true;  // being emptied by an rmtree through new/, perhaps
      continue;
    }
    Log(LogLevel::kInfo, "removing %s left by an interrupted deletion", what.c_str());
    Status s = RemoveTreeAt(trash->get(), n, what);
    if (!s.ok() && status.ok()) status = s;
  }
  if (status.ok() && !left) ::unlinkat(exp->get(), kTrashDir, AT_REMOVEDIR);
  return status;
}

}  // namespace ckptfs::core
