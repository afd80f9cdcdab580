#include "core/averaging.h"

#include <dlfcn.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <mutex>
#include <new>
#include <random>
#include <system_error>
#include <thread>

#include "core/cancel.h"
#include "core/safetensors.h"
#include "core/tensor_io.h"

namespace ckptfs::core {

namespace {
constexpr size_t kOutputBuffer = 4 << 20;

bool EndsWith(const std::string& s, const char* suffix) {
  const size_t n = std::strlen(suffix);
  return s.size() >= n && s.compare(s.size() - n, n, suffix) == 0;
}

Status CopyFile(const std::string& from, OutputFile* out) {
  int fd = ::open(from.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return Status::FromErrno(from, errno);
  std::vector<char> buf(1 << 20);
  for (;;) {
    ssize_t n = ::read(fd, buf.data(), buf.size());
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      int err = errno;
      ::close(fd);
      return Status::FromErrno(from, err);
    }
    if (n == 0) break;
    out->Write(buf.data(), static_cast<size_t>(n));
  }
  ::close(fd);
  return out->status();
}

}  // namespace

Status PreloadAveraging() { return Status::Ok(); }

Result<AverageResult> AverageTorchZip(const std::vector<std::string>& members, OutputFile* out,
                                      const ProgressFn& progress) {
  try {
    return AverageTorchZipFiles(members, out, progress);
  } catch (const std::bad_alloc&) {
    return Status::FromErrno("averaging " + members.front(), ENOMEM);
  } catch (const std::exception& e) {
    return Status::Corrupt("averaging " + members.front() + " failed: " + e.what());
  }
}

unsigned AverageThreads(size_t count) {
  const unsigned hardware = std::max(1u, std::thread::hardware_concurrency());
  return static_cast<unsigned>(
      std::max<size_t>(1, std::min<size_t>({hardware, kMaxAverageThreads, count})));
}

Status RunInParallel(size_t count, const std::function<Status(size_t)>& fn,
                     const std::function<void()>& after) {
  const unsigned threads = AverageThreads(count);
  std::atomic<size_t> next{0};
  std::atomic<bool> failed{false};
  std::mutex mu;
  Status first;
  auto work = [&](bool caller, bool once) {
    for (;;) {
      const size_t i = next.fetch_add(1);
      if (i >= count || failed.load()) return;
      Status s;
      try {
        s = fn(i);
      } catch (const std::bad_alloc&) {
        s = Status::FromErrno("averaging", ENOMEM);
      } catch (const std::exception& e) {
        s = Status::Corrupt(std::string("averaging: ") + e.what());
      }
      if (!s.ok()) {
        std::lock_guard<std::mutex> lock(mu);
        if (!failed.exchange(true)) first = s;
        return;
      }
      if (caller && after) after();
      if (once) return;
    }
  };
  // The first item alone, on the calling thread, and its report: the
  // others start after it (a caller's progress report comes between reads).
  work(true, true);
  std::vector<std::thread> pool;
  for (unsigned t = 1; t < threads && !failed.load(); ++t) {
    try {
      pool.emplace_back(work, false, false);
    } catch (const std::system_error&) {
      break;  // fewer threads: the work still gets done
    }
  }
  work(true, false);
  for (std::thread& t : pool) t.join();
  return first;
}

OutputFile::OutputFile(std::string path) : path_(std::move(path)), buf_(kOutputBuffer) {
  fd_ = ::open(path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd_ < 0) status_ = Status::FromErrno(path_, errno);
}

OutputFile::~OutputFile() {
  if (fd_ >= 0) ::close(fd_);
}

void OutputFile::Flush() {
  size_t off = 0;
  while (status_.ok() && off < used_) {
    ssize_t n = ::write(fd_, buf_.data() + off, used_ - off);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      status_ = Status::FromErrno(path_, errno);
      break;
    }
    off += static_cast<size_t>(n);
  }
  used_ = 0;
}

size_t OutputFile::Write(const void* data, size_t n) {
  if (!status_.ok()) return 0;
  const char* p = static_cast<const char*>(data);
  size_t left = n;
  while (left > 0) {
    if (used_ == buf_.size()) Flush();
    if (!status_.ok()) return 0;
    const size_t take = std::min(left, buf_.size() - used_);
    std::memcpy(buf_.data() + used_, p, take);
    used_ += take, p += take, left -= take;
  }
  return n;
}

Status OutputFile::WriteAt(uint64_t offset, const void* data, size_t n) const {
  if (!status_.ok()) return status_;
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    const ssize_t w = ::pwrite(fd_, p, n, static_cast<off_t>(offset));
    if (w < 0 && errno == EINTR) continue;
    if (w < 0) return Status::FromErrno(path_, errno);
    if (w == 0) return Status::FromErrno(path_, ENOSPC);
    p += w, n -= static_cast<size_t>(w), offset += static_cast<uint64_t>(w);
  }
  return Status::Ok();
}

Status OutputFile::Finish() {
  Flush();
  if (::close(fd_) != 0 && status_.ok()) status_ = Status::FromErrno(path_, errno);
  fd_ = -1;
  return status_;
}

Status WriteAndRename(const std::string& out_path, const std::string& what,
                      const std::function<Status(OutputFile*)>& write, const ProgressFn& progress,
                      const std::function<int64_t()>& bytes) {
  std::mt19937_64 rng(std::random_device{}());
  char suffix[32];
  std::snprintf(suffix, sizeof(suffix), ".tmp-%016llx", static_cast<unsigned long long>(rng()));
  const std::string tmp = out_path + suffix;
  Status status;
  {
    OutputFile out(tmp);
    if (!out.status().ok()) return out.status();
    try {
      status = write(&out);
    } catch (const std::bad_alloc&) {
      status = Status::FromErrno(what, ENOMEM);
    } catch (const std::exception& e) {
      status = Status::Corrupt(what + ": " + e.what());
    }
    if (status.ok()) status = out.Finish();
  }
  if (!status.ok()) {
    ::unlink(tmp.c_str());
    return status;
  }
  if (::rename(tmp.c_str(), out_path.c_str()) != 0) {
    status = Status::FromErrno("rename to " + out_path, errno);
    ::unlink(tmp.c_str());
    return status;
  }
  if (progress) progress({"done", bytes(), bytes()});
  return Status::Ok();
}

