#include "core/pickle.h"

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <optional>
#include <unordered_map>
#include <unordered_set>

namespace ckptfs::core::pickle {
namespace {

constexpr size_t kMaxArenaChunk = 4096;   // objects per arena allocation, at most
constexpr int64_t kMaxElementBytes = 16;  // complex128, the widest element
constexpr int64_t kInt64Max = INT64_MAX;

bool IsGlobal(ObjectPtr o, const char* qualified) {
  return o && o->kind == Kind::kGlobal && o->text == qualified;
}

const char* KindName(Kind k) {
  static const char* const kNames[] = {"None",   "bool",    "int",    "float", "str",
                                       "bytes",  "tuple",   "list",   "dict",  "set",
                                       "global", "storage", "tensor", "call"};
  return kNames[static_cast<size_t>(k)];
}

Status OverBudget(const char* what, size_t limit) {
  return Status::Corrupt(std::string(what) + " exceeds the reader's budget of " +
                         std::to_string(limit));
}

class Machine {
 public:
  Machine(std::string_view data, const std::string& origin) : data_(data), origin_(origin) {}

  Result<Unpickled> Run() {
    while (pos_ < data_.size()) {
      const size_t at = pos_;
      const auto op = static_cast<unsigned char>(data_[pos_++]);
      // One step creates at most two objects, so checking here bounds the total.
      Status s = objects_ >= kMaxObjects ? OverBudget("objects created (kMaxObjects)", kMaxObjects)
                                         : Step(op);
      if (!s.ok()) {
        std::string msg = origin_ + ": pickle offset " + std::to_string(at) + ": " + s.message();
        return s.code() == StatusCode::kUnsupported ? Status::Unsupported(msg)
                                                    : Status::Corrupt(msg);
      }
      if (done_) {
        if (stack_.size() != 1) return Status::Corrupt(origin_ + ": pickle STOP with a bad stack");
        Unpickled out;
        out.root = stack_.back();
        out.objects = objects_;
        out.arena = std::move(arena_);
        out.arena_used = std::move(arena_used_);
        out.globals = std::move(global_order_);
        return out;
      }
    }
    return Status::Corrupt(origin_ + ": pickle truncated (no STOP)");
  }

 private:
  // Chunks grow from 64 objects to kMaxArenaChunk, so a small pickle costs
  // little and a large one few allocations.
  ObjectPtr Make(Kind kind) {
    if (chunk_used_ == chunk_size_) {
      chunk_size_ = chunk_size_ == 0 ? 64 : std::min(chunk_size_ * 2, kMaxArenaChunk);
      arena_.push_back(std::make_unique<Object[]>(chunk_size_));
      arena_used_.push_back(0);
      chunk_used_ = 0;
    }
    ++arena_used_.back();
    Object* o = &arena_.back()[chunk_used_++];
    ++objects_;
    o->kind = kind;
    return o;
  }
  // None, True, False and the ints 0..255: made on first use, then shared.
  ObjectPtr Shared(ObjectPtr* slot, Kind kind, int64_t value) {
    if (!*slot) {
      *slot = Make(kind);
      (*slot)->integer = value;
      (*slot)->boolean = value != 0;
    }
    return *slot;
  }

