// Averaging PyTorch zip checkpoints (torch.save since 1.6). Members are read
// through core's bounded zip reader (zip_reader.h: pread, sizes checked
// before anything is allocated, deflated entries inflated within budget,
// CRC-32 checked). The output is a zip archive laid out as libtorch's
// PyTorchStreamWriter lays it out (stored records, data aligned to 64 bytes
// by an "FB" extra field, zip64 where sizes or offsets need it), written by
// ZipLayout (zip_writer.h): its size is known from the newest member's structure
// before anything is averaged, and records are written in place (pwrite)
// by several threads at once.
//
// Parallelism: every storage is cut into pieces of kAverageChunk bytes of
// output; up to kMaxAverageThreads threads (no more than the machine's
// hardware threads) each take the next piece, read it from every member,
// sum it in float32 (float64 for f64) and write it. CRC-32s of the pieces
// read are combined in order and checked against each member's record; a
// storage deflated in some member is read whole, as one piece.
//
// Budgets: kMaxPickleBytes, the largest data.pkl read into memory (a
// deflated one too: its declared size is checked before it is inflated).
// Memory: per thread, one piece read, its sum and its output (about
// 4 × kAverageChunk); a deflated storage: its size, twice.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cpuid.h>
#include <fcntl.h>
#include <immintrin.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <optional>
#include <set>
#include <system_error>
#include <thread>

#include "core/cancel.h"
#include "core/crc32.h"
#include "core/dtype.h"
#include "core/pickle.h"
#include "core/tensor_io.h"
#include "core/torch_archive.h"
#include "core/zip_reader.h"
#include "core/zip_writer.h"

namespace ckptfs::core {
namespace {

// One storage of the output and how it is cut into pieces.
struct StoragePlan {
  const StorageInfo* info = nullptr;
  std::string key;                           // the newest member's
  std::vector<const ZipEntry*> entries;      // the record read from each member used
  std::vector<const TorchArchive*> members;  // all members if averaged, else the newest
  size_t record = 0;                         // in the layout
  bool averaged = false;
  bool whole = false;  // deflated in some member: read whole, as one piece
};

// One piece: bytes [begin, end) of a storage's output. The last piece of a
// storage also reads each record's bytes past the storage, for the CRC.
struct Piece {
  size_t plan = 0;
  uint64_t begin = 0, end = 0;
  bool last = false;
  std::vector<uint32_t> crc;     // per member used: CRC-32 of what was read
  std::vector<uint64_t> length;  // per member used: bytes read
  uint32_t out_crc = 0;
};

// Scratch space of one thread, reused from piece to piece.
struct Scratch {
  std::vector<char> read;
  std::vector<char> output;
  std::vector<float> sum;
};

// float16, bfloat16 and float32 pieces are summed here, in a float32 buffer
// reused from piece to piece, with F16C where the processor has it; the
// results are those of core::Accumulator (torch's round-to-nearest-even
// conversions), which sums every other averaged type.
bool SummedInPieces(DType t) { return t == DType::kF16 || t == DType::kBF16 || t == DType::kF32; }

// F16C from cpuid (clang's __builtin_cpu_supports does not know "f16c");
// "avx" also checks that the OS saves the AVX registers.
bool HasF16C() {
  static const bool has = [] {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    return __get_cpuid(1, &eax, &ebx, &ecx, &edx) != 0 && (ecx & bit_F16C) != 0 &&
           __builtin_cpu_supports("avx");
  }();
  return has;
}

__attribute__((target("avx,f16c"))) void AddHalfF16C(const uint16_t* in, size_t n, bool first,
                                                     float* sum) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 x = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i)));
    _mm256_storeu_ps(sum + i, first ? x : _mm256_add_ps(_mm256_loadu_ps(sum + i), x));
  }
  for (; i < n; ++i) {
    const float x = c10::Half(in[i], c10::Half::from_bits());
    sum[i] = first ? x : sum[i] + x;
  }
}

