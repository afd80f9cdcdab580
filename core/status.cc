#include "core/status.h"

#include <cerrno>
#include <cstring>
#include <exception>
#include <new>

namespace ckptfs::core {

Status Status::FromErrno(const std::string& context, int err) {
  Status s(StatusCode::kIoError, context + ": " + std::strerror(err));
  s.errno_ = err;
  return s;
}

Status Status::Internal(std::string msg) {
  Status s(StatusCode::kIoError, std::move(msg));
  s.errno_ = EIO;
  return s;
}

Status Status::FromException(const char* context) noexcept {
  try {
    try {
      throw;
    } catch (const std::bad_alloc& e) {
      return Internal(std::string(context) + ": out of memory (" + e.what() + ")");
    } catch (const std::exception& e) {
      return Internal(std::string(context) + ": " + e.what());
    } catch (...) {
      return Internal(std::string(context) + ": unknown exception");
    }
  } catch (...) {
    Status s;  // an empty message allocates nothing
    s.code_ = StatusCode::kIoError;
    s.errno_ = EIO;
    return s;
  }
}

std::string Status::ToString() const { return ok() ? std::string("OK") : message_; }

}  // namespace ckptfs::core