  Status Need(size_t n) {
    if (data_.size() - pos_ < n) return Status::Corrupt("truncated argument");
    return Status::Ok();
  }
  uint64_t ReadLE(size_t n) {
    uint64_t v = 0;
    for (size_t i = 0; i < n; ++i)
      v |= static_cast<uint64_t>(static_cast<unsigned char>(data_[pos_ + i])) << (8 * i);
    pos_ += n;
    return v;
  }
  Status ReadLine(std::string* out) {
    size_t nl = data_.find('\n', pos_);
    if (nl == std::string_view::npos) return Status::Corrupt("unterminated line");
    *out = std::string(data_.substr(pos_, nl - pos_));
    pos_ = nl + 1;
    return Status::Ok();
  }
  Status Push(ObjectPtr o) {
    if (stack_.size() + marks_.size() >= kMaxStack)
      return OverBudget("stack (kMaxStack)", kMaxStack);
    stack_.push_back(o);
    return Status::Ok();
  }
  Result<ObjectPtr> Pop() {
    if (stack_.empty() || (!marks_.empty() && stack_.size() <= marks_.back())) {
      return Status::Corrupt("pop from an empty stack");
    }
    ObjectPtr o = stack_.back();
    stack_.pop_back();
    return o;
  }
  Result<ObjectPtr> Top() {
    if (stack_.empty()) return Status::Corrupt("empty stack");
    return stack_.back();
  }
  // Pops everything down to the last MARK, and the mark.
  Result<std::vector<ObjectPtr>> PopMark() {
    if (marks_.empty()) return Status::Corrupt("no MARK");
    size_t m = marks_.back();
    marks_.pop_back();
    if (m > stack_.size()) return Status::Corrupt("MARK above the stack");
    std::vector<ObjectPtr> items(stack_.begin() + static_cast<std::ptrdiff_t>(m), stack_.end());
    stack_.resize(m);
    return items;
  }
  Status Memoize(uint64_t index) {
    Result<ObjectPtr> top = Top();
    if (!top.ok()) return top.status();
    auto [it, inserted] = memo_.emplace(index, *top);
    if (!inserted) {
      it->second = *top;
    } else if (memo_.size() > kMaxMemo) {
      return OverBudget("memo entries (kMaxMemo)", kMaxMemo);
    }
    return Status::Ok();
  }
  Status Get(uint64_t index) {
    auto it = memo_.find(index);
    if (it == memo_.end()) return Status::Corrupt("memo key " + std::to_string(index) + " missing");
    return Push(it->second);
  }
  Status PushInt(int64_t v) {
    if (v >= 0 && v < 256) return Push(Shared(&small_ints_[v], Kind::kInt, v));
    ObjectPtr o = Make(Kind::kInt);
    o->integer = v;
    return Push(o);
  }
  Status PushText(Kind kind, size_t len_bytes) {
    if (Status s = Need(len_bytes); !s.ok()) return s;
    uint64_t n = ReadLE(len_bytes);
    if (Status s = Need(n); !s.ok()) return s;
    if (Status s = ChargeText(n); !s.ok()) return s;
    ObjectPtr o = Make(kind);
    o->text = std::string(data_.substr(pos_, n));
    pos_ += n;
    return Push(o);
  }
  Status ChargeText(size_t n) {
    if (n > kMaxStringBytes - string_bytes_)
      return OverBudget("string bytes (kMaxStringBytes)", kMaxStringBytes);
    string_bytes_ += n;
    return Status::Ok();
  }
  // Globals are interned: a name pushed again (STACK_GLOBAL of memoized
  // strings costs 5 bytes) reuses its object and its text.
  Status PushGlobal(std::string_view module, std::string_view name) {
    if (module.size() + name.size() + 1 > kMaxGlobalNameBytes) {
      return OverBudget("global name bytes (kMaxGlobalNameBytes)", kMaxGlobalNameBytes);
    }
    std::string text;
    text.reserve(module.size() + name.size() + 1);
    text.append(module).append(".").append(name);
    auto it = globals_.find(text);
    if (it != globals_.end()) return Push(it->second);
    if (Status s = ChargeText(text.size()); !s.ok()) return s;
    ObjectPtr o = Make(Kind::kGlobal);
    o->text = text;
    globals_.emplace(std::move(text), o);
    global_order_.push_back(o);
    return Push(o);
  }
  Status Tuple(std::vector<ObjectPtr> items) {
    ObjectPtr t = Make(Kind::kTuple);
    t->items = std::move(items);
    return Push(t);
  }
  Status TupleN(size_t n) {
    if (stack_.size() < n) return Status::Corrupt("tuple of missing items");
    std::vector<ObjectPtr> items(stack_.end() - static_cast<std::ptrdiff_t>(n), stack_.end());
    stack_.resize(stack_.size() - n);
    return Tuple(std::move(items));
  }
  // Items set on an opaque object (a defaultdict, a dict subclass) are kept
  // in its own entries, so its BUILD state does not replace them.
  Status SetItems(ObjectPtr dict, const std::vector<ObjectPtr>& kv) {
    if (kv.size() % 2 != 0) return Status::Corrupt("odd number of dict items");
    if (dict->kind != Kind::kDict && dict->kind != Kind::kCall) {
      return Status::Corrupt(std::string("SETITEMS on a ") + KindName(dict->kind));
    }
    for (size_t i = 0; i < kv.size(); i += 2) dict->entries.emplace_back(kv[i], kv[i + 1]);
    return Status::Ok();
  }
  // Likewise a list subclass's items follow a call's {callable, args, kwargs}.
  Status Append(ObjectPtr list, const std::vector<ObjectPtr>& items) {
    if (list->kind != Kind::kList && list->kind != Kind::kSet && list->kind != Kind::kCall) {
      return Status::Corrupt(std::string("APPEND on a ") + KindName(list->kind));
    }
    list->items.insert(list->items.end(), items.begin(), items.end());
    return Status::Ok();
  }
  ObjectPtr Call(ObjectPtr callable, ObjectPtr args, ObjectPtr kwargs) {
    ObjectPtr call = Make(Kind::kCall);
    call->items = {callable, args, kwargs};
    return call;
  }