__attribute__((target("avx,f16c"))) void StoreHalfF16C(const float* sum, size_t n, float count,
                                                       uint16_t* out) {
  size_t i = 0;
  const __m256 c = _mm256_set1_ps(count);
  for (; i + 8 <= n; i += 8) {
    const __m256 x = _mm256_div_ps(_mm256_loadu_ps(sum + i), c);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i),
                     _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  for (; i < n; ++i) out[i] = c10::Half(sum[i] / count).x;
}

// Adds n elements of type t (the first input: sets them).
void AddPiece(DType t, const char* data, size_t n, bool first, float* sum) {
  if (n == 0) return;  // an empty storage: sum may be null
  if (t == DType::kF32) {
    const float* in = reinterpret_cast<const float*>(data);
    if (first) {
      std::memcpy(sum, in, n * sizeof(float));
    } else {
      for (size_t i = 0; i < n; ++i) sum[i] += in[i];
    }
    return;
  }
  const uint16_t* in = reinterpret_cast<const uint16_t*>(data);
  if (t == DType::kBF16) {
    for (size_t i = 0; i < n; ++i) {
      const float x = c10::BFloat16(in[i], c10::BFloat16::from_bits());
      sum[i] = first ? x : sum[i] + x;
    }
  } else if (HasF16C()) {
    AddHalfF16C(in, n, first, sum);
  } else {
    for (size_t i = 0; i < n; ++i) {
      const float x = c10::Half(in[i], c10::Half::from_bits());
      sum[i] = first ? x : sum[i] + x;
    }
  }
}

// The mean of `count` inputs, in type t.
void StorePiece(DType t, const float* sum, size_t n, size_t count, char* out) {
  const float c = static_cast<float>(count);
  if (t == DType::kF32) {
    float* o = reinterpret_cast<float*>(out);
    for (size_t i = 0; i < n; ++i) o[i] = sum[i] / c;
  } else if (t == DType::kBF16) {
    uint16_t* o = reinterpret_cast<uint16_t*>(out);
    for (size_t i = 0; i < n; ++i) o[i] = c10::BFloat16(sum[i] / c).x;
  } else if (HasF16C()) {
    StoreHalfF16C(sum, n, c, reinterpret_cast<uint16_t*>(out));
  } else {
    uint16_t* o = reinterpret_cast<uint16_t*>(out);
    for (size_t i = 0; i < n; ++i) o[i] = c10::Half(sum[i] / c).x;
  }
}

