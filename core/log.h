// Logging: one line per event, "ckptfs[pid]: LEVEL message", to stderr (the
// foreground and systemd/journald) or to syslog once the daemon detached.
// When stderr is the journal (systemd's JOURNAL_STREAM), lines carry their
// syslog priority as a "<N>" prefix, so `journalctl -p warning` filters them.
// Thread-safe; a line is written with one call so lines never interleave.
#ifndef CKPTFS_CORE_LOG_H_
#define CKPTFS_CORE_LOG_H_

#include "core/status.h"

namespace ckptfs::core {

enum class LogLevel { kDebug = 0, kInfo = 1, kWarning = 2, kError = 3 };

void SetLogLevel(LogLevel level);
void LogToSyslog(bool enable);
// Never throws (an observer that throws is ignored).
void Log(LogLevel level, const char* format, ...) noexcept __attribute__((format(printf, 2, 3)));

// Called with every error line that is logged (after the level filter), on
// the logging thread; for status reports. nullptr: none.
using LogObserver = void (*)(void* context, const char* message);
void SetErrorObserver(LogObserver observer, void* context);

// The wall of a thread loop (or of a callback it runs): runs fn(); whatever
// fn throws is logged as an error naming `where` and the exception, and goes
// no further. Returns whether fn returned normally.
template <typename Fn>
bool CatchAndLog(const char* where, Fn&& fn) noexcept {
  const Status s = CatchAll(where, fn);
  if (s.ok()) return true;
  Log(LogLevel::kError, "%s", s.message().empty() ? where : s.message().c_str());
  return false;
}

}  // namespace ckptfs::core

#endif  // CKPTFS_CORE_LOG_H_