const char* TensorFormatName(TensorFormat f) {
  switch (f) {
    case TensorFormat::kTorchZip:
      return "torch zip";
    case TensorFormat::kSafetensors:
      return "safetensors";
    case TensorFormat::kTorchLegacy:
      return "legacy torch";
    case TensorFormat::kJsonIndex:
      return "shard index";
    case TensorFormat::kUnknown:
      return "unknown";
  }
  return "unknown";
}

Result<TensorFormat> DetectFormat(const std::string& path) {
  if (EndsWith(path, ".index.json")) return TensorFormat::kJsonIndex;
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return Status::FromErrno(path, errno);
  unsigned char head[9] = {};
  ssize_t n = ::pread(fd, head, sizeof(head), 0);
  ::close(fd);
  if (n < 0) return Status::FromErrno(path, errno);
  if (n >= 4 && std::memcmp(head, "PK\x03\x04", 4) == 0) return TensorFormat::kTorchZip;
  if (n >= 4 && head[0] == 0x80 && head[1] == 0x02 && head[2] == 0x8a && head[3] == 0x0a) {
    return TensorFormat::kTorchLegacy;
  }
  if (n == 9 && head[8] == '{') return TensorFormat::kSafetensors;
  return TensorFormat::kUnknown;
}

Status CheckTensorFileComplete(const std::string& path) {
  Result<TensorFormat> format = DetectFormat(path);
  if (!format.ok()) return format.status();
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return Status::FromErrno(path, errno);
  struct stat st {};
  ::fstat(fd, &st);
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  Status result;
  if (*format == TensorFormat::kTorchZip) {
    // The end-of-central-directory record sits in the last 64 KiB + 22 bytes.
    const size_t tail = static_cast<size_t>(std::min<uint64_t>(size, 65557));
    std::vector<char> buf(tail);
    if (::pread(fd, buf.data(), tail, static_cast<off_t>(size - tail)) !=
        static_cast<ssize_t>(tail)) {
      result = Status::FromErrno(path, errno);
    } else {
      bool found = false;
      for (size_t i = tail >= 22 ? tail - 22 + 1 : 0; i-- > 0;) {
        if (std::memcmp(buf.data() + i, "PK\x05\x06", 4) == 0) {
          found = true;
          break;
        }
      }
      if (!found)
        result =
            Status::Corrupt(path + ": zip file ends before its central directory (incomplete)");
    }
  } else if (*format == TensorFormat::kSafetensors) {
    unsigned char len[8];
    if (::pread(fd, len, 8, 0) != 8) {
      result = Status::Corrupt(path + ": incomplete safetensors header");
    } else {
      uint64_t n = 0;
      for (int b = 7; b >= 0; --b) n = (n << 8) | len[b];
      std::string json(static_cast<size_t>(std::min<uint64_t>(n, kMaxSafetensorsHeader)), '\0');
      if (n > kMaxSafetensorsHeader || 8 + n > size ||
          ::pread(fd, json.data(), json.size(), 8) != static_cast<ssize_t>(json.size())) {
        result = Status::Corrupt(path + ": incomplete safetensors header");
      } else {
        Result<SafetensorsHeader> h = ParseSafetensorsHeader(json, n, size, path);
        if (!h.ok()) result = h.status();
      }
    }
  }
  ::close(fd);
  return result;
}

Result<AverageResult> AverageFiles(const std::vector<std::string>& members,
                                   const std::string& out_path, const ProgressFn& progress) {
  if (members.empty()) return Status::InvalidArgument(out_path + ": an average needs members");
  Result<TensorFormat> format = DetectFormat(members[0]);
  if (!format.ok()) return format.status();
  for (size_t i = 1; i < members.size(); ++i) {
    Result<TensorFormat> f = DetectFormat(members[i]);
    if (!f.ok()) return f.status();
    if (*f != *format) {
      return Status::Corrupt(members[i] + ": is " + TensorFormatName(*f) + ", the newest member " +
                             members[0] + " is " + TensorFormatName(*format));
    }
  }
  if (*format == TensorFormat::kTorchLegacy) {
    return Status::Unsupported(members[0] +
                               ": legacy (pre-1.6) torch.save format is not supported; "
                               "re-save it with a current torch.save");
  }
  if (*format == TensorFormat::kUnknown) {
    return Status::Corrupt(members[0] + ": not a PyTorch zip or safetensors file");
  }
  Result<AverageResult> result = AverageResult{};
  Status written = WriteAndRename(
      out_path, "averaging " + members[0],
      [&](OutputFile* out) -> Status {
        switch (*format) {
          case TensorFormat::kTorchZip:
            result = AverageTorchZip(members, out, progress);
            break;
          case TensorFormat::kSafetensors:
            result = AverageSafetensors(members, out, progress);
            break;
          default: {
            Status s = CopyFile(members[0], out);
            if (s.ok()) {
              AverageResult copied;
              copied.format = *format;
              result = copied;
            } else {
              result = s;
            }
            break;
          }
        }
        return result.status();
      },
      progress, [&] { return result.ok() ? result->bytes : 0; });
  if (!written.ok()) return written;
  return result;
}

}  // namespace ckptfs::core
