#!/usr/bin/env python3
"""Claim: loading a checkpoint through the mount costs about what loading the
real file costs, and --links costs nothing.

Builds one experiment with a state_dict of SIZE_MB (default 256), mounts it in
the default mode and with --links, and prints, page cache hot for the real file:
  torch.load of the real file (the baseline),
  torch.load of best/min/loss/mdl.ckpt: first load, and repeat loads,
  sequential read of a 1 GiB file: direct, first read through the mount, re-read,
each with its ratio to the baseline.
Usage: /usr/bin/python3 bench/load_through_mount.py [--ckptfs build/fs/ckptfs] [--size-mb 256] [--repeat 5]
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "e2e"))
import mount_util  # noqa: E402


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def read_all(path, bufsize=1 << 20):
    buf = bytearray(bufsize)
    view = memoryview(buf)
    n = 0
    with open(path, "rb", buffering=0) as f:
        while True:
            got = f.readinto(view)
            if not got:
                return n
            n += got


def drop_caches():
    try:
        subprocess.run(["sync"], check=True)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckptfs", default=os.path.join(HERE, "..", "build", "fs", "ckptfs"))
    ap.add_argument("--size-mb", type=int, default=256)
    ap.add_argument("--read-gb", type=float, default=1.0)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    mount_util.CKPTFS = os.path.abspath(args.ckptfs)
    torch.set_num_threads(1)

    tmp = tempfile.mkdtemp(prefix="ckptfs-bench-load-")
    try:
        exp = os.path.join(tmp, "src", "exp")
        ckpt = os.path.join(exp, "CKPT+1")
        os.makedirs(ckpt)
        with open(os.path.join(ckpt, "CKPT.yaml"), "w") as f:
            f.write("unixtime: 1\nloss: 0.5\n")
        n = args.size_mb * (1 << 20) // 4 // 8
        torch.save({f"layer{i}.weight": torch.randn(n) for i in range(8)}, os.path.join(ckpt, "mdl.ckpt"))
        big = os.path.join(ckpt, "big.bin")
        with open(big, "wb") as f:
            chunk = os.urandom(1 << 24)
            for _ in range(int(args.read_gb * 64)):
                f.write(chunk)
        real = os.path.join(ckpt, "mdl.ckpt")
        size_mb = os.path.getsize(real) / 2**20
        print(f"torch.load of a {size_mb:.0f} MiB state_dict; sequential read of {args.read_gb:g} GiB; "
              f"median of {args.repeat}")

        read_all(real), read_all(big)  # page cache hot
        base = statistics.median(timed(lambda: torch.load(real)) for _ in range(args.repeat))
        base_read = statistics.median(timed(lambda: read_all(big)) for _ in range(3))
        gib = os.path.getsize(big) / 2**30
        print(f"  direct torch.load                         {base * 1e3:9.1f} ms   1.00x")
        print(f"  direct read                               {gib / base_read:9.2f} GiB/s")

        for mode, opts in (("default", ()), ("--links", ("--links",))):
            with mount_util.mounted(os.path.join(tmp, "src"), *opts) as (mnt, _, _):
                path = os.path.join(mnt, "exp", "best", "min", "loss", "mdl.ckpt")
                first = timed(lambda: torch.load(path))
                again = statistics.median(timed(lambda: torch.load(path)) for _ in range(args.repeat))
                print(f"  {mode:8} first torch.load                {first * 1e3:9.1f} ms   {first / base:.2f}x")
                print(f"  {mode:8} repeat torch.load               {again * 1e3:9.1f} ms   {again / base:.2f}x")
                vbig = os.path.join(mnt, "exp", "best", "min", "loss", "big.bin")
                t1 = timed(lambda: read_all(vbig))
                t2 = statistics.median(timed(lambda: read_all(vbig)) for _ in range(3))
                print(f"  {mode:8} first read                      {gib / t1:9.2f} GiB/s  {base_read / t1:.2f}x of direct speed")
                print(f"  {mode:8} re-read                         {gib / t2:9.2f} GiB/s  {base_read / t2:.2f}x of direct speed")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
