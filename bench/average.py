#!/usr/bin/env python3
"""Claim: averaging N checkpoints with ckptfs is faster than doing it in
Python (torch.load each, sum in float32, divide, torch.save: what
SpeechBrain's average_checkpoints and fairseq's average_checkpoints.py do), on
every model shape, through the CLI and through the mount, and the daemon's
memory does not grow with the model.

For each shape of the matrix it writes N checkpoints (SpeechBrain CKPT+i
directories, page cache warmed), then measures in the same run:
  python  the Python loop in a fresh process, timed from its first load to the
          end of its save (interpreter and `import torch` left out);
  cat     `ckptfs cat SRC /exp/avg/lastN/FILE > out`, whole process, cache
          emptied (best of --repeat);
  mount   a fresh `ckptfs mount`, empty cache; the first load of
          MOUNT/exp/avg/lastN/FILE in a Python process (torch.load; for
          safetensors shards, every shard read and parsed), timed around the
          lookup (os.stat: the daemon averages there) and the load, after
          the daemon settled; both parts are printed;
  load    the same load of `cat`'s output from the local disk in a fresh
          process: the reader's own part, which every way of averaging ends
          with (most of it is the fresh process faulting in the memory the
          tensors land in, as it is for the Python loop's first load);
and prints the ratios python/cat and python/mount, the bound python/(lookup +
load) (what the mount would reach if reading through FUSE cost nothing),
and the daemon's peak anonymous memory above its settled baseline (RssAnon
sampled every 2 ms) divided by one checkpoint's size. The averages are
checked against Python's.

Shapes (100M parameters, 400 MB in float32, unless said):
  large    12 tensors of 8M (Linear(2048,4096)/(4096,2048) weights)
  small    2,000 tensors of 50k
  fifty    50 square layers (the shape of this benchmark's first version)
  fp16     `large` in float16 (200 MB)
  bf16     `large` in bfloat16 (200 MB)
  shards   `large` as safetensors in 2 shards with model.safetensors.index.json
  lightning a Lightning checkpoint: state_dict (`large`, 50M parameters) and
           Adam state (exp_avg, exp_avg_sq) beside it, every float averaged
  large10  `large` with N = 10
Usage: /usr/bin/python3 bench/average.py [--ckptfs build/fs/ckptfs] [--shapes large,small,...]
       [--scale 1.0] [--repeat 2]
"""
import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "e2e"))
import mount_util  # noqa: E402

# Minimal safetensors reading and writing (the safetensors package is not a
# Debian package): header length, JSON header, raw little-endian data.
SAFETENSORS = r"""
import json, os, struct, torch
DT = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64}
def load_file(path):
    buf = bytearray(os.path.getsize(path))
    with open(path, "rb", buffering=0) as f:
        view, got = memoryview(buf), 0
        while got < len(buf):
            got += f.readinto(view[got:])
    n = struct.unpack_from("<Q", buf, 0)[0]
    header = json.loads(bytes(buf[8:8 + n]))
    out = {}
    for k, v in header.items():
        if k == "__metadata__":
            continue
        b, e = v["data_offsets"]
        dt = DT[v["dtype"]]
        count = (e - b) // torch.tensor([], dtype=dt).element_size()
        t = torch.frombuffer(buf, dtype=dt, count=count, offset=8 + n + b) if count else torch.empty(0, dtype=dt)
        out[k] = t.reshape(v["shape"])
    return out
def save_file(tensors, path):
    names = {v: k for k, v in DT.items()}
    header, off = {}, 0
    for k, t in tensors.items():
        n = t.numel() * t.element_size()
        header[k] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + n]}
        off += n
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for t in tensors.values():
            f.write(t.contiguous().view(torch.uint8).numpy().data)
"""
exec(SAFETENSORS)

