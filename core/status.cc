#include "core/status.h"

#include <cstring>

namespace ckptfs::core {

Status Status::FromErrno(const std::string& context, int err) {
  Status s(StatusCode::kIoError, context + ": " + std::strerror(err));
  s.errno_ = err;
  return s;
}

std::string Status::ToString() const { return ok() ? std::string("OK") : message_; }

}  // namespace ckptfs::core