  Result<ObjectPtr> RebuildTensor(ObjectPtr fn, ObjectPtr args) {
    if (!args || args->kind != Kind::kTuple || args->items.size() < 4) {
      return Status::Corrupt(fn->text + " with bad arguments");
    }
    const auto& a = args->items;
    if (a[0]->kind != Kind::kStorage) return Status::Corrupt(fn->text + " without a storage");
    ObjectPtr t = Make(Kind::kTensor);
    t->storage = a[0];
    if (a[1]->kind != Kind::kInt || a[1]->big_integer) return Status::Corrupt("bad storage offset");
    t->offset = a[1]->integer;
    for (int which = 0; which < 2; ++which) {
      ObjectPtr dims = a[2 + which];
      if (dims->kind != Kind::kTuple) return Status::Corrupt("tensor size/stride is not a tuple");
      for (ObjectPtr d : dims->items) {
        if (d->kind != Kind::kInt || d->big_integer) return Status::Corrupt("bad tensor dimension");
        (which == 0 ? t->size : t->stride).push_back(d->integer);
      }
    }
    if (t->size.size() != t->stride.size())
      return Status::Corrupt("size and stride differ in rank");
    if (Status s = CheckExtent(*t); !s.ok()) return s;
    if (fn->text == "torch._utils._rebuild_tensor_v3") {
      if (a.size() < 7 || a[6]->kind != Kind::kGlobal)
        return Status::Corrupt("v3 tensor without dtype");
      t->tensor_dtype = a[6]->text;
    }
    return t;
  }

  // Offsets, sizes and strides come from the file: their products and sums
  // are computed here with overflow checks, so callers' arithmetic (element
  // count, extent + 1) cannot overflow.
  static Status CheckExtent(const Object& t) {
    if (t.offset < 0) return Status::Corrupt("negative tensor storage offset");
    int64_t extent = t.offset;
    int64_t numel = 1;
    for (size_t d = 0; d < t.size.size(); ++d) {
      if (t.size[d] < 0 || t.stride[d] < 0)
        return Status::Corrupt("negative tensor size or stride");
      int64_t step = 0;
      if (__builtin_mul_overflow(t.size[d] - 1, t.stride[d], &step) ||
          __builtin_add_overflow(extent, step, &extent) ||
          __builtin_mul_overflow(numel, t.size[d], &numel)) {
        return Status::Corrupt("tensor size arithmetic overflows int64");
      }
    }
    if (extent == kInt64Max) return Status::Corrupt("tensor size arithmetic overflows int64");
    return Status::Ok();
  }

  // REDUCE: interprets tensor rebuilds and OrderedDict; anything else is an
  // opaque call node. _rebuild_from_type_v2(func, type, args, state) wraps a
  // rebuild; its wrappers are unwrapped in a loop, bounded by kMaxDepth.
  Result<ObjectPtr> Reduce(ObjectPtr fn, ObjectPtr args) {
    for (size_t depth = 0;
         IsGlobal(fn, "torch._tensor._rebuild_from_type_v2") && args->kind == Kind::kTuple &&
         args->items.size() >= 3 && args->items[0]->kind == Kind::kGlobal;
         ++depth) {
      if (depth >= kMaxDepth)
        return OverBudget("_rebuild_from_type_v2 nesting (kMaxDepth)", kMaxDepth);
      ObjectPtr inner = args->items[0];
      args = args->items[2];
      fn = inner;
    }
    if (IsGlobal(fn, "torch._utils._rebuild_tensor_v2") ||
        IsGlobal(fn, "torch._utils._rebuild_tensor") ||
        IsGlobal(fn, "torch._utils._rebuild_tensor_v3")) {
      return RebuildTensor(fn, args);
    }
    if ((IsGlobal(fn, "torch._utils._rebuild_parameter") ||
         IsGlobal(fn, "torch._utils._rebuild_parameter_with_state")) &&
        args->kind == Kind::kTuple && !args->items.empty() &&
        args->items[0]->kind == Kind::kTensor) {
      return args->items[0];
    }
    if (fn->kind == Kind::kGlobal && (fn->text.find("_rebuild_qtensor") != std::string::npos ||
                                      fn->text.find("_rebuild_sparse") != std::string::npos ||
                                      fn->text.find("_rebuild_nested") != std::string::npos)) {
      return Status::Unsupported(fn->text +
                                 ": quantized, sparse and nested tensors are not supported");
    }
    if (IsGlobal(fn, "collections.OrderedDict") && args->kind == Kind::kTuple &&
        args->items.empty()) {
      return Make(Kind::kDict);
    }
    return Call(fn, args, nullptr);
  }

