#include "core/cancel.h"

#include <cerrno>
#include <mutex>

namespace ckptfs::core {
namespace {

std::mutex g_mu;  // guards the check; polled once per chunk, so never contended for long
CancelCheck g_check = nullptr;
void* g_arg = nullptr;

}  // namespace

void SetCancelCheck(CancelCheck check, void* arg) {
  std::lock_guard<std::mutex> lock(g_mu);
  g_check = check;
  g_arg = arg;
}

bool CancelRequested() {
  std::lock_guard<std::mutex> lock(g_mu);
  return g_check != nullptr && g_check(g_arg);
}

Status CancelledStatus(const std::string& what) {
  return Status::FromErrno(what + ": cancelled (ckptfs is stopping)", ECANCELED);
}

}  // namespace ckptfs::core
