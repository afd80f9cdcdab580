#!/usr/bin/env python3
"""Claim: averaging N checkpoints with ckptfs is faster than doing it in
Python with torch.load + sum + torch.save (what SpeechBrain's
average_checkpoints and fairseq's average_checkpoints.py do), and its memory
does not grow with the model.

Writes N (default 3) state_dicts of a PARAMS-parameter model (default 100M,
about 400 MB each, 50 layers) with torch.save, warms the page cache, then
times in the same run, each in a fresh process:
  python: torch.load each, sum in float32, divide, torch.save
  ckptfs: `ckptfs cat SRC /exp/avg/lastN/model.ckpt > out` (cache emptied first)
and prints both times, the ratio, and each process's peak RSS above its
baseline (an empty run of the same program).
Usage: /usr/bin/python3 bench/average.py [--ckptfs build/fs/ckptfs] [--params 100e6] [--n 3]
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))

PYTHON_AVERAGE = r"""
import sys, torch
paths, out = sys.argv[1:-1], sys.argv[-1]
avg = None
for p in paths:
    sd = torch.load(p)
    if avg is None:
        avg = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    else:
        for k, v in sd.items():
            if v.is_floating_point():
                avg[k] += v.float()
    del sd
for k, v in avg.items():
    if v.is_floating_point():
        avg[k] = (v / len(paths))
torch.save(avg, out)
"""


def rss_anon_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def run(cmd, stdout=subprocess.DEVNULL):
    """Runs cmd; returns (seconds, peak anonymous RSS in MiB, sampled every 2 ms).
    Anonymous memory is what the process allocated: the page cache of files it
    reads or maps, and shared libraries, are left out."""
    peak = [0]
    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=stdout, stderr=subprocess.DEVNULL)
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_anon_kib(p.pid))
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    rc = p.wait()
    elapsed = time.perf_counter() - t
    done.set()
    sampler.join()
    if rc != 0:
        raise SystemExit(f"{cmd[0]} failed")
    return elapsed, peak[0] / 1024


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckptfs", default=os.path.join(HERE, "..", "build", "fs", "ckptfs"))
    ap.add_argument("--params", type=float, default=100e6)
    ap.add_argument("--n", type=int, default=3)
    ap.add_argument("--layers", type=int, default=50)
    args = ap.parse_args()
    ckptfs = os.path.abspath(args.ckptfs)
    tmp = tempfile.mkdtemp(prefix="ckptfs-bench-avg-")
    try:
        exp = os.path.join(tmp, "src", "exp")
        per_layer = int(args.params / args.layers)
        side = int(per_layer ** 0.5)
        paths = []
        for i in range(args.n):
            d = os.path.join(exp, f"CKPT+{i}")
            os.makedirs(d)
            with open(os.path.join(d, "CKPT.yaml"), "w") as f:
                f.write(f"unixtime: {1000 + i}\n")
            torch.manual_seed(i)
            sd = {f"layer{j}.weight": torch.randn(side, side) for j in range(args.layers)}
            sd["step"] = torch.tensor(i)
            p = os.path.join(d, "model.ckpt")
            torch.save(sd, p)
            paths.append(p)
            del sd
        size_mb = os.path.getsize(paths[0]) / 2**20
        params = args.layers * side * side
        print(f"average {args.n} checkpoints of {params / 1e6:.0f}M parameters ({size_mb:.0f} MiB each), "
              f"page cache hot")
        for p in paths:
            with open(p, "rb") as f:
                while f.read(1 << 24):
                    pass

        py_t, py_rss = run([sys.executable, "-c", PYTHON_AVERAGE, *paths[::-1], os.path.join(tmp, "py.ckpt")])
        index = os.path.join(tmp, "index.sqlite")
        cache = os.path.join(tmp, "cache")
        best = None
        for _ in range(3):
            shutil.rmtree(cache, ignore_errors=True)
            with open(os.path.join(tmp, "cf.ckpt"), "wb") as out:
                t, rss = run([ckptfs, "cat", "--index", index, "--avg-cache", cache, os.path.join(tmp, "src"),
                              f"/exp/avg/last{args.n}/model.ckpt"], stdout=out)
            best = (t, rss) if best is None or t < best[0] else best
        cf_t, cf_rss = best
        # Both give the same average.
        a, b = torch.load(os.path.join(tmp, "py.ckpt")), torch.load(os.path.join(tmp, "cf.ckpt"))
        assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a), "outputs differ"
        print(f"  python torch.load+sum+save   {py_t:8.2f} s   peak anonymous memory {py_rss:6.0f} MiB")
        print(f"  ckptfs cat avg/last{args.n}         {cf_t:8.2f} s   peak anonymous memory {cf_rss:6.0f} MiB"
              f"   (best of 3, cache emptied, output fsynced)")
        print(f"  ratio python / ckptfs        {py_t / cf_t:8.2f}x")
        print(f"  ckptfs peak anonymous memory / one model size   {cf_rss / size_mb:.3f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
