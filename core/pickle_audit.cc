// The audit of a checkpoint's pickle: see pickle_audit.h.
#include "core/pickle_audit.h"

#include <algorithm>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <set>
#include <string_view>

#include "core/file_util.h"
#include "core/json_text.h"
#include "core/pickle_inventory.h"
#include "core/safetensors.h"
#include "core/torch_archive.h"

namespace ckptfs::core {

const char kWeightsOnlyAllowList[] = "torch 1.13 weights_only";

namespace {

// torch.load(weights_only=True)'s allow-list, as torch 1.13's
// torch/_weights_only_unpickler.py builds it in _get_allowed_globals():
// collections.OrderedDict, torch.nn.parameter.Parameter,
// torch.serialization._get_layout, torch.Size, torch.Tensor; the dtypes
// complex32/64/128, float16/32/64, int8/16/32/64 (str(dtype)); every class of
// torch._tensor_classes and torch._storage_classes (module.name); and six
// rebuild functions of torch._utils. Listed here name by name as that torch
// (1.13.0, the Debian build this project tests against) prints them. The
// file does not record the torch that wrote it; a record such as
// .data/serialization_id or .format_version only tells that a newer torch
// did. We follow 1.13's list for every file: the names later versions added
// (torch._utils._rebuild_tensor_v3, torch._tensor._rebuild_from_type_v2,
// torch.device, more dtypes, ...) are reported NOT ALLOWED here: strict, and
// what torch.load(weights_only=True) of 1.13 would refuse.
const std::set<std::string, std::less<>>& AllowList() {
  static const std::set<std::string, std::less<>> kList = [] {
    std::set<std::string, std::less<>> s = {
        "collections.OrderedDict",
        "torch.nn.parameter.Parameter",
        "torch.serialization._get_layout",
        "torch.Size",
        "torch.Tensor",
        // dtypes
        "torch.complex32",
        "torch.complex64",
        "torch.complex128",
        "torch.float16",
        "torch.float32",
        "torch.float64",
        "torch.int8",
        "torch.int16",
        "torch.int32",
        "torch.int64",
        // rebuild functions
        "torch._utils._rebuild_parameter",
        "torch._utils._rebuild_tensor",
        "torch._utils._rebuild_tensor_v2",
        "torch._utils._rebuild_sparse_tensor",
        "torch._utils._rebuild_meta_tensor_no_storage",
        "torch._utils._rebuild_sparse_csr_tensor",
        // storage classes
        "torch.storage.TypedStorage",
        "torch.storage.UntypedStorage",
        "torch.QInt32Storage",
        "torch.QInt8Storage",
        "torch.QUInt2x4Storage",
        "torch.QUInt4x2Storage",
        "torch.QUInt8Storage",
    };
    // Tensor and storage classes, on the CPU and CUDA (torch._tensor_classes,
    // torch._storage_classes), and the sparse tensor classes.
    for (const char* t :
         {"BFloat16", "Bool", "Byte", "Char", "Double", "Float", "Half", "Int", "Long", "Short"}) {
      for (const char* module : {"torch.", "torch.cuda."}) {
        s.insert(std::string(module) + t + "Tensor");
        s.insert(std::string(module) + t + "Storage");
      }
      if (std::string_view(t) != "Bool") {
        s.insert(std::string("torch.sparse.") + t + "Tensor");
        s.insert(std::string("torch.cuda.sparse.") + t + "Tensor");
      }
    }
    for (const char* c : {"ComplexDouble", "ComplexFloat"}) {
      s.insert(std::string("torch.") + c + "Storage");
      s.insert(std::string("torch.cuda.") + c + "Storage");
    }
    return s;
  }();
  return kList;
}

Result<CheckpointAudit> InspectTorchZip(const std::string& path) {
  TorchArchive m;
  if (Status s = LoadTorchArchive(path, &m, /*keep_graph=*/true); !s.ok()) return s;
  CheckpointAudit audit;
  audit.format = TensorFormat::kTorchZip;
  audit.allow_list = kWeightsOnlyAllowList;
  for (const auto& [name, info] : m.tensors) {
    const StorageInfo& storage = m.storages.at(info.key);
    AuditTensor t;
    t.name = name;
    t.shape = info.size;
    std::optional<SafetensorsDType> st = SafetensorsDTypeOf(storage.dtype, info.dtype);
    size_t item = ItemSize(storage.dtype);
    if (st) {
      t.dtype = st->name;
      item = st->item;
    } else {
      t.dtype = info.dtype.empty() ? storage.type_name : info.dtype;
    }
    int64_t numel = 1;
    for (int64_t d : info.size) numel *= d;  // fits: checked by the reader
    t.bytes = numel * static_cast<int64_t>(item);
    audit.tensors.push_back(std::move(t));
  }
  Result<std::vector<PickleValue>> values = PickleValues(m.graph.root, path + ":data.pkl");
  if (!values.ok()) return values.status();
  for (PickleValue& v : *values) {
    audit.values.push_back({std::move(v.name), std::move(v.json), v.opaque});
  }
  Result<std::vector<PickleGlobal>> globals = PickleGlobals(m.graph, path + ":data.pkl");
  if (!globals.ok()) return globals.status();
  for (PickleGlobal& g : *globals) {
    const bool allowed = WeightsOnlyAllowed(g.name);
    audit.globals.push_back({std::move(g.name), allowed, g.uses});
  }
  return audit;
}

Result<CheckpointAudit> InspectSafetensors(const std::string& path) {
  InputFile file;
  if (Status s = file.Open(path); !s.ok()) return s;
  unsigned char len[8];
  if (file.size() < 8) return Status::Corrupt(path + ": too short for safetensors");
  if (Status s = file.ReadAt(0, len, 8); !s.ok()) return s;
  uint64_t n = 0;
  for (int b = 7; b >= 0; --b) n = (n << 8) | len[b];
  if (n > kMaxSafetensorsHeader || 8 + n > file.size()) {
    return Status::Corrupt(path + ": safetensors header length " + std::to_string(n) +
                           " does not fit the file");
  }
  std::string json(static_cast<size_t>(n), '\0');
  if (Status s = file.ReadAt(8, json.data(), json.size()); !s.ok()) return s;
  Result<SafetensorsHeader> h = ParseSafetensorsHeader(json, n, file.size(), path);
  if (!h.ok()) return h.status();
  CheckpointAudit audit;
  audit.format = TensorFormat::kSafetensors;
  audit.allow_list = kWeightsOnlyAllowList;
  for (const SafetensorsTensor& t : h->tensors) {
    audit.tensors.push_back({t.name, t.dtype_name, t.shape, static_cast<int64_t>(t.end - t.begin)});
  }
  std::sort(audit.tensors.begin(), audit.tensors.end(),
            [](const AuditTensor& a, const AuditTensor& b) { return a.name < b.name; });
  nlohmann::json doc;
  if (ParseJson(json, &doc) && doc.is_object() && doc.contains("__metadata__") &&
      doc["__metadata__"].is_object()) {
    for (const auto& [key, value] : doc["__metadata__"].items()) {
      // safetensors' rule: string values; anything else is shown as JSON.
      audit.values.push_back(
          {key,
           value.is_string() ? JsonQuote(value.get<std::string>())
                             : value.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace),
           false});
    }
  }
  return audit;
}

}  // namespace