  Result<ObjectPtr> Storage(ObjectPtr pid) {
    if (!pid || pid->kind != Kind::kTuple || pid->items.size() < 5 ||
        pid->items[0]->kind != Kind::kString || pid->items[0]->text != "storage" ||
        pid->items[1]->kind != Kind::kGlobal || pid->items[2]->kind != Kind::kString ||
        pid->items[4]->kind != Kind::kInt || pid->items[4]->big_integer) {
      return Status::Corrupt("persistent id is not a torch storage");
    }
    const std::string& type = pid->items[1]->text;
    if (type.rfind("torch.", 0) != 0) return Status::Corrupt("storage type " + type);
    // One object per key, so tensors sharing a storage share the object.
    auto it = storages_.find(pid->items[2]->text);
    if (it != storages_.end()) return it->second;
    if (Status st = ChargeText(type.size() + pid->items[2]->text.size()); !st.ok()) return st;
    ObjectPtr s = Make(Kind::kStorage);
    s->storage_type = type.substr(6);
    s->storage_key = pid->items[2]->text;
    s->storage_numel = pid->items[4]->integer;
    if (s->storage_numel < 0) return Status::Corrupt("negative storage size");
    if (s->storage_numel > kInt64Max / kMaxElementBytes)
      return Status::Corrupt("storage size overflows int64");
    storages_.emplace(s->storage_key, s);
    return s;
  }

