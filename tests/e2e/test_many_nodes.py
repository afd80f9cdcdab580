"""End-to-end: several ckptfs daemons over one source (README "Many nodes",
DESIGN.md §12).

What this stands in for: a cluster whose nodes each run one daemon over an
experiment tree on NFS, Lustre or CephFS. No NFS export (nor the network
namespace to serve one) is available on the machines that run these tests,
so the nodes are two daemons on this machine over one local directory, each
with its own index, as two nodes would be. What differs from a real shared
filesystem, and how the test keeps it honest:
- inotify would show each daemon the other's commits here; the daemon that
  stands for a remote node runs with --poll 1, so it sees them only by
  polling, as it would on NFS (its watcher then uses no inotify at all);
- the lease is an fcntl OFD lock held by the kernel here; on NFS it is a
  POSIX lock held by the server's lock manager (same calls, same release on
  death, after the NFSv4 lease time rather than at once);
- renameat2(RENAME_NOREPLACE) is local here; NFSv4 and Lustre give the same
  answer (EEXIST) for a name another client took.
Timing is never asserted: views are waited for with a timeout of a few poll
periods; the takeover and view latencies are printed, not checked.
"""
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import unittest

import torch
import yaml

import experiments
from mount_util import CKPTFS, checkpoint_of, unmount, wait_for

POLL = 1.0  # --poll of the daemon that stands for another node
VIEW_TIMEOUT = 6 * POLL  # commit quiet period + a few poll periods
TAKEOVER_TIMEOUT = 15.0  # the standby retries the lease every 2 s


def sb_save(new_dir, name, meta, seed):
    """SpeechBrain's Checkpointer.save_checkpoint: CKPT.yaml, then torch.save."""
    d = os.path.join(new_dir, "CKPT+" + name)
    os.mkdir(d)
    with open(os.path.join(d, "CKPT.yaml"), "w") as f:
        f.write("# yamllint disable\n" + yaml.dump(meta))
    torch.manual_seed(seed)
    torch.save({"w": torch.randn(64)}, os.path.join(d, "model.ckpt"))
    return d


class Daemon:
    """One node's `ckptfs mount -f`, which the test may SIGKILL."""

    def __init__(self, src, mnt, index, options, log_path):
        self.mnt = mnt
        self.log_path = log_path
        with open(log_path, "w") as log:
            self.proc = subprocess.Popen([CKPTFS, "mount", "-f", "--index", index, *options, src, mnt],
                                         stdout=log, stderr=subprocess.STDOUT)
        if not wait_for(lambda: os.path.ismount(mnt) or self.proc.poll() is not None, timeout=30):
            raise AssertionError("mount did not come up: " + self.log())
        if self.proc.poll() is not None:
            raise AssertionError("ckptfs exited %s: %s" % (self.proc.returncode, self.log()))

    def log(self):
        with open(self.log_path, errors="backslashreplace") as f:
            return f.read()

    def kill(self):
        self.proc.kill()
        self.proc.wait()
        unmount(self.mnt)  # what a dead daemon leaves: a mount answering ENOTCONN

    def stop(self):
        """Unmounts; returns the daemon's exit status."""
        if self.proc.poll() is None:
            unmount(self.mnt)
            try:
                return self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                return "hung"
        unmount(self.mnt)
        return self.proc.returncode


def deletions(log):
    return re.findall(r"retention: deleted (\S+)", log)


def deletion_errors(log):
    """Lines that would mean two pruners collided or a deletion failed."""
    return [l for l in log.splitlines()
            if ": error: " in l or "retention: kept" in l or "No such file" in l]


class ManyNodesTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="ckptfs-e2e-nodes-")
        self.src = os.path.join(self.tmp, "src")
        self.exp = os.path.join(self.src, "exp")
        experiments.speechbrain(self.exp, [("1", {"unixtime": 100, "loss": 0.9})])
        os.rename(os.path.join(self.exp, "CKPT+1", "mdl.ckpt"), os.path.join(self.exp, "CKPT+1", "model.ckpt"))
        os.remove(os.path.join(self.exp, "CKPT+1", "counter.ckpt"))
        self.daemons = []

    def tearDown(self):
        for d in self.daemons:
            d.stop()
            try:
                os.rmdir(d.mnt)
            except OSError:
                pass
        shutil.rmtree(self.tmp, ignore_errors=True)

    def start(self, name, *options):
        mnt = os.path.join(self.tmp, "mnt-" + name)
        os.makedirs(mnt, exist_ok=True)
        d = Daemon(self.src, mnt, os.path.join(self.tmp, name + ".sqlite"),
                   ["--commit-quiet", "0.3", "--keep-last", "2", *options],
                   os.path.join(self.tmp, "%s-%d.log" % (name, len(self.daemons))))
        self.daemons.append(d)
        return d

    def on_disk(self):
        return sorted((n for n in os.listdir(self.exp) if n.startswith("CKPT+")), key=lambda n: int(n[5:]))

    def commit_through(self, writer, readers, i):
        """Writes CKPT+i through writer's new/; waits until every reader's
        latest/ is it and the source keeps exactly the last two. Returns the
        seconds each reader's view took after the writer's own moved."""
        sb_save(os.path.join(writer.mnt, "exp", "new"), str(i), {"unixtime": 100 * i, "loss": 1.0 / i}, seed=i)
        want = os.path.join(self.exp, "CKPT+%d" % i)
        self.assertTrue(wait_for(lambda: checkpoint_of(os.path.join(writer.mnt, "exp", "latest")) == want,
                                 timeout=VIEW_TIMEOUT), "CKPT+%d never committed: %s" % (i, writer.log()))
        committed = time.monotonic()
        lags = []
        for r in readers:
            self.assertTrue(wait_for(lambda: checkpoint_of(os.path.join(r.mnt, "exp", "latest")) == want,
                                     timeout=VIEW_TIMEOUT, interval=0.01),
                            "%s: latest/ did not move to CKPT+%d: %s" % (r.mnt, i, r.log()))
            lags.append(time.monotonic() - committed)
        expected = ["CKPT+%d" % (i - 1), "CKPT+%d" % i]
        self.assertTrue(wait_for(lambda: self.on_disk() == expected, timeout=VIEW_TIMEOUT),
                        "kept %s, want %s" % (self.on_disk(), expected))
        return lags

    def test_one_pruner_standby_takes_over_and_restarted_node_stays_standby(self):
        # a: the remote node (polls, no inotify); it starts first and takes the lease.
        a = self.start("a", "--poll", str(POLL))
        b = self.start("b")
        self.assertIn("every 1.0 s (--poll)", a.log())
        self.assertTrue(wait_for(lambda: "retention: standby" in b.log(), timeout=5), b.log())
        self.assertNotIn("standby", a.log())
        self.assertNotIn(".ckptfs-lease", os.listdir(os.path.join(a.mnt)))  # hidden
        self.assertIn(".ckptfs-lease", os.listdir(self.src))
        # `ckptfs prune` is one more pruner: it refuses while a mount holds the lease.
        prune = subprocess.run([CKPTFS, "prune", "--index", os.path.join(self.tmp, "cli.sqlite"),
                                "--keep-last", "1", self.src], capture_output=True, text=True)
        self.assertEqual(prune.returncode, 1, prune.stdout + prune.stderr)
        self.assertIn("holds the pruning lease", prune.stderr)
        dry = subprocess.run([CKPTFS, "prune", "--dry-run", "--index", os.path.join(self.tmp, "cli.sqlite"),
                              "--keep-last", "1", self.src], capture_output=True, text=True)
        self.assertEqual(dry.returncode, 0, dry.stdout + dry.stderr)

        poll_lags = []
        i = 1
        for _ in range(6):  # writers take turns on the two nodes
            i += 1
            writer, reader = (a, b) if i % 2 == 0 else (b, a)
            lag = self.commit_through(writer, [reader], i)
            if reader is a:
                poll_lags.append(lag[0])
        # Everything but the last two, once, by a (its log line follows the deletion).
        self.assertTrue(wait_for(lambda: len(deletions(a.log())) == i - 2, timeout=5), a.log())
        self.assertEqual(deletions(b.log()), [])

        # The pruning node dies mid-run; the other keeps writing, takes the lease and prunes.
        killed = time.monotonic()
        a.kill()
        self.assertTrue(wait_for(lambda: "took over the pruning lease" in b.log(), timeout=TAKEOVER_TIMEOUT),
                        b.log())
        takeover = time.monotonic() - killed
        for _ in range(3):
            i += 1
            self.commit_through(b, [], i)
        self.assertTrue(wait_for(lambda: len(deletions(b.log())) >= 3, timeout=5), b.log())

        # The first node comes back while b's writer is in the middle of a save:
        # it serves, stands by, and leaves that save in staging for b to commit.
        i += 1
        d = os.path.join(b.mnt, "exp", "new", "CKPT+%d" % i)
        os.mkdir(d)
        with open(os.path.join(d, "CKPT.yaml"), "w") as f:
            f.write("unixtime: %d\nloss: 0.5\n" % (100 * i))
        held = open(os.path.join(d, "model.ckpt"), "wb")
        try:
            torch.save({"w": torch.randn(64)}, held)
            held.flush()
            a2 = self.start("a", "--poll", str(POLL))
            self.assertTrue(wait_for(lambda: "retention: standby" in a2.log(), timeout=5), a2.log())
            self.assertIn("left in place", a2.log())
            self.assertFalse(os.path.exists(os.path.join(self.exp, ".ckptfs-abandoned")))
        finally:
            held.close()
        want = os.path.join(self.exp, "CKPT+%d" % i)
        for node in (b, a2):
            self.assertTrue(wait_for(lambda: checkpoint_of(os.path.join(node.mnt, "exp", "latest")) == want,
                                     timeout=VIEW_TIMEOUT), node.log())
        self.assertTrue(wait_for(lambda: self.on_disk() == ["CKPT+%d" % (i - 1), "CKPT+%d" % i],
                                 timeout=VIEW_TIMEOUT), self.on_disk())
        for _ in range(4):
            i += 1
            writer, reader = (a2, b) if i % 2 == 0 else (b, a2)
            lag = self.commit_through(writer, [reader], i)
            if reader is a2:
                poll_lags.append(lag[0])
        self.assertEqual(self.on_disk(), ["CKPT+%d" % (i - 1), "CKPT+%d" % i])
        self.assertTrue(wait_for(lambda: len(deletions(a.log()) + deletions(b.log())) == i - 2, timeout=5), b.log())
        self.assertEqual(deletions(a2.log()), [], a2.log())
        for d in (a, b, a2):
            self.assertEqual(deletion_errors(d.log()), [], d.log())
        # Every checkpoint but the last two was deleted exactly once, by one node or the other.
        deleted = deletions(a.log()) + deletions(b.log()) + deletions(a2.log())
        self.assertEqual(sorted(deleted), sorted(os.path.join(self.exp, "CKPT+%d" % k) for k in range(1, i - 1)))
        for d in (b, a2):
            self.assertEqual(d.stop(), 0, d.log())
        print("\nmany nodes: standby took over %.2f s after SIGKILL; --poll %.0f view lag "
              "max %.2f s, mean %.2f s over %d commits" %
              (takeover, POLL, max(poll_lags), sum(poll_lags) / len(poll_lags), len(poll_lags)))

    def test_name_taken_by_another_node_is_never_replaced(self):
        a = self.start("a", "--poll", str(POLL))
        b = self.start("b", "--poll", str(POLL))
        # Node a's writer is still writing CKPT+7 (a file open) ...
        d = os.path.join(a.mnt, "exp", "new", "CKPT+7")
        os.mkdir(d)
        with open(os.path.join(d, "CKPT.yaml"), "w") as f:
            f.write("unixtime: 700\nloss: 0.7\n")
        held = open(os.path.join(d, "model.ckpt"), "wb")
        try:
            torch.save({"w": torch.zeros(4)}, held)
            held.flush()
            # ... when node b's writer saves the same name through its new/: refused.
            with self.assertRaises(FileExistsError):
                os.mkdir(os.path.join(b.mnt, "exp", "new", "CKPT+7"))
            # A third node, without ckptfs, takes the name first, straight in the source.
            theirs = os.path.join(self.exp, "CKPT+7")
            tmp = os.path.join(self.exp, ".tmp-theirs")
            os.mkdir(tmp)
            with open(os.path.join(tmp, "CKPT.yaml"), "w") as f:
                f.write("unixtime: 701\nloss: 0.1\n")
            torch.save({"w": torch.ones(4)}, os.path.join(tmp, "model.ckpt"))
            os.rename(tmp, theirs)
        finally:
            held.close()
        # a's commit finds the name taken: EEXIST, it stays staged, nothing is replaced.
        self.assertTrue(wait_for(lambda: "already has that name" in a.log(), timeout=VIEW_TIMEOUT), a.log())
        self.assertTrue(torch.equal(torch.load(os.path.join(theirs, "model.ckpt"))["w"], torch.ones(4)))
        self.assertTrue(os.path.exists(os.path.join(self.exp, ".ckptfs-staging", "CKPT+7", "model.ckpt")))
        for node in (a, b):
            self.assertTrue(wait_for(lambda: checkpoint_of(os.path.join(node.mnt, "exp", "latest")) == theirs,
                                     timeout=VIEW_TIMEOUT), node.log())
            self.assertTrue(torch.equal(torch.load(os.path.join(node.mnt, "exp", "latest", "model.ckpt"))["w"],
                                        torch.ones(4)))


if __name__ == "__main__":
    unittest.main()