# The Python loop: every floating tensor (nested in dicts and lists, as in a
# Lightning checkpoint) summed in place (+=) in float32 newest first (the
# newest's own float32 tensors are the accumulators), divided, cast back;
# everything else from the newest. Prints the seconds from first load to the
# end of the save.
PYTHON_AVERAGE = SAFETENSORS + r"""
import sys, time
kind, out, groups = sys.argv[1], sys.argv[2], [g.split(",") for g in sys.argv[3:]]
def add(acc, x):
    if torch.is_tensor(x):
        return acc.add_(x) if x.is_floating_point() else acc
    if isinstance(x, dict):
        for k in x:
            acc[k] = add(acc[k], x[k])
        return acc
    if isinstance(x, list):
        return [add(a, b) for a, b in zip(acc, x)]
    return acc
def first(x):
    if torch.is_tensor(x):
        return x.float() if x.is_floating_point() and x.dtype != torch.float32 else x
    if isinstance(x, dict):
        return type(x)((k, first(v)) for k, v in x.items())
    if isinstance(x, list):
        return [first(v) for v in x]
    return x
def finish(acc, newest, n):
    if torch.is_tensor(newest):
        return (acc / n).to(newest.dtype) if newest.is_floating_point() else newest
    if isinstance(newest, dict):
        return type(newest)((k, finish(acc[k], newest[k], n)) for k in newest)
    if isinstance(newest, list):
        return [finish(a, b, n) for a, b in zip(acc, newest)]
    return newest
t = time.perf_counter()
for g, paths in enumerate(groups):
    load = load_file if kind == "safetensors" else torch.load
    avg = newest = None
    for p in paths:
        sd = load(p)
        if avg is None:
            avg, newest = first(sd), sd
        else:
            avg = add(avg, sd)
            del sd
    result = finish(avg, newest, len(paths))
    if kind == "safetensors":
        save_file(result, out + f".{g}")
    else:
        torch.save(result, out + f".{g}")
    del avg, newest, result
print(time.perf_counter() - t)
"""

# The first load of the files in a fresh process: prints the seconds of the
# lookups (os.stat: through the mount, the average is computed there) and of
# the loads, and their sum last. The sum is what a user waits for.
MOUNT_LOAD = SAFETENSORS + r"""
import os, sys, time
kind, paths = sys.argv[1], sys.argv[2:]
t = time.perf_counter()
for p in paths:
    os.stat(p)
lookup = time.perf_counter() - t
for p in paths:
    x = load_file(p) if kind == "safetensors" else torch.load(p)
total = time.perf_counter() - t
print(lookup, total - lookup, total)
"""

LARGE = [(4096, 2048) if j % 2 == 0 else (2048, 4096) for j in range(12)]


def make_state(shape, seed, scale):
    g = torch.Generator().manual_seed(seed)

    def randn(*s):
        return torch.randn(*s, generator=g)

    def sized(s):
        return (max(1, int(s[0] * scale)),) + tuple(s[1:])

    if shape in ("large", "fp16", "bf16", "shards", "large10"):
        sd = {f"layers.{j}.weight": randn(*sized(s)) for j, s in enumerate(LARGE)}
        if shape == "fp16":
            sd = {k: v.half() for k, v in sd.items()}
        if shape == "bf16":
            sd = {k: v.bfloat16() for k, v in sd.items()}
        return sd
    if shape == "small":
        return {f"p{j}": randn(max(1, int(50000 * scale))) for j in range(2000)}
    if shape == "fifty":
        side = int((100e6 * scale / 50) ** 0.5)
        sd = {f"layer{j}.weight": randn(side, side) for j in range(50)}
        sd["step"] = torch.tensor(seed)
        return sd
    if shape == "lightning":
        weights = {f"layers.{j}.weight": randn(*sized(s)) for j, s in enumerate(LARGE[:6])}
        state = {i: {"step": torch.tensor(float(seed + 1)), "exp_avg": randn(*v.shape),
                     "exp_avg_sq": randn(*v.shape).abs()} for i, v in enumerate(weights.values())}
        return {"epoch": seed, "global_step": 100 * seed, "pytorch-lightning_version": "1.9.0",
                "state_dict": weights,
                "optimizer_states": [{"state": state, "param_groups": [{"lr": 1e-3, "params": list(state)}]}],
                "lr_schedulers": [], "hyper_parameters": {"lr": 1e-3, "hidden": 2048}}
    raise ValueError(shape)


