#include "index/index.h"

#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <map>
#include <set>

#include "core/file_util.h"
#include "index/scanner.h"
#include "index/sqlite.h"

namespace ckptfs::index {

using core::Checkpoint;
using core::Result;
using core::Status;

namespace {

constexpr int kSchemaVersion = 1;

const char kSchema[] = R"sql(
CREATE TABLE info(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE dirs(path TEXT PRIMARY KEY, parent TEXT NOT NULL, mtime_ns INTEGER NOT NULL,
                  is_checkpoint INTEGER NOT NULL);
CREATE TABLE checkpoints(id INTEGER PRIMARY KEY, path TEXT UNIQUE NOT NULL,
                         experiment TEXT NOT NULL, name TEXT NOT NULL, name_key TEXT NOT NULL,
                         layout INTEGER NOT NULL, valid INTEGER NOT NULL, error TEXT NOT NULL,
                         recency REAL NOT NULL, step REAL, stamp TEXT NOT NULL,
                         skipped TEXT NOT NULL);
CREATE INDEX checkpoints_by_recency
    ON checkpoints(valid, recency DESC, step DESC, name_key DESC);
CREATE INDEX checkpoints_by_experiment
    ON checkpoints(experiment, valid, recency DESC, step DESC, name_key DESC);
CREATE TABLE files(ckpt_id INTEGER NOT NULL REFERENCES checkpoints(id) ON DELETE CASCADE,
                   name TEXT NOT NULL, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
                   PRIMARY KEY(ckpt_id, name)) WITHOUT ROWID;
CREATE TABLE meta(ckpt_id INTEGER NOT NULL REFERENCES checkpoints(id) ON DELETE CASCADE,
                  key TEXT NOT NULL, type INTEGER NOT NULL, num REAL, str TEXT NOT NULL,
                  pos INTEGER NOT NULL, PRIMARY KEY(ckpt_id, key)) WITHOUT ROWID;
CREATE INDEX meta_by_number ON meta(key, type, num);
CREATE INDEX meta_by_text ON meta(key, type, str);
)sql";

const char kCheckpointColumns[] =
    "c.id, c.path, c.experiment, c.name, c.layout, c.valid, c.error, c.recency, c.step,"
    " c.stamp, c.skipped";

const char kNewestFirst[] = "c.recency DESC, c.step DESC, c.name_key DESC";

void RemoveDbFiles(const std::string& path) {
  for (const char* suffix : {"", "-wal", "-shm", "-journal"}) ::unlink((path + suffix).c_str());
}

// Opens the database and checks it belongs to this source and schema.
Result<std::unique_ptr<Db>> OpenChecked(const std::string& source, const std::string& path) {
  Result<std::unique_ptr<Db>> db = Db::Open(path);
  if (!db.ok()) return db.status();
  Db* d = db->get();
  if (Status s = d->Exec("PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;"
                         " PRAGMA foreign_keys=ON;");
      !s.ok()) {
    return s;
  }
  int64_t v = 0;
  {
    Result<Stmt> version = d->Prepare("PRAGMA user_version");
    if (!version.ok()) return version.status();
    Result<bool> row = version->Next();
    if (!row.ok()) return row.status();
    if (*row) v = version->Int(0);
  }  // the statement resets here, before any schema change
  if (v == 0) {
    Transaction txn(d);
    if (Status s = d->Exec(kSchema); !s.ok()) return s;
    Result<Stmt> ins = d->Prepare("INSERT INTO info(key, value) VALUES('source', ?)");
    if (!ins.ok()) return ins.status();
    if (Status s = ins->Bind(1, source).Run(); !s.ok()) return s;
    if (Status s = d->Exec("PRAGMA user_version = " + std::to_string(kSchemaVersion)); !s.ok()) {
      return s;
    }
    if (Status s = txn.Commit(); !s.ok()) return s;
    return db;
  }
  if (v != kSchemaVersion)
    return Status::Corrupt(path + ": index schema version " + std::to_string(v));
  Result<Stmt> src = d->Prepare("SELECT value FROM info WHERE key = 'source'");
  if (!src.ok()) return src.status();
  Result<bool> has = src->Next();
  if (!has.ok()) return has.status();
  if (!*has || src->Text(0) != source) return Status::Corrupt(path + ": index of another source");
  Result<Stmt> check = d->Prepare("PRAGMA quick_check");
  if (!check.ok()) return check.status();
  Result<bool> ok_row = check->Next();
  if (!ok_row.ok()) return ok_row.status();
  if (!*ok_row || check->Text(0) != "ok") return Status::Corrupt(path + ": quick_check failed");
  return db;
}

const char* SqlOp(core::CompareOp op) {
  switch (op) {
    case core::CompareOp::kEq:
      return "=";
    case core::CompareOp::kNe:
      return "!=";
    case core::CompareOp::kLt:
      return "<";
    case core::CompareOp::kLe:
      return "<=";
    case core::CompareOp::kGt:
      return ">";
    case core::CompareOp::kGe:
      return ">=";
  }
  return "=";
}

// A bound value: text or number.
struct Bound {
  bool is_number = false;
  std::string text;
  double number = 0;
};

void AddWhere(const std::vector<core::Predicate>& where, std::string* sql,
              std::vector<Bound>* binds) {
  for (const core::Predicate& p : where) {
    const bool textual = p.value.type == core::MetaType::kString;
    *sql += " AND EXISTS (SELECT 1 FROM meta p WHERE p.ckpt_id = c.id AND p.key = ? AND p.type = ?";
    *sql += textual ? " AND p.str " : " AND p.num ";
    *sql += SqlOp(p.op);
    *sql += " ?)";
    binds->push_back({false, p.key, 0});
    binds->push_back({true, "", static_cast<double>(static_cast<int>(p.value.type))});
    if (textual) {
      binds->push_back({false, p.value.text, 0});
    } else {
      binds->push_back({true, "", p.value.number});
    }
  }
}

std::vector<Bound> ScopeBinds(const std::string& scope) {
  return {{false, scope, 0}, {false, scope + "/", 0}, {false, scope + "0", 0}};
}

const char kScopeSql[] = " AND (c.experiment = ? OR (c.experiment > ? AND c.experiment < ?))";

void BindAll(Stmt* st, const std::vector<Bound>& binds) {
  int i = 1;
  for (const Bound& b : binds) {
    if (b.is_number) {
      st->Bind(i++, b.number);
    } else {
      st->Bind(i++, b.text);
    }
  }
}

// The first column of every row of a query, read by `column`.
template <typename T>
Result<std::vector<T>> Collect(Db* db, const std::string& sql, const std::vector<Bound>& binds,
                               T (*column)(const Stmt&)) {
  Result<Stmt> st = db->Prepare(sql);
  if (!st.ok()) return st.status();
  BindAll(&*st, binds);
  std::vector<T> out;
  for (;;) {
    Result<bool> r = st->Next();
    if (!r.ok()) return r.status();
    if (!*r) break;
    out.push_back(column(*st));
  }
  return out;
}

Result<std::vector<int64_t>> CollectIds(Db* db, const std::string& sql,
                                        const std::vector<Bound>& binds) {
  return Collect<int64_t>(db, sql, binds, [](const Stmt& st) { return st.Int(0); });
}

Result<std::vector<std::string>> CollectTexts(Db* db, const std::string& sql,
                                              const std::vector<Bound>& binds) {
  return Collect<std::string>(db, sql, binds, [](const Stmt& st) { return st.Text(0); });
}

// One read snapshot of the index for a query that reads ids and then each
// row by id. Without it every statement sees the latest commit, so a scan
// that commits between the two (retention deleting a checkpoint the query
// chose as a candidate, a rescan rewriting a row under a new id) makes a
// chosen row vanish: "checkpoint row N" fails the whole query, and a lookup
// of latest/ fails while latest/ itself is untouched. In WAL mode a read
// transaction never blocks the scanner, nor the scanner it. Ends (without
// writing anything) in its destructor.
class ReadSnapshot {
 public:
  explicit ReadSnapshot(Db* db) : db_(db), status_(db->Exec("BEGIN DEFERRED")) {}
  ~ReadSnapshot() {
    // A snapshot left open would pin this connection to it for good.
    if (status_.ok() && !db_->Exec("COMMIT").ok()) (void)db_->Exec("ROLLBACK");
  }
  ReadSnapshot(const ReadSnapshot&) = delete;
  ReadSnapshot& operator=(const ReadSnapshot&) = delete;
  const Status& status() const { return status_; }

