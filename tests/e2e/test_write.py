"""End-to-end tests of writing checkpoints through new/ and of retention
(DESIGN.md §4, §5): real mounts, real torch.save writers, real torch.load
readers, and a daemon killed with SIGKILL at many points."""
import errno
import os
import random
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import unittest

import torch
import yaml

import experiments
from mount_util import CKPTFS, checkpoint_of, errno_of, mounted, unmount, wait_for


def read(path):
    with open(path) as f:
        return f.read()


def sb_save(new_dir, name, meta, seed, size=1000):
    """What SpeechBrain's Checkpointer.save_checkpoint does: mkdir CKPT+...,
    write CKPT.yaml first, then one torch.save per recoverable."""
    d = os.path.join(new_dir, "CKPT+" + name)
    os.mkdir(d)
    with open(os.path.join(d, "CKPT.yaml"), "w") as f:
        f.write("# yamllint disable\n" + yaml.dump(meta))
    torch.manual_seed(seed)
    torch.save({"w": torch.randn(size), "b": torch.randn(4)}, os.path.join(d, "model.ckpt"))
    torch.save({"step": torch.tensor(seed)}, os.path.join(d, "counter.ckpt"))
    return d


class WriteTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="ckptfs-e2e-write-")
        self.src = os.path.join(self.tmp, "src")
        self.exp = os.path.join(self.src, "exp")
        experiments.speechbrain(self.exp, [("1", {"unixtime": 100, "loss": 0.9, "epoch": 1})])
        # The files sb_save writes: a checkpoint holding its predecessor's
        # files commits after the short quiet period (--commit-quiet).
        os.rename(os.path.join(self.exp, "CKPT+1", "mdl.ckpt"), os.path.join(self.exp, "CKPT+1", "model.ckpt"))

    def tearDown(self):
        shutil.rmtree(self.tmp, ignore_errors=True)

    def test_speechbrain_writer_commits_atomically(self):
        with mounted(self.src, "--commit-quiet", "0.5") as (mnt, _, _):
            new = os.path.join(mnt, "exp", "new")
            sb_save(new, "2", {"unixtime": 200, "loss": 0.5, "epoch": 2}, seed=2)
            # Not visible to queries until committed...
            self.assertEqual(checkpoint_of(os.path.join(mnt, "exp", "latest")), os.path.join(self.exp, "CKPT+1"))
            self.assertIn("CKPT+2", os.listdir(new))
            # ...then moved into the experiment and indexed.
            self.assertTrue(wait_for(lambda: checkpoint_of(os.path.join(mnt, "exp", "latest"))
                                     == os.path.join(self.exp, "CKPT+2"), timeout=5))
            self.assertEqual(sorted(os.listdir(new)), ["CKPT+1", "CKPT+2"])  # new/ is the experiment
            loaded = torch.load(os.path.join(mnt, "exp", "latest", "model.ckpt"))
            torch.manual_seed(2)
            self.assertTrue(torch.equal(loaded["w"], torch.randn(1000)))
            self.assertFalse(os.path.exists(os.path.join(self.exp, ".ckptfs-staging", "CKPT+2")))
            self.assertNotIn(".ckptfs-staging", os.listdir(os.path.join(mnt, "exp")))

    def test_cp_r_single_file_and_native_layouts(self):
        other = os.path.join(self.tmp, "elsewhere")
        experiments.speechbrain(other, [("copied", {"unixtime": 300, "loss": 0.1})])
        # --commit-wait: the copied checkpoint holds mdl.ckpt, not model.ckpt
        # like its predecessor, so it waits for the longer quiet period.
        with mounted(self.src, "--commit-quiet", "0.3", "--commit-wait", "1") as (mnt, _, _):
            new = os.path.join(mnt, "exp", "new")
            subprocess.run(["cp", "-r", os.path.join(other, "CKPT+copied"), new], check=True)
            torch.save({"w": torch.ones(2)}, os.path.join(new, "epoch=3-step=30-val_loss=0.25.ckpt"))
            os.mkdir(os.path.join(new, "run9"))
            torch.save({"w": torch.zeros(2)}, os.path.join(new, "run9", "model.pt"))
            with open(os.path.join(new, "run9", "meta.json"), "w") as f:
                f.write('{"loss": 0.05, "unixtime": 50}')
            best = os.path.join(mnt, "exp", "best", "min", "loss")
            self.assertTrue(wait_for(lambda: os.path.exists(os.path.join(self.exp, "run9")), timeout=5))
            self.assertTrue(wait_for(lambda: checkpoint_of(best) == os.path.join(self.exp, "run9"), timeout=5))
            self.assertTrue(wait_for(lambda: os.path.exists(os.path.join(self.exp, "CKPT+copied")), timeout=5))
            self.assertTrue(wait_for(lambda: os.path.exists(
                os.path.join(mnt, "exp", "best", "min", "val_loss", "checkpoint.ckpt")), timeout=5))
            self.assertEqual(torch.load(os.path.join(mnt, "exp", "best", "min", "val_loss",
                                                     "checkpoint.ckpt"))["w"].tolist(), [1.0, 1.0])

    def test_errors_and_partial_files(self):
        # --commit-wait: CKPT+partial lacks counter.ckpt; the committer's
        # check of its tensor files is what this test is about.
        with mounted(self.src, "--commit-quiet", "0.3", "--commit-wait", "0.5") as (mnt, _, log):
            new = os.path.join(mnt, "exp", "new")

            err = errno_of
            self.assertEqual(err(lambda: os.mkdir(os.path.join(new, "CKPT+1"))), errno.EEXIST)
            self.assertEqual(err(lambda: os.symlink("/etc", os.path.join(new, "link"))), errno.EPERM)
            self.assertEqual(err(lambda: os.mkfifo(os.path.join(new, "fifo"))), errno.EPERM)
            self.assertEqual(err(lambda: os.mkdir(os.path.join(new, ".ckptfs-staging"))), errno.EINVAL)
            self.assertEqual(err(lambda: os.rename(os.path.join(mnt, "exp", "CKPT+1"), os.path.join(new, "x"))),
                             errno.EROFS)
            # A writer that dies mid-file leaves a truncated zip: never committed.
            d = os.path.join(new, "CKPT+partial")
            os.mkdir(d)
            with open(os.path.join(d, "CKPT.yaml"), "w") as f:
                f.write("unixtime: 900\nloss: 0.0\n")
            buf = os.path.join(self.tmp, "full.ckpt")
            torch.save({"w": torch.randn(10000)}, buf)
            with open(buf, "rb") as f:
                data = f.read()
            with open(os.path.join(d, "model.ckpt"), "wb") as f:
                f.write(data[: len(data) // 2])
            # Wait for the committer's verdict rather than for a guessed time.
            self.assertTrue(wait_for(lambda: "CKPT+partial not committed" in read(log) and "incomplete" in read(log),
                                     timeout=10))
            self.assertFalse(os.path.exists(os.path.join(self.exp, "CKPT+partial")))
            self.assertEqual(checkpoint_of(os.path.join(mnt, "exp", "latest")), os.path.join(self.exp, "CKPT+1"))
            # Finishing the file lets it commit.
            with open(os.path.join(d, "model.ckpt"), "wb") as f:
                f.write(data)
            self.assertTrue(wait_for(lambda: os.path.exists(os.path.join(self.exp, "CKPT+partial")), timeout=5))

    def test_explicit_commit(self):
        with mounted(self.src, "--explicit-commit") as (mnt, _, _):
            new = os.path.join(mnt, "exp", "new")
            sb_save(new, "x", {"unixtime": 500, "loss": 0.3}, seed=5)
            # Nothing to wait for: no commit is the point. Any pause keeps this
            # a valid check (the default quiet period is 0.3 s).
            time.sleep(1.5)
            self.assertFalse(os.path.exists(os.path.join(self.exp, "CKPT+x")))
            open(os.path.join(new, "CKPT+x", ".commit"), "w").close()
            self.assertTrue(wait_for(lambda: os.path.exists(os.path.join(self.exp, "CKPT+x")), timeout=3))
            self.assertFalse(os.path.exists(os.path.join(self.exp, "CKPT+x", ".commit")))
            torch.save({"w": torch.ones(1)}, os.path.join(new, "checkpoint_7.pt"))
            open(os.path.join(new, "checkpoint_7.pt.commit"), "w").close()
            self.assertTrue(wait_for(lambda: os.path.exists(os.path.join(self.exp, "checkpoint_7.pt")), timeout=3))

    def test_writer_with_readers_and_retention(self):
        """A training loop saves through new/ while readers load latest/; keep
        the 2 newest and the best by loss."""
        self.writer_with_readers_and_retention()

    def test_writer_with_readers_and_retention_direct_new(self):
        """The same with --direct-new: the writer writes the staging area."""
        self.writer_with_readers_and_retention("--direct-new")

    def test_direct_new_waits_for_writers_it_cannot_see(self):
        # Quiet period 1 s; the writer's pauses below are well under it, so a
        # loaded machine does not turn them into a commit.
        with mounted(self.src, "--direct-new", "--commit-quiet", "1") as (mnt, _, log):
            new = os.path.join(mnt, "exp", "new")
            d = sb_save(new, "2", {"unixtime": 200, "loss": 0.5}, seed=2)
            staging = os.path.join(self.exp, ".ckptfs-staging", "CKPT+2")
            self.assertEqual(os.readlink(d), staging)  # a link once created: data skips the daemon
            # A file held open for writing (no writes for > the quiet period) blocks the commit...
            f = open(os.path.join(d, "optimizer.ckpt"), "wb")
            torch.save({"lr": torch.tensor(0.1)}, f)
            f.flush()
            time.sleep(2.5)
            self.assertFalse(os.path.exists(os.path.join(self.exp, "CKPT+2")))
            # ...as does a file that keeps growing between opens.
            f.close()
            with open(os.path.join(d, "log.txt"), "w"):
                pass
            for i in range(8):
                with open(os.path.join(d, "log.txt"), "a") as g:
                    g.write(f"step {i}\n")
                time.sleep(0.25)
                self.assertFalse(os.path.exists(os.path.join(self.exp, "CKPT+2")), i)
            self.assertTrue(wait_for(lambda: os.path.exists(os.path.join(self.exp, "CKPT+2")), timeout=5))
            self.assertEqual(sorted(os.listdir(os.path.join(self.exp, "CKPT+2"))),
                             ["CKPT.yaml", "counter.ckpt", "log.txt", "model.ckpt", "optimizer.ckpt"])
            # On disk is not yet indexed: the view moves once the index has it.
            self.assertTrue(wait_for(lambda: checkpoint_of(os.path.join(mnt, "exp", "latest"))
                                     == os.path.join(self.exp, "CKPT+2"), timeout=5))
            self.assertEqual(torch.load(os.path.join(mnt, "exp/latest/optimizer.ckpt"))["lr"].item(),
                             torch.tensor(0.1).item())
            # Single files are written through the daemon as before.
            torch.save({"w": torch.ones(2)}, os.path.join(new, "epoch=3-step=30.ckpt"))
            self.assertTrue(wait_for(lambda: os.path.exists(os.path.join(self.exp, "epoch=3-step=30.ckpt")),
                                     timeout=5))

    def writer_with_readers_and_retention(self, *options):
        losses = [0.9, 0.5, 0.7, 0.2, 0.6, 0.8, 0.4, 0.3]
        # The default quiet period: a writer that pauses longer than it between
        # two files of a checkpoint gets a commit without the second one.
        with mounted(self.src, "--commit-quiet", "1", "--keep-last", "2", "--keep-best", "min:loss:1",
                     *options) as (mnt, _, _):
            new = os.path.join(mnt, "exp", "new")
            stop = threading.Event()
            errors, loads = [], [0]

            def reader():
                while not stop.is_set():
                    try:
                        sd = torch.load(os.path.join(mnt, "exp", "latest", "model.ckpt"))
                        assert set(sd) == {"w", "b"}, sd.keys()
                        loads[0] += 1
                    except Exception as e:  # noqa: BLE001 - every failure is a finding
                        errors.append(repr(e))

            readers = [threading.Thread(target=reader) for _ in range(3)]
            experiments.speechbrain(self.exp, [])  # nothing; keeps the layout obvious
            # Start from a checkpoint that has model.ckpt with w and b.
            sb_save(new, "0", {"unixtime": 1000, "loss": 1.0, "epoch": 0}, seed=0)
            self.assertTrue(wait_for(lambda: os.path.exists(os.path.join(self.exp, "CKPT+0")), timeout=5))
            shutil.rmtree(os.path.join(self.exp, "CKPT+1"))
            self.assertTrue(wait_for(lambda: checkpoint_of(os.path.join(mnt, "exp", "latest"))
                                     == os.path.join(self.exp, "CKPT+0"), timeout=5))
            for t in readers:
                t.start()
            for i, loss in enumerate(losses, start=1):
                sb_save(new, str(i), {"unixtime": 1000 + i, "loss": loss, "epoch": i}, seed=i, size=100000)
                self.assertTrue(wait_for(lambda: os.path.exists(os.path.join(self.exp, f"CKPT+{i}")), timeout=10))
                self.assertEqual(sorted(os.listdir(os.path.join(self.exp, f"CKPT+{i}"))),
                                 ["CKPT.yaml", "counter.ckpt", "model.ckpt"])  # committed whole
            self.assertTrue(wait_for(lambda: checkpoint_of(os.path.join(mnt, "exp", "latest"))
                                     == os.path.join(self.exp, "CKPT+8"), timeout=5))
            # Every reader loads the final checkpoint at least once more.
            loaded = loads[0]
            self.assertTrue(wait_for(lambda: loads[0] >= loaded + len(readers) or errors, timeout=30))
            stop.set()
            for t in readers:
                t.join(timeout=60)
            self.assertEqual(errors, [])
            self.assertGreater(loads[0], 0)
            print(f"readers loaded latest/ {loads[0]} times while 8 checkpoints were written", flush=True)
            # keep_last 2 -> 7, 8; best loss -> 4 (0.2).
            left = sorted(n for n in os.listdir(self.exp) if n.startswith("CKPT+"))
            self.assertEqual(left, ["CKPT+4", "CKPT+7", "CKPT+8"])
            self.assertEqual(sorted(os.listdir(new)), left)

    def test_name_written_directly_during_a_write_is_never_replaced(self):
        """A checkpoint written straight into the experiment under the name a
        writer is still writing through new/: the commit refuses (the rename
        never replaces), says so naming both paths, and the staged one waits
        until the name is free."""
        name = "epoch=5-step=50.ckpt"
        target = os.path.join(self.exp, name)
        staged = os.path.join(self.exp, ".ckptfs-staging", name)
        with mounted(self.src, "--commit-quiet", "0.3") as (mnt, _, log):
            new = os.path.join(mnt, "exp", "new")
            with open(os.path.join(new, name), "wb") as f:  # open for writing: no commit yet
                torch.save({"w": torch.full((3,), 1.0)}, f)
                f.flush()
                torch.save({"w": torch.full((3,), 2.0)}, target)  # the direct write
            self.assertTrue(wait_for(lambda: f"new/{name} not committed" in read(log), timeout=10))
            line = next(l for l in read(log).splitlines() if f"new/{name} not committed" in l)
            self.assertIn(staged, line)
            self.assertIn(target, line)
            self.assertEqual(torch.load(target)["w"].tolist(), [2.0, 2.0, 2.0])  # not replaced
            self.assertEqual(sorted(os.listdir(new)), ["CKPT+1", name])  # still staged, listed once
            self.assertEqual(torch.load(staged)["w"].tolist(), [1.0, 1.0, 1.0])
            # Once the name is free, the staged checkpoint commits.
            os.unlink(target)
            self.assertTrue(wait_for(lambda: not os.path.exists(staged), timeout=10))
            self.assertEqual(torch.load(target)["w"].tolist(), [1.0, 1.0, 1.0])
            self.assertEqual(sorted(os.listdir(new)), ["CKPT+1", name])

    def test_prune_cli(self):
        experiments.speechbrain(self.exp, [(str(i), {"unixtime": 100 + i, "loss": l, "epoch": i})
                                           for i, l in [(2, 0.1), (3, 0.5), (4, 0.7)]])
        open(os.path.join(self.exp, "CKPT+3", ".keep"), "w").close()
        idx = os.path.join(self.tmp, "i.sqlite")
        p = subprocess.run([CKPTFS, "prune", "--dry-run", "--keep-last", "1", "--keep-best", "min:loss:1",
                            "--index", idx, self.src], capture_output=True, text=True, check=True)
        self.assertIn("CKPT+1", p.stdout)
        self.assertRegex(p.stdout, r"exp/CKPT\+1 +delete +ranked by keep_last=1")
        self.assertRegex(p.stdout, r"exp/CKPT\+3 +keep +pinned")
        self.assertRegex(p.stdout, r"exp/CKPT\+2 +keep +keep_best=min:loss:1")
        self.assertEqual(len([n for n in os.listdir(self.exp) if n.startswith("CKPT+")]), 4)
        p = subprocess.run([CKPTFS, "prune", "--keep-last", "1", "--keep-best", "min:loss:1", "--index", idx,
                            self.src], capture_output=True, text=True)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertEqual(sorted(n for n in os.listdir(self.exp) if n.startswith("CKPT+")),
                         ["CKPT+2", "CKPT+3", "CKPT+4"])
        self.assertIn("retention: deleted", p.stderr)
        p = subprocess.run([CKPTFS, "prune", self.src], capture_output=True, text=True)
        self.assertEqual(p.returncode, 2)
        self.assertIn("needs a policy", p.stderr)

    def test_daemon_killed_at_many_points(self):
        """SIGKILL the daemon while checkpoints are written through new/ (explicit
        commits, so a checkpoint is complete by the writer's word): after a
        restart no half checkpoint is visible and every committed one is whole.
        Every other run uses --direct-new (the writer writes the staging area).

        Kill points follow the writer's progress, never the clock: it reports
        each step, and each run kills at a random checkpoint at one of three
        points: before its commit (its meta written, its tensors not), as its
        commit is requested (the marker just written), or after a commit is
        done (seen in the source), while the next checkpoint is being written."""
        rng = random.Random(7)
        index = os.path.join(self.tmp, "kill.sqlite")
        committed_before, deleted = set(), set()
        points = ["before", "during", "after"]
        for attempt in range(8):
            point, j = points[attempt % 3], rng.randrange(0, 3)
            if point == "after":
                j += 1  # at least two commits: the runs that kill after commits add more than 3
            mnt = tempfile.mkdtemp(prefix="ckptfs-kill-")
            direct = ["--direct-new"] if attempt % 2 else []
            proc = subprocess.Popen([CKPTFS, "mount", "-f", "--index", index, "--explicit-commit", *direct,
                                     self.src, mnt], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            writer = None
            try:
                self.assertTrue(wait_for(lambda: os.path.ismount(mnt), timeout=30))
                # "before": the writer stalls after checkpoint j's meta, as one
                # inside a long torch.save would, so the kill lands before its commit.
                stall = j if point == "before" else -1
                writer_err = open(os.path.join(self.tmp, f"writer-{attempt}.err"), "w+")
                writer = subprocess.Popen(["/usr/bin/python3", "-c", WRITER, os.path.join(mnt, "exp", "new"),
                                           str(attempt), str(stall)], stdout=subprocess.PIPE,
                                          stderr=writer_err, text=True)
                events = Progress(writer.stdout)

                def why():
                    writer_err.flush()
                    writer_err.seek(0)
                    return (f"attempt {attempt} ({point}, j={j}, {'direct' if direct else 'staged'}): "
                            f"writer {'exited ' + str(writer.poll()) if writer.poll() is not None else 'running'}, "
                            f"events {sorted(events.events())}, stderr: {writer_err.read()[-2000:]}")

                self.assertTrue(events.wait_for("ready"), "the writer never started: " + why())
                if point == "before":
                    self.assertTrue(events.wait_for(f"meta {j}"), why())
                elif point == "during":
                    self.assertTrue(events.wait_for(f"marker {j}"), why())
                else:
                    name = f"CKPT+{attempt}-{j}"
                    self.assertTrue(wait_for(lambda: os.path.exists(os.path.join(self.exp, name)), timeout=60),
                                    name + " was never committed: " + why())
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                deleted.update(e.split(" ", 1)[1] for e in events.events() if e.startswith("deleting "))
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                if writer is not None:
                    writer.kill()
                    writer.wait()
                    writer.stdout.close()
                    writer_err.close()
                unmount(mnt)
                wait_for(lambda: not os.path.ismount(mnt))
                os.rmdir(mnt)
            # Restart: recovery runs; whatever is in the experiment is whole.
            with mounted(self.src, index=index) as (mnt2, _, log):
                for name in os.listdir(self.exp):
                    if not name.startswith(f"CKPT+"):
                        continue
                    d = os.path.join(self.exp, name)
                    self.assertTrue(os.path.exists(os.path.join(d, "CKPT.yaml")), d)
                    files = ("model.ckpt", "counter.ckpt")
                    loaded = [torch.load(os.path.join(d, f)) for f in files]  # complete, loadable
                    if name == "CKPT+final":  # one version whole, never two mixed
                        self.assertEqual(loaded[0]["w"][0].item(), float(loaded[1]["step"].item()))
                    self.assertFalse(os.path.exists(os.path.join(d, ".commit")))
                    committed_before.add(name)
                self.assertFalse(os.path.exists(os.path.join(self.exp, ".ckptfs-staging")))
                self.assertEqual(sorted(os.listdir(os.path.join(mnt2, "exp", "new"))),
                                 sorted(n for n in os.listdir(self.exp) if not n.startswith(".ckptfs-")))
                if point == "before":  # killed half-written: set aside, never committed
                    self.assertNotIn(f"CKPT+{attempt}-{j}", os.listdir(self.exp))
            # Nothing committed earlier was lost (but what the writer deleted).
            for name in committed_before - deleted:
                self.assertTrue(os.path.exists(os.path.join(self.exp, name)), name)
        # The kills did land mid-stream: commits happened, and half-written
        # checkpoints were set aside (reported), not committed.
        self.assertGreater(len(committed_before), 3)
        abandoned = os.listdir(os.path.join(self.exp, ".ckptfs-abandoned"))
        self.assertGreater(len(abandoned), 0)
        print(f"8 kills: {len(committed_before)} whole checkpoints, {len(abandoned)} set aside", flush=True)


class Progress:
    """Lines a writer prints as it goes, read on a thread so that waiting on
    one has a timeout."""

    def __init__(self, stream):
        self.seen, self.cond = set(), threading.Condition()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream):
        for line in stream:
            with self.cond:
                self.seen.add(line.strip())
                self.cond.notify_all()

    def events(self):
        with self.cond:
            return set(self.seen)

    def wait_for(self, event, timeout=60):
        with self.cond:
            return self.cond.wait_for(lambda: event in self.seen, timeout=timeout)


WRITER = r"""
import os, shutil, sys, time, torch, yaml
new, attempt, stall = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def report(event):
    print(event, flush=True)
report("ready")
for i in range(100):
    d = os.path.join(new, f"CKPT+{attempt}-{i}")
    os.mkdir(d)
    with open(os.path.join(d, "CKPT.yaml"), "w") as f:
        f.write(yaml.dump({"unixtime": 2000 + attempt * 100 + i, "loss": 1.0 / (i + 1)}))
    report(f"meta {i}")
    if i == stall:
        time.sleep(3600)  # killed here, half written
    time.sleep(0.1)  # most of the time, a checkpoint is half written
    torch.save({"w": torch.randn(200000)}, os.path.join(d, "model.ckpt"))
    torch.save({"step": torch.tensor(i)}, os.path.join(d, "counter.ckpt"))
    open(os.path.join(d, ".commit"), "w").close()
    report(f"marker {i}")
    # Re-save a named checkpoint (a new version replaces the committed one)
    # and delete an older one through new/, as frameworks do.
    f = os.path.join(new, "CKPT+final")
    os.makedirs(f, exist_ok=True)
    with open(os.path.join(f, "CKPT.yaml"), "w") as out:
        out.write(yaml.dump({"unixtime": 1000 + attempt, "loss": 5.0}))
    torch.save({"w": torch.full((50000,), float(i))}, os.path.join(f, "model.ckpt"))
    torch.save({"step": torch.tensor(i)}, os.path.join(f, "counter.ckpt"))
    open(os.path.join(f, ".commit"), "w").close()
    if i >= 2:
        old = f"CKPT+{attempt}-{i - 2}"
        report(f"deleting {old}")
        try:
            shutil.rmtree(os.path.join(new, old))
        except OSError:
            pass  # --direct-new: still a link to staging, or being committed
"""


if __name__ == "__main__":
    unittest.main()