Status AveragePiece(const std::vector<StoragePlan>& plans, ZipLayout* layout, OutputFile* out,
                    Piece* piece, Scratch* scratch) {
  const StoragePlan& plan = plans[piece->plan];
  const StorageInfo& info = *plan.info;
  const uint64_t data_offset = layout->record(plan.record).data_offset;
  const size_t item = ItemSize(info.dtype);
  if (plan.whole) {
    // Some member deflated this record: read each sequentially, whole.
    std::vector<char>& output = scratch->output;
    output.resize(static_cast<size_t>(info.nbytes));
    if (!plan.averaged) {
      Status s = ReadStorage(
          *plan.members[0], plan.key, info,
          [&](uint64_t offset, const char* data, size_t n) {
            if (n > 0) std::memcpy(output.data() + offset, data, n);
          },
          &scratch->read);
      if (!s.ok()) return s;
    } else {
      Accumulator acc(info.dtype, static_cast<size_t>(info.numel));
      for (size_t i = 0; i < plan.members.size(); ++i) {
        const std::string key = plan.entries[i]->name.substr(plan.entries[i]->name.rfind('/') + 1);
        Status s = ReadStorage(
            *plan.members[i], key, info,
            [&](uint64_t offset, const char* data, size_t n) {
              acc.AddPart(data, static_cast<size_t>(offset) / item, n / item);
            },
            &scratch->read);
        if (!s.ok()) return s;
        acc.EndInput();
      }
      acc.Finish(output.data());
    }
    piece->out_crc = Crc32(0, output.data(), output.size());
    return out->WriteAt(data_offset, output.data(), output.size());
  }
  const size_t n = static_cast<size_t>(piece->end - piece->begin);
  const size_t elements = n / item;
  std::vector<char>& buf = scratch->read;
  if (buf.size() < std::max<uint64_t>(n, kAverageChunk)) {
    buf.resize(static_cast<size_t>(std::max<uint64_t>(n, kAverageChunk)));
  }
  const bool in_pieces = plan.averaged && SummedInPieces(info.dtype);
  std::optional<Accumulator> acc;
  if (plan.averaged && !in_pieces) acc.emplace(info.dtype, elements);
  if (in_pieces && scratch->sum.size() < elements) scratch->sum.resize(elements);
  if (plan.averaged && scratch->output.size() < n) scratch->output.resize(n);
  piece->crc.assign(plan.members.size(), 0);
  piece->length.assign(plan.members.size(), 0);
  for (size_t i = 0; i < plan.members.size(); ++i) {
    const ZipEntry& entry = *plan.entries[i];
    const InputFile& file = plan.members[i]->zip.file();
    if (Status s = file.ReadAt(entry.data_offset + piece->begin, buf.data(), n); !s.ok()) return s;
    uint32_t crc = Crc32(0, buf.data(), n);
    if (in_pieces) {
      AddPiece(info.dtype, buf.data(), elements, i == 0, scratch->sum.data());
    } else if (acc) {
      acc->AddPart(buf.data(), 0, elements);
      acc->EndInput();
    } else if (i == 0) {
      piece->out_crc = static_cast<uint32_t>(crc);
      if (Status s = out->WriteAt(data_offset + piece->begin, buf.data(), n); !s.ok()) return s;
    }
    uint64_t length = n;
    // The record's bytes past the storage count for its CRC.
    for (uint64_t at = piece->end; piece->last && at < entry.size;) {
      const size_t m = static_cast<size_t>(std::min<uint64_t>(entry.size - at, buf.size()));
      if (Status s = file.ReadAt(entry.data_offset + at, buf.data(), m); !s.ok()) return s;
      crc = Crc32(crc, buf.data(), m);
      at += m, length += m;
    }
    piece->crc[i] = static_cast<uint32_t>(crc);
    piece->length[i] = length;
  }
  if (!plan.averaged) return Status::Ok();
  if (in_pieces) {
    StorePiece(info.dtype, scratch->sum.data(), elements, plan.members.size(),
               scratch->output.data());
  } else {
    acc->Finish(scratch->output.data());
  }
  piece->out_crc = Crc32(0, scratch->output.data(), n);
  return out->WriteAt(data_offset + piece->begin, scratch->output.data(), n);
}

// The members loaded and checked against the newest, the output laid out.
struct Job {
  std::vector<TorchArchive> members;
  std::vector<std::map<std::string, std::string>> key_maps;
  ZipLayout layout;
  std::vector<StoragePlan> plans;
  size_t pickle_record = 0, byteorder_record = 0, version_record = 0;
  int64_t total = 0;  // storage bytes
};

const char kVersionRecord[] = "3\n";  // what libtorch 1.13's writer records