  Status Step(unsigned char op) {
    switch (op) {
      case 0x80: {  // PROTO
        if (Status s = Need(1); !s.ok()) return s;
        if (static_cast<unsigned char>(data_[pos_++]) > 5)
          return Status::Unsupported("pickle protocol > 5");
        return Status::Ok();
      }
      case 0x95:  // FRAME
        if (Status s = Need(8); !s.ok()) return s;
        pos_ += 8;
        return Status::Ok();
      case '.':  // STOP
        done_ = true;
        return Status::Ok();
      case '(':  // MARK
        if (stack_.size() + marks_.size() >= kMaxStack)
          return OverBudget("stack (kMaxStack)", kMaxStack);
        marks_.push_back(stack_.size());
        return Status::Ok();
      case '0': {  // POP
        if (!marks_.empty() && marks_.back() == stack_.size()) {
          marks_.pop_back();
          return Status::Ok();
        }
        return Pop().status();
      }
      case '1':  // POP_MARK
        return PopMark().status();
      case '2': {  // DUP
        Result<ObjectPtr> top = Top();
        if (!top.ok()) return top.status();
        return Push(*top);
      }
      case 'N':
        return Push(Shared(&none_, Kind::kNone, 0));
      case 0x88:  // NEWTRUE
        return Push(Shared(&true_, Kind::kBool, 1));
      case 0x89:  // NEWFALSE
        return Push(Shared(&false_, Kind::kBool, 0));
      case 'K':
        if (Status s = Need(1); !s.ok()) return s;
        return PushInt(static_cast<int64_t>(ReadLE(1)));
      case 'M':
        if (Status s = Need(2); !s.ok()) return s;
        return PushInt(static_cast<int64_t>(ReadLE(2)));
      case 'J':
        if (Status s = Need(4); !s.ok()) return s;
        return PushInt(static_cast<int32_t>(ReadLE(4)));
      case 0x8a:
      case 0x8b: {  // LONG1, LONG4
        const size_t len_bytes = op == 0x8a ? 1 : 4;
        if (Status s = Need(len_bytes); !s.ok()) return s;
        uint64_t n = ReadLE(len_bytes);
        if (Status s = Need(n); !s.ok()) return s;
        if (n <= 8) {
          uint64_t v = n == 0 ? 0 : ReadLE(n);
          if (n > 0 && n < 8 && (v >> (8 * n - 1)) & 1) v |= ~uint64_t{0} << (8 * n);  // sign
          return PushInt(static_cast<int64_t>(v));
        }
        ObjectPtr o = Make(Kind::kInt);
        o->big_integer = true;
        pos_ += n;
        return Push(o);
      }
      case 'G': {  // BINFLOAT, big-endian
        if (Status s = Need(8); !s.ok()) return s;
        uint64_t bits = 0;
        for (int i = 0; i < 8; ++i)
          bits = (bits << 8) | static_cast<unsigned char>(data_[pos_ + i]);
        pos_ += 8;
        ObjectPtr f = Make(Kind::kFloat);
        std::memcpy(&f->real, &bits, sizeof(bits));
        return Push(f);
      }
      case 'X':
        return PushText(Kind::kString, 4);
      case 0x8c:
        return PushText(Kind::kString, 1);
      case 0x8d:
        return PushText(Kind::kString, 8);
      case 'T':  // BINSTRING (py2 str)
        return PushText(Kind::kBytes, 4);
      case 'U':
        return PushText(Kind::kBytes, 1);
      case 'B':
        return PushText(Kind::kBytes, 4);
      case 'C':
        return PushText(Kind::kBytes, 1);
      case 0x8e:
      case 0x96:  // BINBYTES8, BYTEARRAY8
        return PushText(Kind::kBytes, 8);
      case ')':
        return Tuple({});
      case 't': {
        Result<std::vector<ObjectPtr>> items = PopMark();
        if (!items.ok()) return items.status();
        return Tuple(std::move(*items));
      }
      case 0x85:
        return TupleN(1);
      case 0x86:
        return TupleN(2);
      case 0x87:
        return TupleN(3);
      case ']':
        return Push(Make(Kind::kList));
      case 'l': {
        Result<std::vector<ObjectPtr>> items = PopMark();
        if (!items.ok()) return items.status();
        ObjectPtr l = Make(Kind::kList);
        l->items = std::move(*items);
        return Push(l);
      }
      case 'a': {
        Result<ObjectPtr> v = Pop();
        if (!v.ok()) return v.status();
        Result<ObjectPtr> list = Top();
        if (!list.ok()) return list.status();
        return Append(*list, {*v});
      }
      case 'e': {
        Result<std::vector<ObjectPtr>> items = PopMark();
        if (!items.ok()) return items.status();
        Result<ObjectPtr> list = Top();
        if (!list.ok()) return list.status();
        return Append(*list, std::move(*items));
      }
      case '}':
        return Push(Make(Kind::kDict));
      case 'd': {
        Result<std::vector<ObjectPtr>> items = PopMark();
        if (!items.ok()) return items.status();
        ObjectPtr d = Make(Kind::kDict);
        if (Status s = SetItems(d, std::move(*items)); !s.ok()) return s;
        return Push(d);
      }
      case 's': {
        Result<ObjectPtr> v = Pop();
        if (!v.ok()) return v.status();
        Result<ObjectPtr> k = Pop();
        if (!k.ok()) return k.status();
        Result<ObjectPtr> d = Top();
        if (!d.ok()) return d.status();
        return SetItems(*d, {*k, *v});
      }
      case 'u': {
        Result<std::vector<ObjectPtr>> items = PopMark();
        if (!items.ok()) return items.status();
        Result<ObjectPtr> d = Top();
        if (!d.ok()) return d.status();
        return SetItems(*d, std::move(*items));
      }
      case 0x8f:
        return Push(Make(Kind::kSet));
      case 0x90: {  // ADDITEMS
        Result<std::vector<ObjectPtr>> items = PopMark();
        if (!items.ok()) return items.status();
        Result<ObjectPtr> set = Top();
        if (!set.ok()) return set.status();
        return Append(*set, std::move(*items));
      }
      case 0x91: {  // FROZENSET
        Result<std::vector<ObjectPtr>> items = PopMark();
        if (!items.ok()) return items.status();
        ObjectPtr s = Make(Kind::kSet);
        s->items = std::move(*items);
        return Push(s);
      }
      case 'c': {  // GLOBAL
        std::string module, name;
        if (Status s = ReadLine(&module); !s.ok()) return s;
        if (Status s = ReadLine(&name); !s.ok()) return s;
        return PushGlobal(module, name);
      }
      case 0x93: {  // STACK_GLOBAL
        Result<ObjectPtr> name = Pop();
        if (!name.ok()) return name.status();
        Result<ObjectPtr> module = Pop();
        if (!module.ok()) return module.status();
        if ((*name)->kind != Kind::kString || (*module)->kind != Kind::kString) {
          return Status::Corrupt("STACK_GLOBAL of non-strings");
        }
        return PushGlobal((*module)->text, (*name)->text);
      }
      case 'q':
        if (Status s = Need(1); !s.ok()) return s;
        return Memoize(ReadLE(1));
      case 'r':
        if (Status s = Need(4); !s.ok()) return s;
        return Memoize(ReadLE(4));
      case 0x94:
        return Memoize(memo_.size());
      case 'h':
        if (Status s = Need(1); !s.ok()) return s;
        return Get(ReadLE(1));
      case 'j':
        if (Status s = Need(4); !s.ok()) return s;
        return Get(ReadLE(4));
      case 'Q': {  // BINPERSID
        Result<ObjectPtr> pid = Pop();
        if (!pid.ok()) return pid.status();
        Result<ObjectPtr> storage = Storage(*pid);
        if (!storage.ok()) return storage.status();
        return Push(*storage);
      }
      case 'R': {  // REDUCE
        Result<ObjectPtr> args = Pop();
        if (!args.ok()) return args.status();
        Result<ObjectPtr> fn = Pop();
        if (!fn.ok()) return fn.status();
        Result<ObjectPtr> r = Reduce(*fn, *args);
        if (!r.ok()) return r.status();
        return Push(*r);
      }
      case 0x81:    // NEWOBJ
      case 0x92: {  // NEWOBJ_EX
        ObjectPtr kwargs = nullptr;
        if (op == 0x92) {
          Result<ObjectPtr> k = Pop();
          if (!k.ok()) return k.status();
          kwargs = *k;
        }
        Result<ObjectPtr> args = Pop();
        if (!args.ok()) return args.status();
        Result<ObjectPtr> cls = Pop();
        if (!cls.ok()) return cls.status();
        return Push(Call(*cls, *args, kwargs));
      }
      case 'b': {  // BUILD
        Result<ObjectPtr> state = Pop();
        if (!state.ok()) return state.status();
        Result<ObjectPtr> target = Top();
        if (!target.ok()) return target.status();
        // Tensors ignore their state; dicts and objects keep it for walking.
        // Scalars have none in Python, and some of ours are shared.
        switch ((*target)->kind) {
          case Kind::kTensor:
            return Status::Ok();
          case Kind::kTuple:
          case Kind::kList:
          case Kind::kDict:
          case Kind::kSet:
          case Kind::kCall:
            (*target)->state = *state;
            return Status::Ok();
          default:
            return Status::Corrupt(std::string("BUILD on a ") + KindName((*target)->kind));
        }
      }
      default:
        break;
    }
    char hex[8];
    std::snprintf(hex, sizeof(hex), "0x%02x", op);
    if (std::strchr("FILPSVgpio", static_cast<int>(op)) != nullptr && op != 0) {
      return Status::Unsupported(std::string("protocol 0/1 opcode '") + static_cast<char>(op) +
                                 "'");
    }
    return Status::Corrupt(std::string("unknown opcode ") + hex);
  }

