// Status and Result<T>: how core and index report failure.
//
// A Status carries a code and a message that names the file, key or tensor
// concerned. errno enters once (Status::FromErrno) and leaves once
// (fs::ToErrno). Values are immutable and cheap to copy; thread-compatible.
//
// CatchAll is the wall at every C boundary and thread loop (STYLE.md): what
// a FUSE callback's or a thread's work throws (std::exception, nlohmann's
// errors, std::bad_alloc, anything) becomes a Status there, never
// std::terminate. fs/fuse_ops.h builds the FUSE wall on it, core/log.h the
// thread loops' CatchAndLog.
#ifndef CKPTFS_CORE_STATUS_H_
#define CKPTFS_CORE_STATUS_H_

#include <cerrno>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <variant>

namespace ckptfs::core {

enum class StatusCode {
  kOk = 0,
  kNotFound,         // nothing matches (ENOENT)
  kInvalidArgument,  // malformed query path or option (EINVAL)
  kCorrupt,          // unparseable meta, index or tensor file (EIO)
  kIoError,          // the operating system refused (errno kept)
  kUnsupported,      // a format or feature we do not handle (ENOTSUP)
  kExists,           // target name already taken (EEXIST)
  kPermission,       // forbidden (EACCES, or the errno kept: EROFS, EPERM)
};

class Status {
 public:
  Status() = default;
  static Status Ok() { return Status(); }
  static Status NotFound(std::string msg) { return {StatusCode::kNotFound, std::move(msg)}; }
  static Status InvalidArgument(std::string msg) {
    return {StatusCode::kInvalidArgument, std::move(msg)};
  }
  static Status Corrupt(std::string msg) { return {StatusCode::kCorrupt, std::move(msg)}; }
  static Status Unsupported(std::string msg) { return {StatusCode::kUnsupported, std::move(msg)}; }
  static Status Exists(std::string msg) { return {StatusCode::kExists, std::move(msg)}; }
  // Refused to this caller: EACCES unless err says otherwise (EPERM).
  static Status Permission(std::string msg, int err = EACCES) {
    Status s(StatusCode::kPermission, std::move(msg));
    s.errno_ = err;
    return s;
  }
  // Refused to everyone because the place is read-only: kPermission, EROFS.
  static Status ReadOnly(std::string msg) { return Permission(std::move(msg), EROFS); }
  // "context: strerror(err)", keeping err for ToErrno.
  static Status FromErrno(const std::string& context, int err);
  // A failure that is nobody's input: an exception caught at a wall, a
  // broken invariant. kIoError with errno EIO.
  static Status Internal(std::string msg);
  // Only inside a catch block: the exception being handled, as Internal
  // "context: what()" ("context: unknown exception" for a non-std one).
  // Never throws: when even the message cannot be built (out of memory),
  // the Status has an empty message.
  static Status FromException(const char* context) noexcept;

  bool ok() const { return code_ == StatusCode::kOk; }
  StatusCode code() const { return code_; }
  int sys_errno() const { return errno_; }
  const std::string& message() const { return message_; }
  std::string ToString() const;

 private:
  Status(StatusCode code, std::string msg) : code_(code), message_(std::move(msg)) {}
  StatusCode code_ = StatusCode::kOk;
  int errno_ = 0;
  std::string message_;
};

// Either a value or a non-ok Status.
template <typename T>
class Result {
 public:
  Result(T v) : v_(std::move(v)) {}                 // NOLINT(google-explicit-constructor)
  Result(Status status) : v_(std::move(status)) {}  // NOLINT(google-explicit-constructor)

  bool ok() const { return std::holds_alternative<T>(v_); }
  const Status& status() const {
    static const Status kOkStatus;
    return ok() ? kOkStatus : std::get<Status>(v_);
  }
  T& value() & { return std::get<T>(v_); }
  const T& value() const& { return std::get<T>(v_); }
  T&& value() && { return std::get<T>(std::move(v_)); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  T& operator*() { return value(); }
  const T& operator*() const { return value(); }

 private:
  std::variant<T, Status> v_;
};

// Runs fn() and returns Ok, or what it threw as Status::FromException(context).
template <typename Fn>
Status CatchAll(const char* context, Fn&& fn) noexcept {
  static_assert(std::is_invocable_v<Fn&>, "CatchAll runs fn()");
  try {
    fn();
    return Status::Ok();
  } catch (...) {
    return Status::FromException(context);
  }
}

}  // namespace ckptfs::core

#endif  // CKPTFS_CORE_STATUS_H_
