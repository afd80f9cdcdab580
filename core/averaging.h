// Averaging checkpoint files (DESIGN.md §3): PyTorch's zip format (any
// extension) and safetensors, with the newest member's exact structure.
//
// Floating tensors are averaged element-wise, accumulating in at least
// float32, and written in their own dtype; integer, bool and opaque tensors,
// and every non-tensor value, come from the newest member (the first path).
// The newest member's pickle bytes are reused unchanged, so container types,
// key order, `_metadata`, storage sharing and opaque objects are kept and
// nothing in them ever runs. Memory stays bounded by the largest storage or
// tensor, not by the number of members or the model size.
//
// Errors name the file and the tensor: kCorrupt for members that cannot be
// parsed or disagree (keys, shapes, dtypes, storage layout), kUnsupported for
// formats we do not handle (legacy pre-1.6 torch files, TorchScript
// archives, quantized or sparse tensors) and for inputs over a budget
// (zip_reader.h, kMaxPickleBytes in torch_zip.cc). The output is written to
// a temporary file beside out_path and renamed (not fsynced: the caller
// records completeness, see AverageCache): never half a file;
// on any failure the temporary file is removed.
//
// Untrusted and changing input: members are read with pread in pieces of
// kReadChunk (never mapped), every size is checked for overflow and against
// the file before anything is allocated, deflated zip entries are inflated
// within budget and CRC-checked, and a member truncated or changed while it
// is read (size, mtime, ctime, or the inode its path names) fails the average
// with kCorrupt naming it. Between pieces the work polls CancelRequested
// (core/cancel.h) and stops with ECANCELED. No exception escapes.
// Thread-compatible: concurrent calls must use different out_paths.
#ifndef CKPTFS_CORE_AVERAGING_H_
#define CKPTFS_CORE_AVERAGING_H_

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "core/status.h"

namespace ckptfs::core {

enum class TensorFormat { kTorchZip, kSafetensors, kTorchLegacy, kJsonIndex, kUnknown };

const char* TensorFormatName(TensorFormat f);

// From the first bytes of the file (and ".index.json" for shard indexes).
Result<TensorFormat> DetectFormat(const std::string& path);

// Whether a tensor file was written to its end: a PyTorch zip file has its
// end-of-central-directory record, a safetensors file its full data section.
// kCorrupt names the file and what is missing; other files are Ok.
Status CheckTensorFileComplete(const std::string& path);

// Called between storages (torch) or tensors (safetensors), on the calling
// thread.
struct AverageProgress {
  const char* stage;  // "reading", "averaging", "writing", "done"
  int64_t done = 0;   // bytes of output produced so far
  int64_t total = 0;  // bytes of output in all
};
using ProgressFn = std::function<void(const AverageProgress&)>;

struct AverageResult {
  TensorFormat format = TensorFormat::kUnknown;
  int64_t bytes = 0;         // tensor bytes in the output
  int tensors_averaged = 0;  // storages (torch) or tensors (safetensors)
  int tensors_copied = 0;    // taken from the newest member
};

// Prepares what averaging needs before the first average (nothing to load
// since the PyTorch zip code is built in; kept so that the daemon's warm-up
// at mount start has one place to grow). Thread-safe.
Status PreloadAveraging();

// members: the same file of each member checkpoint, newest first (at least
// one). A shard index (".index.json") is copied from the newest member.
Result<AverageResult> AverageFiles(const std::vector<std::string>& members,
                                   const std::string& out_path, const ProgressFn& progress);

}  // namespace ckptfs::core

#endif  // CKPTFS_CORE_AVERAGING_H_