Status Prepare(const std::vector<std::string>& paths, bool newest_only, Job* job) {
  job->members.resize(newest_only ? 1 : paths.size());
  job->key_maps.resize(job->members.size());
  for (size_t i = 0; i < job->members.size(); ++i) {
    if (Status s = LoadTorchArchive(paths[i], &job->members[i]); !s.ok()) return s;
    if (i == 0) {
      for (const auto& [key, info] : job->members[0].storages) job->key_maps[0][key] = key;
    } else if (Status s = CompareTorchArchives(job->members[0], job->members[i], &job->key_maps[i]);
               !s.ok()) {
      return s;
    }
  }
  const TorchArchive& newest = job->members[0];
  job->pickle_record = job->layout.Add("data.pkl", newest.pickle.size());
  if (!newest.byteorder.empty()) {
    job->byteorder_record = job->layout.Add("byteorder", newest.byteorder.size());
  }
  for (const auto& [key, info] : newest.storages) {
    StoragePlan plan;
    plan.info = &info;
    plan.key = key;
    plan.averaged = IsAveraged(info.dtype);
    const size_t used = plan.averaged ? job->members.size() : 1;
    for (size_t i = 0; i < used; ++i) {
      const TorchArchive& m = job->members[i];
      const ZipEntry* e = m.records.at("data/" + job->key_maps[i].at(key));
      plan.members.push_back(&m);
      plan.entries.push_back(e);
      plan.whole = plan.whole || e->method != ZipEntry::kStored;
    }
    plan.record = job->layout.Add("data/" + key, static_cast<uint64_t>(info.nbytes));
    job->total += info.nbytes;
    job->plans.push_back(std::move(plan));
  }
  job->version_record = job->layout.Add("version", sizeof(kVersionRecord) - 1);
  return Status::Ok();
}