 private:
  Db* db_;
  Status status_;
};

Checkpoint RowToCheckpoint(const Stmt& st) {
  Checkpoint c;
  c.path = st.Text(1);
  c.experiment = st.Text(2);
  c.name = st.Text(3);
  c.layout = static_cast<core::Layout>(st.Int(4));
  c.valid = st.Int(5) != 0;
  c.error = st.Text(6);
  c.recency = st.Double(7);
  if (!st.IsNull(8)) c.step = st.Double(8);
  c.stamp = st.Text(9);
  std::string skipped = st.Text(10);
  size_t pos = 0;
  while (!skipped.empty() && pos <= skipped.size()) {
    size_t comma = skipped.find(',', pos);
    if (comma == std::string::npos) comma = skipped.size();
    c.meta.skipped.push_back(skipped.substr(pos, comma - pos));
    pos = comma + 1;
  }
  return c;
}

}  // namespace

std::string DefaultIndexPath(const std::string& source) {
  std::string base;
  if (const char* state = std::getenv("XDG_STATE_HOME"); state != nullptr && state[0] == '/') {
    base = state;
  } else if (const char* home = std::getenv("HOME"); home != nullptr && home[0] == '/') {
    base = std::string(home) + "/.local/state";
  } else {
    base = "/tmp";
  }
  char name[64];
  std::snprintf(name, sizeof(name), "/ckptfs/index-%016llx.sqlite",
                static_cast<unsigned long long>(core::Fnv1a(source)));
  return base + name;
}

Index::Index(std::string source, std::unique_ptr<Db> db, std::unique_ptr<Db> scan_db)
    : source_(std::move(source)), scan_db_(std::move(scan_db)), db_(std::move(db)) {}

Index::~Index() = default;

Result<std::unique_ptr<Index>> Index::Open(const std::string& source, const std::string& db_path) {
  const size_t slash = db_path.rfind('/');
  if (slash != std::string::npos && slash > 0) {
    if (Status s = core::MakeDirs(db_path.substr(0, slash)); !s.ok()) return s;
  }
  Result<std::unique_ptr<Db>> db = OpenChecked(source, db_path);
  if (!db.ok()) {
    // The index is only a cache: start over from the disk.
    RemoveDbFiles(db_path);
    db = OpenChecked(source, db_path);
    if (!db.ok()) return db.status();
  }
  Result<std::unique_ptr<Db>> scan_db = Db::Open(db_path);
  if (!scan_db.ok()) return scan_db.status();
  if (Status s = (*scan_db)->Exec("PRAGMA synchronous=NORMAL; PRAGMA foreign_keys=ON;"
                                  " PRAGMA cache_size=-65536;");
      !s.ok()) {
    return s;
  }
  return std::unique_ptr<Index>(new Index(source, std::move(*db), std::move(*scan_db)));
}

Result<ScanStats> Index::Scan() {
  std::lock_guard<std::mutex> lock(scan_mu_);
  return ScanTree(scan_db_.get(), source_);
}

Result<ScanStats> Index::ScanChanges(
    const std::vector<std::pair<std::string, std::string>>& changes) {
  std::lock_guard<std::mutex> lock(scan_mu_);
  std::set<std::string> targets;
  for (const auto& [dir, name] : changes) {
    bool in_checkpoint = false;
    {
      Result<Stmt> st = scan_db_->Prepare("SELECT is_checkpoint FROM dirs WHERE path = ?");
      if (!st.ok()) return st.status();
      st->Bind(1, dir);
      Result<bool> row = st->Next();
      if (!row.ok()) return row.status();
      in_checkpoint = *row && st->Int(0) != 0;
    }
    targets.insert(in_checkpoint || name.empty() ? dir : dir + "/" + name);
  }
  // A target below another target is covered by it.
  std::vector<std::string> roots;
  for (const std::string& t : targets) {
    bool covered = false;
    for (const std::string& r : targets) covered = covered || t.rfind(r + "/", 0) == 0;
    if (!covered) roots.push_back(t);
  }
  return ScanTargets(scan_db_.get(), source_, roots);
}

Result<std::vector<std::string>> Index::Dirs() {
  std::lock_guard<std::mutex> lock(mu_);
  return CollectTexts(db_.get(), "SELECT path FROM dirs", {});
}

Result<Checkpoint> Index::LoadRow(int64_t id) {
  Result<Stmt> st = db_->Prepare(std::string("SELECT ") + kCheckpointColumns +
                                 " FROM checkpoints c WHERE c.id = ?");
  if (!st.ok()) return st.status();
  st->Bind(1, id);
  Result<bool> row = st->Next();
  if (!row.ok()) return row.status();
  if (!*row) return Status::NotFound("checkpoint row " + std::to_string(id));
  Checkpoint c = RowToCheckpoint(*st);
  Result<Stmt> meta =
      db_->Prepare("SELECT key, type, num, str FROM meta WHERE ckpt_id = ? ORDER BY pos");
  if (!meta.ok()) return meta.status();
  meta->Bind(1, id);
  for (;;) {
    Result<bool> r = meta->Next();
    if (!r.ok()) return r.status();
    if (!*r) break;
    auto type = static_cast<core::MetaType>(meta->Int(1));
    core::MetaValue v;
    if (type == core::MetaType::kString) {
      v = core::MetaValue::String(meta->Text(3));
    } else if (type == core::MetaType::kBool) {
      v = core::MetaValue::Bool(meta->Double(2) != 0);
    } else {
      v = core::MetaValue::Number(meta->IsNull(2) ? std::nan("") : meta->Double(2));
    }
    c.meta.entries.emplace_back(meta->Text(0), std::move(v));
  }
  Result<Stmt> files =
      db_->Prepare("SELECT name, size, mtime_ns FROM files WHERE ckpt_id = ? ORDER BY name");
  if (!files.ok()) return files.status();
  files->Bind(1, id);
  for (;;) {
    Result<bool> r = files->Next();
    if (!r.ok()) return r.status();
    if (!*r) break;
    c.files.push_back({files->Text(0), files->Int(1), files->Int(2)});
  }
  return c;
}

Result<std::vector<Checkpoint>> Index::List(const std::string& scope) {
  std::lock_guard<std::mutex> lock(mu_);
  ReadSnapshot snapshot(db_.get());
  if (!snapshot.status().ok()) return snapshot.status();
  std::string sql = std::string("SELECT c.id FROM checkpoints c WHERE 1") + kScopeSql +
                    " ORDER BY " + kNewestFirst;
  Result<std::vector<int64_t>> ids = CollectIds(db_.get(), sql, ScopeBinds(scope));
  if (!ids.ok()) return ids.status();
  std::vector<Checkpoint> out;
  out.reserve(ids->size());
  for (int64_t id : *ids) {
    Result<Checkpoint> c = LoadRow(id);
    if (!c.ok()) return c.status();
    out.push_back(std::move(*c));
  }
  return out;
}

Result<std::vector<Checkpoint>> Index::Select(const std::string& scope,
                                              const std::vector<core::Predicate>& where,
                                              bool ranked, core::Order order,
                                              const std::string& key, int limit, int offset) {
  std::lock_guard<std::mutex> lock(mu_);
  ReadSnapshot snapshot(db_.get());
  if (!snapshot.status().ok()) return snapshot.status();
  std::vector<Bound> binds;
  std::string sql;
  if (ranked) {
    // Driven by the (key, type, num) index: an ordered walk that stops at LIMIT.
    sql =
        "SELECT c.id FROM meta m JOIN checkpoints c ON c.id = m.ckpt_id"
        " WHERE m.key = ? AND m.type = 0 AND m.num IS NOT NULL AND c.valid = 1";
    binds.push_back({false, key, 0});
  } else {
    sql = "SELECT c.id FROM checkpoints c WHERE c.valid = 1";
  }
  sql += kScopeSql;
  for (Bound& b : ScopeBinds(scope)) binds.push_back(std::move(b));
  AddWhere(where, &sql, &binds);
  sql += " ORDER BY ";
  if (ranked) sql += order == core::Order::kMin ? "m.num ASC, " : "m.num DESC, ";
  sql += kNewestFirst;
  sql += " LIMIT ? OFFSET ?";
  binds.push_back({true, "", static_cast<double>(limit)});
  binds.push_back({true, "", static_cast<double>(offset)});
  Result<std::vector<int64_t>> ids = CollectIds(db_.get(), sql, binds);
  if (!ids.ok()) return ids.status();
  std::vector<Checkpoint> out;
  for (int64_t id : *ids) {
    Result<Checkpoint> c = LoadRow(id);
    if (!c.ok()) return c.status();
    out.push_back(std::move(*c));
  }
  return out;
}

Result<std::vector<std::string>> Index::NumericKeys(const std::string& scope,
                                                    const std::vector<core::Predicate>& where,
                                                    int min_count) {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<Bound> binds;
  std::string sql =
      "SELECT m.key FROM meta m JOIN checkpoints c ON c.id = m.ckpt_id"
      " WHERE m.type = 0 AND m.num IS NOT NULL AND c.valid = 1";
  sql += kScopeSql;
  binds = ScopeBinds(scope);
  AddWhere(where, &sql, &binds);
  sql += " GROUP BY m.key HAVING COUNT(*) >= ? ORDER BY m.key";
  binds.push_back({true, "", static_cast<double>(min_count)});
  return CollectTexts(db_.get(), sql, binds);
}

bool Index::IsExperiment(const std::string& dir) {
  std::lock_guard<std::mutex> lock(mu_);
  Result<Stmt> st = db_->Prepare("SELECT 1 FROM checkpoints WHERE experiment = ? LIMIT 1");
  if (!st.ok()) return false;
  st->Bind(1, dir);
  Result<bool> r = st->Next();
  return r.ok() && *r;
}

Result<Checkpoint> Index::Find(const std::string& path) {
  std::lock_guard<std::mutex> lock(mu_);
  ReadSnapshot snapshot(db_.get());
  if (!snapshot.status().ok()) return snapshot.status();
  Result<std::vector<int64_t>> ids =
      CollectIds(db_.get(), "SELECT id FROM checkpoints c WHERE c.path = ?", {{false, path, 0}});
  if (!ids.ok()) return ids.status();
  if (ids->empty()) return Status::NotFound(path + ": not an indexed checkpoint");
  return LoadRow(ids->front());
}

Result<IndexCounts> Index::Counts() {
  std::lock_guard<std::mutex> lock(mu_);
  Result<Stmt> st = db_->Prepare(
      "SELECT (SELECT COUNT(*) FROM checkpoints), (SELECT COUNT(*) FROM checkpoints WHERE valid = "
      "0),"
      " (SELECT COUNT(DISTINCT experiment) FROM checkpoints), (SELECT COUNT(*) FROM files),"
      " (SELECT COALESCE(SUM(size), 0) FROM files)");
  if (!st.ok()) return st.status();
  Result<bool> row = st->Next();
  if (!row.ok()) return row.status();
  IndexCounts c;
  if (*row) {
    c.checkpoints = st->Int(0), c.invalid = st->Int(1), c.experiments = st->Int(2);
    c.files = st->Int(3), c.bytes = st->Int(4);
  }
  return c;
}

}  // namespace ckptfs::index
