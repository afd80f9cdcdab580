// The scanner: walks a source tree and brings the index's rows in line with
// the disk, mark-and-sweep. Internal to index/ (Index::Scan is the API).
//
// A directory whose mtime is unchanged is not listed again: its children are
// taken from the index and only stat'ed. A checkpoint whose stamp (mtimes and
// sizes of its directory and meta file) is unchanged is not re-read. Rows for
// anything not reached by the walk are removed. Hidden entries (".name") and
// symbolic links to directories are not followed.
#ifndef CKPTFS_INDEX_SCANNER_H_
#define CKPTFS_INDEX_SCANNER_H_

#include <string>
#include <vector>

#include "core/checkpoint.h"
#include "core/status.h"
#include "index/index.h"
#include "index/sqlite.h"

namespace ckptfs::index {

// Runs one scan inside one transaction. The caller holds the Index mutex.
core::Result<ScanStats> ScanTree(Db* db, const std::string& source);

// Runs a targeted scan of the given absolute paths (files or directories,
// existing or not) and of nothing else, in one transaction.
core::Result<ScanStats> ScanTargets(Db* db, const std::string& source,
                                    const std::vector<std::string>& targets);

// Writes (insert or replace) one checkpoint's rows. Used by the scanner and
// by tests that build an index from Checkpoint values.
core::Status WriteCheckpoint(Db* db, const core::Checkpoint& c);

}  // namespace ckptfs::index

#endif  // CKPTFS_INDEX_SCANNER_H_
