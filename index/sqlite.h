// A minimal RAII layer over SQLite for the index: a connection, cached
// prepared statements with bound parameters only, and transactions that roll
// back in their destructor. Internal to index/; sqlite3.h stays in the .cc.
//
// Not thread-safe: the owner (Index) serialises all use behind its mutex.
#ifndef CKPTFS_INDEX_SQLITE_H_
#define CKPTFS_INDEX_SQLITE_H_

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include "core/status.h"

struct sqlite3;
struct sqlite3_stmt;

namespace ckptfs::index {

class Db;

// One use of a cached statement: bind, step, read columns. Resets and clears
// bindings when destroyed so the cached statement is ready for its next use.
class Stmt {
 public:
  Stmt(Db* db, sqlite3_stmt* stmt) : db_(db), stmt_(stmt) {}
  Stmt(Stmt&& o) noexcept : db_(o.db_), stmt_(o.stmt_) { o.stmt_ = nullptr; }
  Stmt(const Stmt&) = delete;
  Stmt& operator=(const Stmt&) = delete;
  ~Stmt();

  // Parameters are 1-based, as in SQLite.
  Stmt& Bind(int i, std::string_view text);
  Stmt& Bind(int i, int64_t v);
  Stmt& Bind(int i, double v);
  Stmt& BindNull(int i);

  // true: a row is ready; false: done. Errors become a Status via Run/Next.
  core::Result<bool> Next();
  core::Status Run();  // steps to completion, for statements without rows

  std::string Text(int col) const;
  int64_t Int(int col) const;
  double Double(int col) const;
  bool IsNull(int col) const;

 private:
  Db* db_;
  sqlite3_stmt* stmt_;
};

class Db {
 public:
  // Opens or creates the database file; kCorrupt if it is not a database.
  static core::Result<std::unique_ptr<Db>> Open(const std::string& path);
  ~Db();

  core::Status Exec(const std::string& sql);  // for schema and pragmas only
  core::Result<Stmt> Prepare(const std::string& sql);  // cached by text
  int64_t LastInsertId() const;
  std::string ErrorMessage() const;
  const std::string& path() const { return path_; }

 private:
  Db(sqlite3* db, std::string path) : db_(db), path_(std::move(path)) {}
  sqlite3* db_;
  std::string path_;
  std::map<std::string, sqlite3_stmt*, std::less<>> cache_;
};

// BEGIN IMMEDIATE on construction; Commit() makes it permanent; otherwise the
// destructor rolls back. Never throws.
class Transaction {
 public:
  explicit Transaction(Db* db);
  ~Transaction();
  Transaction(const Transaction&) = delete;
  Transaction& operator=(const Transaction&) = delete;
  const core::Status& status() const { return status_; }
  core::Status Commit();

 private:
  Db* db_;
  core::Status status_;
  bool open_ = false;
};

}  // namespace ckptfs::index

#endif  // CKPTFS_INDEX_SQLITE_H_
