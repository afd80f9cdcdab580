#include "index/scanner.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>

#include <chrono>
#include <cmath>
#include <cerrno>
#include <map>
#include <memory>
#include <set>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "core/beneath.h"

namespace ckptfs::index {

using core::Checkpoint;
using core::Layout;
using core::Result;
using core::Status;

namespace {

constexpr int kMaxDepth = 64;

int64_t MtimeNs(const struct stat& st) {
  return static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec;
}

struct DirRow {
  int64_t mtime_ns = 0;
  bool is_checkpoint = false;
};

struct CheckpointRow {
  std::string stamp;
  Layout layout = Layout::kNative;
  std::string experiment;
};

class Walker {
 public:
  Walker(Db* db, std::string source) : db_(db), source_(std::move(source)) {}

  // A full scan: every row is loaded, the whole tree walked, the rest swept.
  Result<ScanStats> Run() {
    if (Status s = OpenSource(); !s.ok()) return s;
    return InTransaction([this]() -> Status {
      if (Status s = Load(nullptr); !s.ok()) return s;
      if (Status s = Visit(source_, "", 0); !s.ok()) return s;
      return Sweep();
    });
  }

  // A targeted scan of the paths events named: each target is walked as a
  // subtree of its own and only its own rows are swept.
  Result<ScanStats> RunTargets(const std::vector<std::string>& targets) {
    if (Status s = OpenSource(); !s.ok()) return s;
    return InTransaction([&]() -> Status {
      for (const std::string& target : targets) {
        if (target != source_ && target.rfind(source_ + "/", 0) != 0) continue;
        Reset();
        if (Status s = Load(&target); !s.ok()) return s;
        if (Status s = VisitTarget(target); !s.ok()) return s;
        if (Status s = Sweep(); !s.ok()) return s;
      }
      return Status::Ok();
    });
  }

 private:
  // Everything under the source is reached beneath this descriptor, never
  // through a path string (core/beneath.h): a directory that another user
  // swaps for a symbolic link mid-scan is skipped, not followed.
  Status OpenSource() {
    Result<core::Beneath> b = core::Beneath::Open(source_);
    if (!b.ok()) return b.status();
    source_fd_ = std::move(*b);
    return Status::Ok();
  }

  template <typename Fn>
  Result<ScanStats> InTransaction(Fn body) {
    auto start = std::chrono::steady_clock::now();
    Transaction txn(db_);
    if (!txn.status().ok()) return txn.status();
    if (Status s = body(); !s.ok()) return s;
    if (Status s = txn.Commit(); !s.ok()) return s;
    stats_.changed_experiments.assign(changed_.begin(), changed_.end());
    stats_.seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    return stats_;
  }

  void Reset() {
    dirs_.clear();
    children_.clear();
    checkpoints_.clear();
    singles_.clear();
    seen_dirs_.clear();
    seen_checkpoints_.clear();
  }

  Status VisitTarget(const std::string& target) {
    const std::string parent = target.substr(0, target.rfind('/'));
    struct stat st {};
    const std::string name = target.substr(target.rfind('/') + 1);
    if (target != source_ && name[0] == '.') return Status::Ok();  // hidden: never indexed
    if (!source_fd_.Lstat(target, &st).ok()) return Status::Ok();  // gone: Sweep removes it
    if (S_ISDIR(st.st_mode)) return Visit(target, parent, 0);
    if (S_ISREG(st.st_mode) && core::ParseSingleFileName(name)) {
      return Refresh(target, Layout::kSingleFile);
    }
    return Status::Ok();
  }

  // Loads the rows of the whole index, or of one subtree (path == prefix or
  // below it).
  Status Load(const std::string* prefix) {
    const std::string where =
        prefix == nullptr ? "" : " WHERE path = ?1 OR (path > ?2 AND path < ?3)";
    auto bind = [&](Stmt* st) {
      if (prefix != nullptr) st->Bind(1, *prefix).Bind(2, *prefix + "/").Bind(3, *prefix + "0");
    };
    Result<Stmt> dirs = db_->Prepare("SELECT path, parent, mtime_ns, is_checkpoint FROM dirs" + where);
    if (!dirs.ok()) return dirs.status();
    bind(&*dirs);
    for (;;) {
      Result<bool> row = dirs->Next();
      if (!row.ok()) return row.status();
      if (!*row) break;
      std::string path = dirs->Text(0);
      children_[dirs->Text(1)].push_back(path);
      dirs_[path] = {dirs->Int(2), dirs->Int(3) != 0};
    }
    Result<Stmt> ckpts =
        db_->Prepare("SELECT path, stamp, layout, experiment FROM checkpoints" + where);
    if (!ckpts.ok()) return ckpts.status();
    bind(&*ckpts);
    for (;;) {
      Result<bool> row = ckpts->Next();
      if (!row.ok()) return row.status();
      if (!*row) break;
      CheckpointRow c{ckpts->Text(1), static_cast<Layout>(ckpts->Int(2)), ckpts->Text(3)};
      std::string path = ckpts->Text(0);
      if (c.layout == Layout::kSingleFile) singles_[c.experiment].push_back(path);
      checkpoints_.emplace(std::move(path), std::move(c));
    }
    return Status::Ok();
  }