Result<AverageResult> AverageTorchZipImpl(const std::vector<std::string>& paths, OutputFile* out,
                                          const ProgressFn& progress) {
  Job job;
  if (Status s = Prepare(paths, false, &job); !s.ok()) return s;
  const TorchArchive& newest = job.members[0];
  AverageResult result;
  result.format = TensorFormat::kTorchZip;
  if (progress) progress({"averaging", 0, job.total});
  // Inputs are read once, front to back: have the kernel read them ahead
  // (for the file, whatever descriptor reads it).
  for (const TorchArchive& m : job.members) {
    const int fd = ::open(m.path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) continue;  // read below, which names the error
    (void)::posix_fadvise(fd, 0, 0, POSIX_FADV_WILLNEED);
    ::close(fd);
  }

  std::vector<Piece> pieces;
  for (size_t p = 0; p < job.plans.size(); ++p) {
    const StoragePlan& plan = job.plans[p];
    const uint64_t nbytes = static_cast<uint64_t>(plan.info->nbytes);
    const uint64_t step = plan.whole ? std::max<uint64_t>(nbytes, 1) : kAverageChunk;
    for (uint64_t b = 0; b == 0 || b < nbytes; b += step) {
      Piece piece;
      piece.plan = p;
      piece.begin = b;
      piece.end = std::min(nbytes, b + step);
      piece.last = piece.end == nbytes;
      pieces.push_back(std::move(piece));
    }
    if (plan.averaged) {
      ++result.tensors_averaged;
    } else {
      ++result.tensors_copied;
    }
  }
  std::vector<Scratch> scratch(AverageThreads(pieces.size()));
  std::atomic<unsigned> next_scratch{0};
  std::atomic<int64_t> done{0};
  std::mutex scratch_mu;
  std::map<std::thread::id, Scratch*> by_thread;
  auto scratch_of = [&]() -> Scratch* {
    std::lock_guard<std::mutex> lock(scratch_mu);
    Scratch*& s = by_thread[std::this_thread::get_id()];
    if (s == nullptr) s = &scratch[next_scratch.fetch_add(1)];
    return s;
  };
  Status s = RunInParallel(
      pieces.size(),
      [&](size_t i) -> Status {
        if (CancelRequested()) return CancelledStatus("averaging " + newest.path);
        Piece& piece = pieces[i];
        Status r = AveragePiece(job.plans, &job.layout, out, &piece, scratch_of());
        if (!r.ok()) {
          const StorageInfo& info = *job.plans[piece.plan].info;
          if (r.code() == StatusCode::kIoError && r.sys_errno() == ENOMEM) {
            return Status::FromErrno(newest.path + ": tensor '" + info.first_tensor + "' (" +
                                         std::to_string(info.nbytes) + " bytes)",
                                     ENOMEM);
          }
          if (r.code() == StatusCode::kIoError) return r;
          if (r.message().find("(tensor '") == std::string::npos) {
            return Status::Corrupt(r.message() + " (tensor '" + info.first_tensor + "')");
          }
          return r;
        }
        done.fetch_add(static_cast<int64_t>(piece.end - piece.begin));
        return Status::Ok();
      },
      [&] {
        if (progress) progress({"averaging", done.load(), job.total});
      });
  if (!s.ok()) return s;

  // Each record read must have the CRC-32 its member declares; the output
  // record's CRC is that of its pieces.
  std::vector<std::vector<uint32_t>> crc(job.plans.size());
  std::vector<std::vector<uint64_t>> length(job.plans.size());
  std::vector<uint32_t> out_crc(job.plans.size(), 0);
  for (const Piece& piece : pieces) {
    const StoragePlan& plan = job.plans[piece.plan];
    out_crc[piece.plan] = static_cast<uint32_t>(crc32_combine(
        out_crc[piece.plan], piece.out_crc, static_cast<z_off_t>(piece.end - piece.begin)));
    if (plan.whole) continue;  // checked while it was read
    std::vector<uint32_t>& c = crc[piece.plan];
    c.resize(plan.members.size(), 0);
    for (size_t i = 0; i < plan.members.size(); ++i) {
      c[i] = static_cast<uint32_t>(
          crc32_combine(c[i], piece.crc[i], static_cast<z_off_t>(piece.length[i])));
    }
  }
  for (size_t p = 0; p < job.plans.size(); ++p) {
    const StoragePlan& plan = job.plans[p];
    job.layout.record(plan.record).crc = out_crc[p];
    if (plan.whole) continue;
    for (size_t i = 0; i < plan.members.size(); ++i) {
      if (crc[p][i] != plan.entries[i]->crc32) {
        return Status::Corrupt(plan.members[i]->path + ": entry '" + plan.entries[i]->name +
                               "': CRC-32 mismatch (corrupt, or changed while it was read) "
                               "(tensor '" +
                               plan.info->first_tensor + "')");
      }
    }
  }
  // The small records, every local header, the central directory.
  auto write_record = [&](size_t index, const std::string& bytes) -> Status {
    ZipLayout::Record& r = job.layout.record(index);
    r.crc = Crc32(0, bytes.data(), bytes.size());
    return out->WriteAt(r.data_offset, bytes.data(), bytes.size());
  };
  if (Status w = write_record(job.pickle_record, newest.pickle); !w.ok()) return w;
  if (!newest.byteorder.empty()) {
    if (Status w = write_record(job.byteorder_record, newest.byteorder); !w.ok()) return w;
  }
  if (Status w = write_record(job.version_record, kVersionRecord); !w.ok()) return w;
  std::string headers;
  for (size_t i = 0; i <= job.version_record; ++i) {
    const ZipLayout::Record& r = job.layout.record(i);
    const std::string h = job.layout.LocalHeader(r);
    if (Status w = out->WriteAt(r.header_offset, h.data(), h.size()); !w.ok()) return w;
  }
  const std::string directory = job.layout.Directory();
  if (Status w = out->WriteAt(job.layout.data_end(), directory.data(), directory.size()); !w.ok())
    return w;
  // What was read is what each member holds now, or the average is refused.
  for (const TorchArchive& m : job.members) {
    if (Status c = m.zip.file().CheckUnchanged(); !c.ok()) return c;
  }
  result.bytes = job.total;
  return result;
}

}  // namespace

Result<AverageResult> AverageTorchZipFiles(const std::vector<std::string>& members, OutputFile* out,
                                           const ProgressFn& progress) {
  return AverageTorchZipImpl(members, out, progress);
}

}  // namespace ckptfs::core