def write_experiment(exp, shape, n, scale):
    """CKPT+i directories (CKPT+{n-1} newest); returns (kind, [file names], bytes of one member)."""
    for i in range(n):
        d = os.path.join(exp, f"CKPT+{i}")
        os.makedirs(d)
        with open(os.path.join(d, "CKPT.yaml"), "w") as f:
            f.write(f"unixtime: {1000 + i}\n")
        sd = make_state(shape, i, scale)
        if shape == "shards":
            keys = list(sd)
            half = len(keys) // 2
            names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
            weight_map = {}
            for name, part in zip(names, (keys[:half], keys[half:])):
                save_file({k: sd[k] for k in part}, os.path.join(d, name))
                weight_map.update({k: name for k in part})
            with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {}, "weight_map": weight_map}, f)
        else:
            torch.save(sd, os.path.join(d, "model.ckpt"))
        del sd
    first = os.path.join(exp, "CKPT+0")
    if shape == "shards":
        names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
        return "safetensors", names, sum(os.path.getsize(os.path.join(first, x)) for x in names)
    return "torch", ["model.ckpt"], os.path.getsize(os.path.join(first, "model.ckpt"))


def warm(path):
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                while f.read(1 << 24):
                    pass


def rss_anon_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class Sampler:
    """Peak RssAnon of pid, sampled every 2 ms while running."""

    def __init__(self, pid):
        self.pid, self.peak, self.done = pid, 0, threading.Event()
        self.thread = threading.Thread(target=self.run)

    def run(self):
        while not self.done.is_set():
            self.peak = max(self.peak, rss_anon_kib(self.pid))
            time.sleep(0.002)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()


def python_loop(kind, members, out):
    p = subprocess.run([sys.executable, "-c", PYTHON_AVERAGE, kind, out, *members],
                       capture_output=True, text=True, check=True)
    return float(p.stdout.split()[-1])


def check_same(kind, want_path, got_path):
    if kind == "safetensors":
        a, b = load_file(want_path), load_file(got_path)
    else:
        a, b = torch.load(want_path), torch.load(got_path)

    def same(x, y, where):
        if torch.is_tensor(x):
            assert x.dtype == y.dtype and x.shape == y.shape, where
            assert torch.equal(x, y) or torch.allclose(x.float(), y.float(), atol=1e-6), where
        elif isinstance(x, dict):
            assert list(x) == list(y), where
            for k in x:
                same(x[k], y[k], f"{where}.{k}")
        elif isinstance(x, list):
            for i, (u, v) in enumerate(zip(x, y)):
                same(u, v, f"{where}[{i}]")
    same(a, b, want_path)