bool WeightsOnlyAllowed(const std::string& global) { return AllowList().count(global) != 0; }

bool CheckpointAudit::Safe() const {
  for (const AuditGlobal& g : globals) {
    if (!g.allowed) return false;
  }
  return true;
}

Result<CheckpointAudit> InspectFile(const std::string& path) {
  Result<TensorFormat> format = DetectFormat(path);
  if (!format.ok()) return format.status();
  switch (*format) {
    case TensorFormat::kTorchZip:
      return InspectTorchZip(path);
    case TensorFormat::kSafetensors:
      return InspectSafetensors(path);
    case TensorFormat::kTorchLegacy:
      return Status::Unsupported(path +
                                 ": legacy (pre-1.6) torch.save format is not supported; "
                                 "re-save it with a current torch.save");
    default:
      return Status::Unsupported(path + ": not a PyTorch zip or safetensors file");
  }
}

std::string PrintableName(std::string_view name) {
  std::string out;
  for (size_t i = 0; i < name.size(); ++i) {
    const unsigned char c = static_cast<unsigned char>(name[i]);
    // C0 controls, DEL, and C1 controls (U+0080-U+009F, UTF-8 C2 80-9F).
    const bool c1 = c == 0xC2 && i + 1 < name.size() &&
                    static_cast<unsigned char>(name[i + 1]) >= 0x80 &&
                    static_cast<unsigned char>(name[i + 1]) <= 0x9F;
    if (c < 0x20 || c == 0x7F || c1) {
      const unsigned v = c1 ? static_cast<unsigned char>(name[++i]) : c;
      char hex[8];
      std::snprintf(hex, sizeof(hex), "\\x%02x", v);
      out += hex;
    } else if (c == '\\') {
      out += "\\\\";
    } else {
      out += static_cast<char>(c);
    }
  }
  return out;
}

std::string GlobalsVerdict(const CheckpointAudit& audit) {
  if (audit.Safe()) return "safe";
  std::string s = "unsafe:";
  bool first = true;
  for (const AuditGlobal& g : audit.globals) {
    if (g.allowed) continue;
    s += (first ? " " : ", ") + PrintableName(g.name);
    first = false;
  }
  return s;
}

}  // namespace ckptfs::core