  // Loads the checkpoint at path again if it is new or its stamp changed.
  Status Refresh(const std::string& path, Layout layout) {
    seen_checkpoints_.insert(path);
    auto it = checkpoints_.find(path);
    if (it != checkpoints_.end() && it->second.layout == layout) {
      Result<std::string> stamp = core::CheckpointStamp(source_fd_, path, layout);
      if (stamp.ok() && *stamp == it->second.stamp) return Status::Ok();
    }
    Result<Checkpoint> c = core::LoadCheckpoint(source_fd_, path, layout);
    if (!c.ok()) {
      // Vanished between listing and reading: the next scan settles it.
      seen_checkpoints_.erase(path);
      return Status::Ok();
    }
    ++stats_.checkpoints_loaded;
    changed_.insert(c->experiment);
    return WriteCheckpoint(db_, *c);
  }

  Status RecordDir(const std::string& path, const std::string& parent, int64_t mtime_ns,
                   bool is_checkpoint) {
    Result<Stmt> st = db_->Prepare(
        "INSERT OR REPLACE INTO dirs(path, parent, mtime_ns, is_checkpoint) VALUES(?,?,?,?)");
    if (!st.ok()) return st.status();
    return st->Bind(1, path).Bind(2, parent).Bind(3, mtime_ns).Bind(4, int64_t{is_checkpoint}).Run();
  }

  Status Visit(const std::string& path, const std::string& parent, int depth) {
    if (depth > kMaxDepth) return Status::Ok();
    struct stat st {};
    if (!source_fd_.Lstat(path, &st).ok() || !S_ISDIR(st.st_mode)) return Status::Ok();
    ++stats_.dirs_visited;
    seen_dirs_.insert(path);
    const int64_t mtime = MtimeNs(st);
    auto known = dirs_.find(path);
    if (known != dirs_.end() && known->second.mtime_ns == mtime) {
      if (known->second.is_checkpoint) {
        auto c = checkpoints_.find(path);
        if (c != checkpoints_.end()) return Refresh(path, c->second.layout);
        // Indexed as a checkpoint directory but its row is gone: list it.
      } else {
        for (const std::string& child : children_[path]) {
          if (Status s = Visit(child, path, depth + 1); !s.ok()) return s;
        }
        for (const std::string& single : singles_[path]) {
          if (Status s = Refresh(single, Layout::kSingleFile); !s.ok()) return s;
        }
        return Status::Ok();
      }
    }
    return ReadDir(path, parent, mtime, depth);
  }

  Status ReadDir(const std::string& path, const std::string& parent, int64_t mtime, int depth) {
    ++stats_.dirs_read;
    std::vector<std::string> subdirs;
    std::vector<std::string> files;
    bool has_yaml = false, has_json = false, has_trainer = false;
    {
      // Unreadable, or reached through a link: nothing indexed below it.
      Result<core::ScopedFd> fd = source_fd_.OpenAt(path, O_RDONLY | O_DIRECTORY);
      if (!fd.ok()) return Status::Ok();
      DIR* dir = ::fdopendir(fd->get());
      if (dir == nullptr) return Status::Ok();
      fd->release();  // the DIR owns it now
      std::unique_ptr<DIR, int (*)(DIR*)> guard(dir, ::closedir);
      while (struct dirent* e = ::readdir(dir)) {
        std::string name = e->d_name;
        if (name.empty() || name[0] == '.') continue;
        unsigned char type = e->d_type;
        if (type == DT_UNKNOWN) {
          struct stat est {};
          if (::fstatat(::dirfd(dir), e->d_name, &est, AT_SYMLINK_NOFOLLOW) != 0) continue;
          type = S_ISDIR(est.st_mode) ? DT_DIR : S_ISREG(est.st_mode) ? DT_REG : DT_UNKNOWN;
        }
        if (type == DT_DIR) {
          subdirs.push_back(std::move(name));
        } else if (type == DT_REG) {
          has_yaml = has_yaml || name == "CKPT.yaml";
          has_json = has_json || name == "meta.json";
          has_trainer = has_trainer || name == "trainer_state.json";
          files.push_back(std::move(name));
        }
      }
    }
    std::string name = path.substr(path.rfind('/') + 1);
    std::optional<Layout> layout;
    if (path != source_) layout = core::DirectoryLayout(name, has_yaml, has_json, has_trainer);
    if (dirs_.count(path) == 0) stats_.new_dirs.push_back(path);
    if (Status s = RecordDir(path, parent, mtime, layout.has_value()); !s.ok()) return s;
    if (layout) return Refresh(path, *layout);
    for (const std::string& sub : subdirs) {
      if (Status s = Visit(path + "/" + sub, path, depth + 1); !s.ok()) return s;
    }
    for (const std::string& file : files) {
      if (!core::ParseSingleFileName(file)) continue;
      if (Status s = Refresh(path + "/" + file, Layout::kSingleFile); !s.ok()) return s;
    }
    return Status::Ok();
  }

