#include "core/log.h"

#include <syslog.h>
#include <unistd.h>

#include <atomic>
#include <cstdarg>
#include <cstdio>
#include <ctime>

namespace ckptfs::core {
namespace {

std::atomic<int> g_level{static_cast<int>(LogLevel::kInfo)};
std::atomic<bool> g_syslog{false};

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

void LogToSyslog(bool enable) {
  if (enable) ::openlog("ckptfs", LOG_PID, LOG_DAEMON);
  g_syslog = enable;
}

void Log(LogLevel level, const char* format, ...) {
  if (static_cast<int>(level) < g_level) return;
  char msg[4096];
  va_list ap;
  va_start(ap, format);
  std::vsnprintf(msg, sizeof(msg), format, ap);
  va_end(ap);
  if (g_syslog) {
    static const int kPriority[] = {LOG_DEBUG, LOG_INFO, LOG_WARNING, LOG_ERR};
    ::syslog(kPriority[static_cast<int>(level)], "%s", msg);
    return;
  }
  char line[4200];
  int n = std::snprintf(line, sizeof(line), "ckptfs[%d]: %s: %s\n", static_cast<int>(::getpid()),
                        Name(level), msg);
  if (n > 0) {
    ssize_t ignored = ::write(STDERR_FILENO, line, static_cast<size_t>(n) < sizeof(line) ? n : sizeof(line) - 1);
    (void)ignored;
  }
}

}  // namespace ckptfs::core