  std::string_view data_;
  const std::string& origin_;
  size_t pos_ = 0;
  bool done_ = false;
  std::vector<ObjectPtr> stack_;
  std::vector<size_t> marks_;
  std::unordered_map<uint64_t, ObjectPtr> memo_;
  std::unordered_map<std::string, ObjectPtr> storages_;
  std::unordered_map<std::string, ObjectPtr> globals_;
  std::vector<ObjectPtr> global_order_;  // globals_, in the order first named
  std::vector<std::unique_ptr<Object[]>> arena_;
  std::vector<size_t> arena_used_;  // objects made in each chunk of arena_
  size_t objects_ = 0;
  size_t chunk_size_ = 0;  // objects in arena_.back()
  size_t chunk_used_ = 0;
  size_t string_bytes_ = 0;
  ObjectPtr none_ = nullptr;
  ObjectPtr true_ = nullptr;
  ObjectPtr false_ = nullptr;
  ObjectPtr small_ints_[256] = {};
};

}  // namespace

void ForEachObject(const Unpickled& u, const std::function<void(const Object&)>& fn) {
  for (size_t c = 0; c < u.arena.size() && c < u.arena_used.size(); ++c) {
    for (size_t i = 0; i < u.arena_used[c]; ++i) fn(u.arena[c][i]);
  }
}

Result<Unpickled> Unpickle(std::string_view data, const std::string& origin) {
  return Machine(data, origin).Run();
}

}  // namespace ckptfs::core::pickle
