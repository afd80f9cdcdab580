"""Checkpoint files written by real torch.save (Debian python3-torch), for the
averaging tests, plus a minimal safetensors writer/reader (the safetensors
package is not in Debian) that follows the format's specification.

Run as a script to regenerate the small committed copies used by the pure
C++ tests: /usr/bin/python3 tests/e2e/tensor_fixtures.py tests/fixtures/tensors
"""
import argparse
import collections
import json
import os
import struct
import sys

import torch

ST_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
             torch.uint8: "U8", torch.bool: "BOOL"}
ST_TYPES = {v: k for k, v in ST_DTYPES.items()}


def reference_average(members, newest):
    """What the contract says: floats averaged in float32 (float64 for
    float64; newest first), cast back; everything else from the newest."""
    out = type(newest)()
    for k, v in newest.items():
        if torch.is_tensor(v) and v.is_floating_point():
            acc = sum(m[k].double() if v.dtype == torch.float64 else m[k].float() for m in members)
            out[k] = (acc / len(members)).to(v.dtype)
        else:
            out[k] = v
    return out


def save_safetensors(tensors, path, metadata=None):
    header, blobs, offset = {}, [], 0
    if metadata:
        header["__metadata__"] = metadata
    for name, t in tensors.items():
        data = t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": ST_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


def load_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = collections.OrderedDict()
    for name, e in header.items():
        if name == "__metadata__":
            continue
        b, end = e["data_offsets"]
        t = torch.frombuffer(bytearray(data[b:end]), dtype=torch.uint8) if end > b else torch.empty(0, dtype=torch.uint8)
        out[name] = t.view(ST_TYPES[e["dtype"]]).reshape(e["shape"])
    return out


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 4)
        self.lin = torch.nn.Linear(4, 3)
        self.bn = torch.nn.BatchNorm1d(3)
        self.out = torch.nn.Linear(3, 10, bias=False)


def state_dict(seed):
    torch.manual_seed(seed)
    net = Net()
    net.bn.num_batches_tracked += seed + 1
    return net.state_dict()


def lightning(seed):
    """A Lightning-style checkpoint: nested dicts, optimizer state, opaque objects."""
    import argparse as ap
    sd = state_dict(seed)
    opt = torch.optim.Adam(torch.nn.Linear(4, 3).parameters())
    for p in opt.param_groups[0]["params"]:
        p.grad = torch.full_like(p, 0.1 * (seed + 1))
    opt.step()
    return {"epoch": seed, "global_step": 100 * seed, "state_dict": sd,
            "optimizer_states": [opt.state_dict()],
            "hyper_parameters": ap.Namespace(lr=0.001 * (seed + 1), name=f"run{seed}"),
            "callbacks": {"ModelCheckpoint": {"best_model_score": torch.tensor(0.5 - seed / 10)}},
            "pytorch-lightning_version": "1.9.0"}


def tied(seed):
    """Storage sharing: a tied weight, a view and a transpose of one storage."""
    torch.manual_seed(seed)
    w = torch.randn(4, 6)
    return collections.OrderedDict([("enc.weight", w), ("dec.weight", w), ("row", w[1]), ("wt", w.t()),
                                    ("half", torch.randn(5).half()), ("bf", torch.randn(5).bfloat16()),
                                    ("f64", torch.randn(3, dtype=torch.float64)),
                                    ("mask", torch.tensor([True, seed % 2 == 0])),
                                    ("steps", torch.tensor([seed, seed + 1], dtype=torch.int32)),
                                    ("nan", torch.tensor([float("nan"), float(seed)]))])


class Evil:
    """Unpickling this in Python would run a shell command."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, ("touch " + self.marker,))


def write_all(d, prefix, make, n=3, protocol=2, **kw):
    paths = []
    for i in range(n):
        p = os.path.join(d, f"{prefix}{i}.pt")
        torch.save(make(i), p, pickle_protocol=protocol, **kw)
        paths.append(p)
    return paths


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.save(state_dict(0), os.path.join(args.out, "state_dict_p2.pt"))
    torch.save(state_dict(0), os.path.join(args.out, "state_dict_p4.pt"), pickle_protocol=4)
    torch.save(lightning(0), os.path.join(args.out, "lightning.ckpt"))
    torch.save(tied(0), os.path.join(args.out, "tied.pt"))
    torch.save(state_dict(0), os.path.join(args.out, "legacy.pt"), _use_new_zipfile_serialization=False)
    torch.save({"w": torch.ones(2), "x": Evil("/tmp/ckptfs-pwned")}, os.path.join(args.out, "evil.pt"))
    save_safetensors({"a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
                      "b": torch.tensor([1, 2], dtype=torch.int64)},
                     os.path.join(args.out, "small.safetensors"), {"format": "pt"})


if __name__ == "__main__":
    sys.exit(main())
