#!/usr/bin/env python3
"""Claim: converting a checkpoint to safetensors through the mount
(MOUNT/exp/safetensors/latest/model.safetensors) is at least 3x faster than
the Python way, and the daemon's memory stays bounded as for averages.

The Python way (what conversion scripts do, in a fresh process, timed from
the load to the end of the write; interpreter and `import torch` left out):
torch.load the checkpoint, then write the safetensors bytes by hand with numpy
(header length, JSON header, each tensor's raw bytes; the safetensors package
is not a Debian package). It runs the checkpoint's pickle; ckptfs does not.

For each shape (one SpeechBrain CKPT+0 directory holding model.ckpt, page
cache hot) it measures in the same run:
  python  the Python way above;
  cat     `ckptfs cat SRC /exp/safetensors/latest/model.safetensors > out`,
          whole process, cache emptied (best of --repeat);
  mount   a fresh mount, empty cache: open and read the whole of
          MOUNT/exp/safetensors/latest/model.safetensors in a fresh process,
          timed around the open and the reads (the open alone, which holds
          the conversion, is printed too), after the daemon settled;
and prints the ratios and the daemon's peak anonymous memory (RssAnon sampled
every 2 ms) above its settled baseline, divided by the checkpoint's size. The
conversions are checked tensor by tensor against Python's.

Shapes (100M parameters, 400 MB in float32): large (12 tensors of 8M,
Linear(2048,4096)/(4096,2048) weights) and small (2,000 tensors of 50k).
Sampling, mounting and the model shapes are bench/average.py's.
Usage: /usr/bin/python3 bench/convert.py [--ckptfs build/fs/ckptfs] [--shapes large,small]
       [--scale 1.0] [--repeat 2]
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import average  # noqa: E402  (bench/average.py: shapes, sampler, mount helpers)

mount_util = average.mount_util

# torch.load + safetensors bytes written by hand with numpy. Prints seconds.
PYTHON_CONVERT = r"""
import json, struct, sys, time
import numpy as np
import torch
DT = {torch.float32: "F32", torch.float16: "F16", torch.float64: "F64", torch.int64: "I64",
      torch.int32: "I32", torch.bfloat16: "BF16"}
src, out = sys.argv[1], sys.argv[2]
t = time.perf_counter()
sd = torch.load(src)
header, off, arrays = {}, 0, []
for k, v in sd.items():
    a = v.contiguous()
    a = a.view(torch.int16).numpy() if a.dtype == torch.bfloat16 else a.numpy()
    header[k] = {"dtype": DT[v.dtype], "shape": list(v.shape), "data_offsets": [off, off + a.nbytes]}
    off += a.nbytes
    arrays.append(a)
h = json.dumps(header, separators=(",", ":")).encode()
h += b" " * (-len(h) % 8)
with open(out, "wb") as f:
    f.write(struct.pack("<Q", len(h)))
    f.write(h)
    for a in arrays:
        f.write(memoryview(np.ascontiguousarray(a)).cast("B"))
print(time.perf_counter() - t)
"""

# Reads a file whole through the mount, as a loader would. Prints seconds to
# the open's return and to the end of the reads.
MOUNT_READ = r"""
import sys, time
t = time.perf_counter()
with open(sys.argv[1], "rb", buffering=0) as f:
    opened = time.perf_counter() - t  # lookup: the conversion runs here
    buf = bytearray(16 << 20)
    while f.readinto(buf):
        pass
print(opened, time.perf_counter() - t)
"""


def check_same(want_path, got_path):
    a, b = average.load_file(want_path), average.load_file(got_path)
    assert sorted(a) == sorted(b), (want_path, got_path)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


def bench_shape(ckptfs, shape, scale, repeat, tmp):
    src = os.path.join(tmp, "src")
    exp = os.path.join(src, "exp")
    _, _, size = average.write_experiment(exp, shape, 1, scale)
    average.warm(src)
    member = os.path.join(exp, "CKPT+0", "model.ckpt")
    vpath = "/exp/safetensors/latest/model.safetensors"
    py_out = os.path.join(tmp, "py.safetensors")
    p = subprocess.run([sys.executable, "-c", PYTHON_CONVERT, member, py_out],
                       capture_output=True, text=True, check=True)
    py_t = float(p.stdout.split()[-1])

    index = os.path.join(tmp, "index.sqlite")
    cache = os.path.join(tmp, "cache")
    cat_out = os.path.join(tmp, "cat.safetensors")
    cat_t = None
    for _ in range(repeat):
        shutil.rmtree(cache, ignore_errors=True)
        t = time.perf_counter()
        with open(cat_out, "wb") as out:
            subprocess.run([ckptfs, "cat", "--index", index, "--avg-cache", cache, src, vpath],
                           stdout=out, stderr=subprocess.DEVNULL, check=True)
        t = time.perf_counter() - t
        cat_t = t if cat_t is None else min(cat_t, t)
    check_same(py_out, cat_out)

    shutil.rmtree(cache, ignore_errors=True)
    with mount_util.mounted(src, "--avg-cache", cache, index=index) as (mnt, proc, _):
        time.sleep(3)  # the daemon settles: first scan done (a benchmark, not a test)
        base = average.rss_anon_kib(proc.pid)
        with average.Sampler(proc.pid) as sampler:
            p = subprocess.run([sys.executable, "-c", MOUNT_READ, mnt + vpath],
                               capture_output=True, text=True, check=True)
        open_t, mount_t = (float(x) for x in p.stdout.split()[-2:])
        check_same(py_out, mnt + vpath)
    growth = max(0, sampler.peak - base) / 1024
    return {"shape": shape, "mib": size / 2**20, "python": py_t, "cat": cat_t, "mount": mount_t,
            "open": open_t, "growth": growth, "growth_ratio": growth / (size / 2**20)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckptfs", default=os.path.join(HERE, "..", "build", "fs", "ckptfs"))
    ap.add_argument("--shapes", default="large,small")
    ap.add_argument("--scale", type=float, default=1.0, help="model size factor (1.0: 100M parameters)")
    ap.add_argument("--repeat", type=int, default=2, help="cat runs per shape, best kept")
    ap.add_argument("--tmp", default=None, help="where to write the checkpoints (default: $TMPDIR)")
    args = ap.parse_args()
    ckptfs = os.path.abspath(args.ckptfs)
    mount_util.CKPTFS = ckptfs
    with open("/proc/loadavg") as f:
        load_before = f.read().split()[:3]
    print(f"{os.cpu_count()} CPU(s), load average before: {' '.join(load_before)}; page cache hot")
    print(f"{'shape':8} {'MiB':>6} {'python s':>9} {'cat s':>7} {'mount s':>8} "
          f"{'py/cat':>7} {'py/mount':>9} {'open s':>7} {'daemon anon MiB':>16} {'/model':>7}")
    for shape in args.shapes.split(","):
        tmp = tempfile.mkdtemp(prefix="ckptfs-bench-convert-", dir=args.tmp)
        try:
            r = bench_shape(ckptfs, shape, args.scale, args.repeat, tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        print(f"{r['shape']:8} {r['mib']:>6.0f} {r['python']:>9.2f} {r['cat']:>7.2f} "
              f"{r['mount']:>8.2f} {r['python'] / r['cat']:>6.2f}x {r['python'] / r['mount']:>8.2f}x "
              f"{r['open']:>7.2f} {r['growth']:>16.0f} {r['growth_ratio']:>7.3f}", flush=True)
    with open("/proc/loadavg") as f:
        print(f"load average after: {' '.join(f.read().split()[:3])}")


if __name__ == "__main__":
    main()
