#include "core/log.h"

#include <sys/stat.h>
#include <syslog.h>
#include <unistd.h>

#include <atomic>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <ctime>

namespace ckptfs::core {
namespace {

std::atomic<int> g_level{static_cast<int>(LogLevel::kInfo)};
std::atomic<bool> g_syslog{false};
std::atomic<LogObserver> g_observer{nullptr};
std::atomic<void*> g_observer_context{nullptr};

// Whether stderr is the stream systemd connected to the journal.
bool StderrIsJournal() {
  const char* stream = std::getenv("JOURNAL_STREAM");
  if (stream == nullptr) return false;
  unsigned long long dev = 0, ino = 0;
  if (std::sscanf(stream, "%llu:%llu", &dev, &ino) != 2) return false;
  struct stat st {};
  return ::fstat(STDERR_FILENO, &st) == 0 && st.st_dev == dev && st.st_ino == ino;
}

const char* Name(LogLevel level) {
  switch (level) {
    case LogLevel::kDebug:
      return "debug";
    case LogLevel::kInfo:
      return "info";
    case LogLevel::kWarning:
      return "warning";
    case LogLevel::kError:
      return "error";
  }
  return "?";
}

}  // namespace

void SetLogLevel(LogLevel level) { g_level = static_cast<int>(level); }

void SetErrorObserver(LogObserver observer, void* context) {
  g_observer = nullptr;  // never an observer paired with another's context
  g_observer_context = context;
  g_observer = observer;
}

void LogToSyslog(bool enable) {
  if (enable) ::openlog("ckptfs", LOG_PID, LOG_DAEMON);
  g_syslog = enable;
}

void Log(LogLevel level, const char* format, ...) noexcept {
  if (static_cast<int>(level) < g_level) return;
  char msg[4096];
  va_list ap;
  va_start(ap, format);
  std::vsnprintf(msg, sizeof(msg), format, ap);
  va_end(ap);
  if (level == LogLevel::kError) {
    if (LogObserver observer = g_observer.load(); observer != nullptr) {
      try {
        observer(g_observer_context, msg);
      } catch (...) {  // a status report that could not grow: the line still goes out
      }
    }
  }
  static const int kPriority[] = {LOG_DEBUG, LOG_INFO, LOG_WARNING, LOG_ERR};
  const int priority = kPriority[static_cast<int>(level)];
  if (g_syslog) {
    ::syslog(priority, "%s", msg);
    return;
  }
  static const bool journal = StderrIsJournal();
  char line[4200];
  int n = journal ? std::snprintf(line, sizeof(line), "<%d>%s: %s\n", priority, Name(level), msg)
                  : std::snprintf(line, sizeof(line), "ckptfs[%d]: %s: %s\n",
                                  static_cast<int>(::getpid()), Name(level), msg);
  if (n > 0) {
    ssize_t ignored =
        ::write(STDERR_FILENO, line, static_cast<size_t>(n) < sizeof(line) ? n : sizeof(line) - 1);
    (void)ignored;
  }
}

}  // namespace ckptfs::core
