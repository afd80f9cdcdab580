#!/usr/bin/env python3
"""Claims: stat of a view path costs what stat of the real file costs (kernel
caches stay on), a view moves soon after training writes a new checkpoint,
and a mount of many checkpoints answers quickly.

Builds an experiment of N SpeechBrain checkpoints (default 100,000) and prints:
  time until `ckptfs mount` returns ready: cold (no index) and warm (index kept),
  repeated os.stat of best/min/loss/mdl.ckpt against os.stat of the real file,
  after a new best checkpoint is written: time until best/min/loss shows it,
  and the first stat of best/min/loss/mdl.ckpt after the move.
Usage: /usr/bin/python3 bench/stat_and_startup.py [--ckptfs build/fs/ckptfs] [--n 100000]
"""
import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "e2e"))
from mount_util import unmount, wait_for  # noqa: E402


def make_experiment(exp, n):
    rng = random.Random(42)
    for i in range(n):
        d = os.path.join(exp, "CKPT+%07d" % i)
        os.makedirs(d)
        with open(os.path.join(d, "CKPT.yaml"), "w") as f:
            f.write("end-of-epoch: true\nepoch: %d\nloss: %.6f\nunixtime: %d\n"
                    % (i, rng.uniform(0.1, 5.0), 1_700_000_000 + i))
        with open(os.path.join(d, "mdl.ckpt"), "wb") as f:
            f.write(b"x" * 64)


def time_stats(path, count):
    stat = os.stat
    t = time.perf_counter()
    for _ in range(count):
        stat(path)
    return (time.perf_counter() - t) / count


def mount_ready(ckptfs, src, mnt, index):
    t = time.perf_counter()
    subprocess.run([ckptfs, "mount", "--index", index, src, mnt], check=True)
    os.stat(os.path.join(mnt, "exp", "best", "min", "loss", "mdl.ckpt"))
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckptfs", default=os.path.join(HERE, "..", "build", "fs", "ckptfs"))
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--stats", type=int, default=200_000)
    args = ap.parse_args()
    ckptfs = os.path.abspath(args.ckptfs)
    tmp = tempfile.mkdtemp(prefix="ckptfs-bench-stat-")
    mnt = os.path.join(tmp, "mnt")
    os.makedirs(mnt)
    try:
        src = os.path.join(tmp, "src")
        exp = os.path.join(src, "exp")
        t = time.perf_counter()
        make_experiment(exp, args.n)
        print(f"{args.n} SpeechBrain checkpoints (built in {time.perf_counter() - t:.1f} s)")
        index = os.path.join(tmp, "index.sqlite")

        cold = mount_ready(ckptfs, src, mnt, index)
        unmount(mnt)
        wait_for(lambda: not os.path.ismount(mnt))
        warm = mount_ready(ckptfs, src, mnt, index)
        # The watcher adds its watches and rescans once after start; measure
        # the steady state, not that start-up work.
        time.sleep(max(3.0, args.n / 20000))
        print(f"  mount until it answers, cold index          {cold * 1e3:10.1f} ms")
        print(f"  mount until it answers, warm index          {warm * 1e3:10.1f} ms")

        view = os.path.join(mnt, "exp", "best", "min", "loss", "mdl.ckpt")
        best = os.getxattr(view, "user.ckptfs.real_path").decode()
        time_stats(view, 1000), time_stats(best, 1000)
        t_view = time_stats(view, args.stats)
        t_real = time_stats(best, args.stats)
        print(f"  stat real file                              {t_real * 1e6:10.2f} us")
        print(f"  stat best/min/loss/mdl.ckpt                 {t_view * 1e6:10.2f} us   {t_view / t_real:.2f}x")

        d = os.path.join(exp, "CKPT+new")
        t0 = time.perf_counter()
        os.makedirs(d)
        with open(os.path.join(d, "CKPT.yaml"), "w") as f:
            f.write("loss: 0.0001\nunixtime: 1900000000\n")
        with open(os.path.join(d, "mdl.ckpt"), "wb") as f:
            f.write(b"y" * 64)
        target = os.path.join(d, "mdl.ckpt")
        moved = wait_for(lambda: os.getxattr(os.path.join(mnt, "exp", "best", "min", "loss"),
                                             "user.ckptfs.real_path").decode() == d,
                         timeout=10, interval=0.001)
        t_move = time.perf_counter() - t0
        # The xattr poll above looked up best/min/loss again; drop it from the
        # kernel's cache by moving the view back and forth is not possible, so
        # time the first stat of the file below it, which is not cached yet.
        t1 = time.perf_counter()
        st = os.stat(view)
        t_first = time.perf_counter() - t1
        assert moved and st.st_size == os.stat(target).st_size
        print(f"  new best written -> best/min/loss shows it  {t_move * 1e3:10.1f} ms")
        print(f"  first stat of best/min/loss/mdl.ckpt after  {t_first * 1e6:10.1f} us   "
              f"{t_first / t_real:.0f}x a cached stat")
        t_again = time_stats(view, 10000)
        print(f"  later stats of it                           {t_again * 1e6:10.2f} us   {t_again / t_real:.2f}x")
    finally:
        unmount(mnt)
        wait_for(lambda: not os.path.ismount(mnt))
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
