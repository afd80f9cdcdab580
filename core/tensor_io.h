// Internal to core's tensor code: the per-format averaging steps and the
// buffered output file they write through.
#ifndef CKPTFS_CORE_TENSOR_IO_H_
#define CKPTFS_CORE_TENSOR_IO_H_

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "core/averaging.h"
#include "core/status.h"

namespace ckptfs::core {

// An output file written through a buffer: Write never fails silently; the
// first error is kept and returned by Finish, which closes. No fsync: an
// average is a cache entry, and AverageCache records it complete (size and
// checksum) only after it is written, so a torn file is recomputed, never
// served.
//
// WriteAt writes at an offset (pwrite, unbuffered), and may be called from
// several threads at once; it must not be mixed with Write on one file.
class OutputFile {
 public:
  explicit OutputFile(std::string path);
  ~OutputFile();  // closes (and leaves the file) if Finish was not called
  OutputFile(const OutputFile&) = delete;
  OutputFile& operator=(const OutputFile&) = delete;

  const Status& status() const { return status_; }
  size_t Write(const void* data, size_t n);  // returns n, or 0 after an error
  Status WriteAt(uint64_t offset, const void* data, size_t n) const;
  Status Finish();

 private:
  void Flush();
  std::string path_;
  int fd_ = -1;
  std::vector<char> buf_;
  size_t used_ = 0;
  Status status_;
};

// Writes a result file in one step: `write` fills an OutputFile on a
// temporary name beside out_path, which is renamed to out_path only when
// write and Finish succeeded; on any failure (an exception of write too,
// std::bad_alloc as ENOMEM, naming `what`) the temporary file is removed.
// Reports "done" with `bytes` of the result.
Status WriteAndRename(const std::string& out_path, const std::string& what,
                      const std::function<Status(OutputFile*)>& write, const ProgressFn& progress,
                      const std::function<int64_t()>& bytes);

// Pieces of this many output bytes are averaged by one thread at a time: a
// multiple of every element size, small enough that threads × a few pieces
// stay far below one model, large enough for long sequential reads and
// writes.
inline constexpr uint64_t kAverageChunk = uint64_t{2} << 20;
// At most this many threads average one file (fewer on smaller machines).
inline constexpr unsigned kMaxAverageThreads = 16;

// The threads RunInParallel uses for `count` items: the machine's hardware
// threads, at most kMaxAverageThreads, at most count, at least 1.
unsigned AverageThreads(size_t count);

// Runs fn(i) for every i in [0, count) on AverageThreads(count) threads, the
// calling one among them, each taking the next i; `after` (may be empty) runs
// on the calling thread after each of its own calls (progress reports are
// made there). Item 0 and its `after` run before any other item starts. Stops at the first error,
// which it returns; an exception of fn becomes a Status (std::bad_alloc: ENOMEM).
Status RunInParallel(size_t count, const std::function<Status(size_t)>& fn,
                     const std::function<void()>& after);

// PyTorch zip averaging (core/torch_zip.cc): our own zip reader and writer
// and c10's header-only Half and BFloat16; nothing of libtorch is loaded.
Result<AverageResult> AverageTorchZip(const std::vector<std::string>& members, OutputFile* out,
                                      const ProgressFn& progress);
// torch_zip.cc's implementation, which AverageTorchZip calls.
Result<AverageResult> AverageTorchZipFiles(const std::vector<std::string>& members, OutputFile* out,
                                           const ProgressFn& progress);
Result<AverageResult> AverageSafetensors(const std::vector<std::string>& members, OutputFile* out,
                                         const ProgressFn& progress);

}  // namespace ckptfs::core

#endif  // CKPTFS_CORE_TENSOR_IO_H_
