#!/usr/bin/env python3
"""Save-to-visible latency: how long after a SpeechBrain-style save through
MOUNT/exp/new/ the checkpoint is what MOUNT/exp/latest/ selects (issue 11).

For a small checkpoint (a 25k-parameter model) and a 256 MiB one, each save
does what SpeechBrain's Checkpointer.save_checkpoint does (makedirs, CKPT.yaml
first, torch.save per recoverable, a counter), then latest/'s
user.ckptfs.checkpoint xattr is polled every 2 ms. The obvious alternative in
the same run: the same save written straight into the experiment directory
(no atomicity; visible when the watcher's rescan lands). With --before BIN
the same is measured for another ckptfs binary (e.g. a build of the commit
before the change). Best and median of --runs saves each.

Usage: /usr/bin/python3 bench/save_to_visible.py [--ckptfs build/fs/ckptfs]
           [--before OTHER/ckptfs] [--runs 5]
"""
import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch
import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "e2e"))
import mount_util  # noqa: E402

SIZES = {"small (100 KB)": 25_000, "256 MiB": 64 * 1024 * 1024}


def save(exp_dir, name, epoch, state):
    d = os.path.join(exp_dir, name)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "CKPT.yaml"), "w") as f:
        f.write("# yamllint disable\n" + yaml.dump({"unixtime": time.time(), "end-of-epoch": True,
                                                    "loss": 1.0 / epoch, "epoch": epoch}))
    torch.save(state, os.path.join(d, "model.ckpt"))
    with open(os.path.join(d, "counter.ckpt"), "w") as f:
        f.write(str(epoch))


def selected(mnt):
    try:
        return os.getxattr(os.path.join(mnt, "exp", "latest"), "user.ckptfs.checkpoint").decode()
    except OSError:
        return None


def measure(binary, numel, runs, direct):
    tmp = tempfile.mkdtemp(prefix="ckptfs-bench-visible-")
    exp = os.path.join(tmp, "src", "exp")
    state = {"w": torch.randn(numel)}
    save(exp, "CKPT+0", 1, state)
    mount_util.CKPTFS = binary
    latencies, totals = [], []
    try:
        with mount_util.mounted(os.path.join(tmp, "src")) as (mnt, _, _):
            target_dir = exp if direct else os.path.join(mnt, "exp", "new")
            for i in range(1, runs + 1):
                name = f"CKPT+{i}"
                start = time.perf_counter()
                save(target_dir, name, i + 1, state)
                saved = time.perf_counter()
                want = os.path.join(exp, name)
                while selected(mnt) != want:
                    if time.perf_counter() - saved > 120:
                        raise RuntimeError(f"{name} never became latest/")
                    time.sleep(0.002)
                visible = time.perf_counter()
                latencies.append(visible - saved)
                totals.append(visible - start)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return latencies, totals


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckptfs", default=os.path.join(HERE, "..", "build", "fs", "ckptfs"))
    ap.add_argument("--before", help="another ckptfs binary to compare with")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    rows = [("direct into the experiment (watcher)", args.ckptfs, True),
            ("through new/", args.ckptfs, False)]
    if args.before:
        rows.append(("through new/, --before binary", args.before, False))
    print("| checkpoint | how | save | visible after save (best / median) | save to visible (median) |")
    print("|---|---|---|---|---|")
    for size_name, numel in SIZES.items():
        for how, binary, direct in rows:
            lat, tot = measure(os.path.abspath(binary), numel, args.runs, direct)
            save_s = statistics.median(t - l for t, l in zip(tot, lat))
            print(f"| {size_name} | {how} | {save_s * 1000:.0f} ms | {min(lat) * 1000:.0f} / "
                  f"{statistics.median(lat) * 1000:.0f} ms | {statistics.median(tot) * 1000:.0f} ms |",
                  flush=True)


if __name__ == "__main__":
    main()