def bench_shape(ckptfs, shape, scale, repeat, tmp):
    n = 10 if shape.endswith("10") else 3
    src = os.path.join(tmp, "src")
    exp = os.path.join(src, "exp")
    kind, names, size = write_experiment(exp, shape, n, scale)
    warm(src)
    members = [",".join(os.path.join(exp, f"CKPT+{i}", name) for i in reversed(range(n))) for name in names]
    py_out = os.path.join(tmp, "py.out")
    py_t = python_loop(kind, members, py_out)

    index = os.path.join(tmp, "index.sqlite")
    cache = os.path.join(tmp, "cache")
    cat_t = None
    for _ in range(repeat):
        shutil.rmtree(cache, ignore_errors=True)
        t = time.perf_counter()
        for g, name in enumerate(names):
            with open(os.path.join(tmp, f"cat.out.{g}"), "wb") as out:
                subprocess.run([ckptfs, "cat", "--index", index, "--avg-cache", cache, src,
                                f"/exp/avg/last{n}/{name}"], stdout=out, stderr=subprocess.DEVNULL, check=True)
        t = time.perf_counter() - t
        cat_t = t if cat_t is None else min(cat_t, t)
    for g in range(len(names)):
        check_same(kind, f"{py_out}.{g}", os.path.join(tmp, f"cat.out.{g}"))
    # The reader's own part: loading a finished average from the local disk
    # in a fresh process (what any way of averaging ends with).
    cat_outs = [os.path.join(tmp, f"cat.out.{g}") for g in range(len(names))]
    p = subprocess.run([sys.executable, "-c", MOUNT_LOAD, kind, *cat_outs],
                       capture_output=True, text=True, check=True)
    load_t = float(p.stdout.split()[-1])

    shutil.rmtree(cache, ignore_errors=True)
    with mount_util.mounted(src, "--avg-cache", cache, index=index) as (mnt, proc, _):
        time.sleep(3)  # the daemon settles: plugin preloaded, first scan done
        base = rss_anon_kib(proc.pid)
        with Sampler(proc.pid) as sampler:
            paths = [os.path.join(mnt, "exp", f"avg/last{n}", name) for name in names]
            p = subprocess.run([sys.executable, "-c", MOUNT_LOAD, kind, *paths],
                               capture_output=True, text=True, check=True)
        lookup_t, _, mount_t = (float(x) for x in p.stdout.split()[-3:])
    growth = max(0, sampler.peak - base) / 1024
    shutil.rmtree(src)
    shutil.rmtree(cache, ignore_errors=True)
    return {"shape": shape, "n": n, "mib": size / 2**20, "python": py_t, "cat": cat_t, "mount": mount_t,
            "load": load_t, "lookup": lookup_t,
            "growth": growth, "growth_ratio": growth / (size / 2**20)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckptfs", default=os.path.join(HERE, "..", "build", "fs", "ckptfs"))
    ap.add_argument("--shapes", default="large,small,fifty,fp16,bf16,shards,lightning,large10")
    ap.add_argument("--scale", type=float, default=1.0, help="model size factor (1.0: 100M parameters)")
    ap.add_argument("--repeat", type=int, default=2, help="cat runs per shape, best kept")
    ap.add_argument("--tmp", default=None, help="where to write the checkpoints (default: $TMPDIR)")
    args = ap.parse_args()
    ckptfs = os.path.abspath(args.ckptfs)
    mount_util.CKPTFS = ckptfs
    with open("/proc/loadavg") as f:
        load_before = f.read().split()[:3]
    print(f"{os.cpu_count()} CPU(s), load average before: {' '.join(load_before)}; page cache hot")
    print(f"{'shape':10} {'N':>3} {'MiB':>6} {'python s':>9} {'cat s':>7} {'mount s':>8} "
          f"{'(lookup':>8} {'+ load)':>7} {'load s':>7} {'py/cat':>7} {'py/mount':>9} {'bound':>7} "
          f"{'daemon anon MiB':>16} {'/model':>7}")
    for shape in args.shapes.split(","):
        tmp = tempfile.mkdtemp(prefix="ckptfs-bench-avg-", dir=args.tmp)
        try:
            r = bench_shape(ckptfs, shape, args.scale, args.repeat, tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        print(f"{r['shape']:10} {r['n']:>3} {r['mib']:>6.0f} {r['python']:>9.2f} {r['cat']:>7.2f} "
              f"{r['mount']:>8.2f} {r['lookup']:>8.2f} {r['mount'] - r['lookup']:>7.2f} {r['load']:>7.2f} "
              f"{r['python'] / r['cat']:>6.2f}x {r['python'] / r['mount']:>8.2f}x "
              f"{r['python'] / (r['lookup'] + r['load']):>6.2f}x "
              f"{r['growth']:>16.0f} {r['growth_ratio']:>7.3f}", flush=True)
    with open("/proc/loadavg") as f:
        print(f"load average after: {' '.join(f.read().split()[:3])}")


if __name__ == "__main__":
    main()