  Status Sweep() {
    for (const auto& [path, row] : dirs_) {
      if (seen_dirs_.count(path) != 0) continue;
      Result<Stmt> st = db_->Prepare("DELETE FROM dirs WHERE path = ?");
      if (!st.ok()) return st.status();
      if (Status s = st->Bind(1, path).Run(); !s.ok()) return s;
    }
    for (const auto& [path, row] : checkpoints_) {
      if (seen_checkpoints_.count(path) != 0) continue;
      Result<Stmt> st = db_->Prepare("DELETE FROM checkpoints WHERE path = ?");
      if (!st.ok()) return st.status();
      if (Status s = st->Bind(1, path).Run(); !s.ok()) return s;
      ++stats_.checkpoints_removed;
      changed_.insert(row.experiment);
    }
    return Status::Ok();
  }

  Db* db_;
  const std::string source_;
  core::Beneath source_fd_;
  std::unordered_map<std::string, DirRow> dirs_;
  std::unordered_map<std::string, std::vector<std::string>> children_;
  std::unordered_map<std::string, CheckpointRow> checkpoints_;
  std::unordered_map<std::string, std::vector<std::string>> singles_;
  std::unordered_set<std::string> seen_dirs_;
  std::unordered_set<std::string> seen_checkpoints_;
  std::set<std::string> changed_;
  ScanStats stats_;
};

}  // namespace

Result<ScanStats> ScanTree(Db* db, const std::string& source) { return Walker(db, source).Run(); }

Result<ScanStats> ScanTargets(Db* db, const std::string& source,
                              const std::vector<std::string>& targets) {
  return Walker(db, source).RunTargets(targets);
}

Status WriteCheckpoint(Db* db, const Checkpoint& c) {
  Result<Stmt> del = db->Prepare("DELETE FROM checkpoints WHERE path = ?");
  if (!del.ok()) return del.status();
  if (Status s = del->Bind(1, c.path).Run(); !s.ok()) return s;

  std::string skipped;
  for (const std::string& k : c.meta.skipped) skipped += (skipped.empty() ? "" : ",") + k;
  Result<Stmt> ins = db->Prepare(
      "INSERT INTO checkpoints(path, experiment, name, name_key, layout, valid, error, recency,"
      " step, stamp, skipped) VALUES(?,?,?,?,?,?,?,?,?,?,?)");
  if (!ins.ok()) return ins.status();
  ins->Bind(1, c.path)
      .Bind(2, c.experiment)
      .Bind(3, c.name)
      .Bind(4, core::NaturalSortKey(c.name))
      .Bind(5, int64_t{static_cast<int>(c.layout)})
      .Bind(6, int64_t{c.valid})
      .Bind(7, c.error)
      .Bind(8, c.recency)
      .Bind(10, c.stamp)
      .Bind(11, skipped);
  if (c.step) {
    ins->Bind(9, *c.step);
  } else {
    ins->BindNull(9);
  }
  if (Status s = ins->Run(); !s.ok()) return s;
  const int64_t id = db->LastInsertId();

  int64_t pos = 0;
  for (const auto& [key, value] : c.meta.entries) {
    Result<Stmt> m =
        db->Prepare("INSERT OR REPLACE INTO meta(ckpt_id, key, type, num, str, pos) VALUES(?,?,?,?,?,?)");
    if (!m.ok()) return m.status();
    m->Bind(1, id).Bind(2, key).Bind(3, int64_t{static_cast<int>(value.type)}).Bind(5, value.text).Bind(6, pos++);
    if (value.type == core::MetaType::kString || std::isnan(value.number)) {
      m->BindNull(4);  // NaN never competes and never matches
    } else {
      m->Bind(4, value.number);
    }
    if (Status s = m->Run(); !s.ok()) return s;
  }
  for (const core::CheckpointFile& f : c.files) {
    Result<Stmt> fs = db->Prepare("INSERT OR REPLACE INTO files(ckpt_id, name, size, mtime_ns) VALUES(?,?,?,?)");
    if (!fs.ok()) return fs.status();
    if (Status s = fs->Bind(1, id).Bind(2, f.name).Bind(3, f.size).Bind(4, f.mtime_ns).Run(); !s.ok()) {
      return s;
    }
  }
  return Status::Ok();
}

}  // namespace ckptfs::index
