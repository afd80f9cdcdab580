#!/usr/bin/env python3
"""Claim: writing a checkpoint through new/ runs at nearly the speed of writing
it directly (goal: at least 0.8x).

Writes SIZE_MB (default 1024) with 1 MiB writes, then fsync, directly into the
experiment and through MOUNT/exp/new/NAME/ in the same run (3 runs each,
best), and torch.save of a 256 MiB state_dict both ways; once with the
default new/ (data through the daemon) and once with --direct-new (new/NAME
is a symbolic link into the staging area); prints throughputs and ratios.
Usage: /usr/bin/python3 bench/write_through_new.py [--ckptfs build/fs/ckptfs] [--size-mb 1024]
"""
import argparse
import os
import shutil
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "e2e"))
import mount_util  # noqa: E402


def write_file(path, size_mb):
    chunk = os.urandom(1 << 20)
    t = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        for _ in range(size_mb):
            f.write(chunk)
        os.fsync(f.fileno())
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckptfs", default=os.path.join(HERE, "..", "build", "fs", "ckptfs"))
    ap.add_argument("--size-mb", type=int, default=1024)
    args = ap.parse_args()
    mount_util.CKPTFS = os.path.abspath(args.ckptfs)
    tmp = tempfile.mkdtemp(prefix="ckptfs-bench-write-")
    try:
        exp = os.path.join(tmp, "src", "exp")
        os.makedirs(os.path.join(exp, "CKPT+0"))
        with open(os.path.join(exp, "CKPT+0", "CKPT.yaml"), "w") as f:
            f.write("unixtime: 1\n")
        sd = {f"l{i}": torch.randn(8 << 20) for i in range(8)}  # 256 MiB
        print(f"write {args.size_mb} MiB with 1 MiB writes + fsync, and torch.save of 256 MiB; best of 3")
        rows = []
        for mode, options in (("new/", ()), ("new/ --direct-new", ("--direct-new",))):
            with mount_util.mounted(os.path.join(tmp, "src"), "--explicit-commit", *options) as (mnt, _, _):
                new = os.path.join(mnt, "exp", "new")
                for label, fn in (("raw write", lambda d: write_file(os.path.join(d, "big.bin"), args.size_mb)),
                                  ("torch.save", lambda d: _timed_save(sd, os.path.join(d, "m.ckpt")))):
                    direct, mounted_t = [], []
                    for i in range(3):
                        d = os.path.join(exp, f"direct{label[0]}{i}")
                        os.makedirs(d)
                        direct.append(fn(d))
                        shutil.rmtree(d)
                        v = os.path.join(new, f"via{label[0]}{i}")
                        os.mkdir(v)
                        mounted_t.append(fn(v))
                        shutil.rmtree(os.path.realpath(v))  # --direct-new: v is a link to staging
                    size = args.size_mb if label == "raw write" else 256
                    a, b = min(direct), min(mounted_t)
                    rows.append((label, mode, size / 1024 / a, size / 1024 / b, a / b))
        for label, mode, d, m, r in rows:
            print(f"  {label:10}  direct {d:6.2f} GiB/s   through {mode:18} {m:6.2f} GiB/s   ratio {r:.2f}x")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _timed_save(obj, path):
    t = time.perf_counter()
    torch.save(obj, path)
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    return time.perf_counter() - t


if __name__ == "__main__":
    main()
