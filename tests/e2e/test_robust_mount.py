"""End-to-end robustness of a mount: names that are not UTF-8, listings
that never show a name lookup refuses, and stopping on SIGTERM while a
reader keeps the daemon busy. Real /dev/fuse, real torch.save files."""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import unittest

import torch

import experiments
from mount_util import CKPTFS, mounted, unmount, wait_for

BASE = 1_700_000_000
# Not UTF-8: two bytes that never start a sequence, then U+DCFF encoded as
# UTF-8 (a surrogate, which strict UTF-8 refuses).
ODD = b"\xff\xfe\xed\xb3\xbf"


def write_checkpoint(exp, name, meta_yaml, seed):
    """A SpeechBrain checkpoint named by bytes: CKPT.yaml and a real mdl.ckpt."""
    d = os.path.join(os.fsencode(exp), name)
    os.makedirs(d)
    with open(os.path.join(d, b"CKPT.yaml"), "w") as f:
        f.write(meta_yaml)
    torch.manual_seed(seed)
    with open(os.path.join(d, b"mdl.ckpt"), "wb") as f:
        torch.save({"w": torch.randn(4)}, f)
    return d


def read_log(path):
    """The daemon's log; it names paths that are not UTF-8."""
    with open(path, encoding="utf-8", errors="backslashreplace") as f:
        return f.read()


def status_json(mnt):
    with open(os.path.join(mnt, ".ckptfs-status"), "rb") as f:
        return json.loads(f.read())


class NonUtf8Test(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="ckptfs-e2e-robust-")
        # The source itself is not UTF-8: it is in every status report.
        self.src = os.path.join(os.fsencode(self.tmp), b"src-" + ODD)
        self.exp = os.path.join(self.src, b"exp")

    def tearDown(self):
        shutil.rmtree(self.tmp, ignore_errors=True)

    def assert_names_real_files(self, checkpoints):
        real = sorted(os.path.join(self.exp, n) for n in os.listdir(self.exp) if n.startswith(b"CKPT+"))
        paths = sorted(os.fsencode(c["path"]) for c in checkpoints)
        self.assertEqual(paths, real)
        for c in checkpoints:
            path = os.fsencode(c["path"])
            os.stat(path)
            self.assertEqual(os.fsencode(c["experiment"]), self.exp)
            self.assertEqual(os.path.basename(path), os.fsencode(c["name"]))
            for f in c["files"]:
                os.stat(os.path.join(path, os.fsencode(f["name"])))

    def test_index_json_and_status_name_the_real_bytes(self):
        odd = write_checkpoint(self.exp, b"CKPT+" + ODD, f"unixtime: {BASE + 2}\nloss: 0.3\n", 1)
        write_checkpoint(self.exp, b"CKPT+a", f"unixtime: {BASE + 1}\nloss: 0.5\n", 2)
        # Meta that is not UTF-8 either, in a key and in a value.
        write_checkpoint(self.exp, b"CKPT+b", f"unixtime: {BASE}\nnote: x\n", 3)
        with open(os.path.join(self.exp, b"CKPT+b", b"CKPT.yaml"), "ab") as f:
            f.write(b"caf\xe9: 1\nwho: caf\xe9\n")
        with mounted(self.src) as (mnt, proc, _):
            mexp = os.path.join(mnt, "exp")
            with open(os.path.join(mexp, "index.json"), "rb") as f:
                checkpoints = json.loads(f.read())
            self.assertEqual(len(checkpoints), 3)
            self.assert_names_real_files(checkpoints)
            # The status file (it names the source) can be stat'ed and read.
            os.stat(os.path.join(mnt, ".ckptfs-status"))
            status = status_json(mnt)
            self.assertEqual(os.fsencode(status["source"]), self.src)
            self.assertEqual(status["index"]["checkpoints"], 3)
            for args in (["status", "--json", mnt], ["status", mnt]):
                p = subprocess.run([CKPTFS, *args], capture_output=True)
                self.assertEqual(p.returncode, 0, p.stderr)
            self.assertIn(self.src, subprocess.run([CKPTFS, "status", mnt], capture_output=True).stdout)
            # The views serve the odd checkpoint like any other.
            self.assertEqual(os.getxattr(os.path.join(mexp, "latest"), "user.ckptfs.checkpoint"), odd)
            with open(os.path.join(odd, b"mdl.ckpt"), "rb") as f:
                real = torch.load(f)["w"]
            self.assertTrue(torch.equal(torch.load(os.path.join(mexp, "best/min/loss/mdl.ckpt"))["w"], real))
            self.assertIn(b"CKPT+" + ODD, os.listdir(os.fsencode(mexp)))
            self.assertIsNone(proc.poll(), "the daemon died")
        # `ckptfs ls --json` escapes the same way.
        index = os.path.join(self.tmp, "ls.sqlite")
        p = subprocess.run([CKPTFS, "ls", "--json", "--index", index, self.exp], capture_output=True)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assert_names_real_files(json.loads(p.stdout))

    def test_status_after_retention_deleted_an_odd_checkpoint(self):
        odd = write_checkpoint(self.exp, b"CKPT+" + ODD, f"unixtime: {BASE + 1}\nloss: 0.3\n", 1)
        with mounted(self.src, "--keep-last", "1") as (mnt, proc, log):
            self.assertEqual(status_json(mnt)["totals"]["deletions"], 0)
            # A newer checkpoint appears in the source (atomically): the
            # policy keeps only it and deletes the odd one.
            staging = os.path.join(os.fsencode(self.tmp), b"staging")
            newer = write_checkpoint(staging, b"CKPT+new", f"unixtime: {BASE + 2}\nloss: 0.4\n", 2)
            os.rename(newer, os.path.join(self.exp, b"CKPT+new"))
            self.assertTrue(wait_for(lambda: not os.path.exists(odd), timeout=30),
                            "retention did not delete the odd checkpoint: " + read_log(log))
            status = wait_for(lambda: status_json(mnt)["last_deletions"] and status_json(mnt), timeout=10)
            self.assertTrue(status, "no deletion reported")
            self.assertEqual(status["totals"]["deletions"], 1)
            self.assertTrue(os.fsencode(status["last_deletions"][0]["what"]).startswith(odd))
            p = subprocess.run([CKPTFS, "status", mnt], capture_output=True)
            self.assertEqual(p.returncode, 0, p.stderr)
            self.assertIn(odd, p.stdout)
            with open(os.path.join(mnt, "exp", "index.json"), "rb") as f:
                self.assert_names_real_files(json.loads(f.read()))
            self.assertIsNone(proc.poll(), "the daemon died")


class ListingTest(unittest.TestCase):
    """A directory listing never shows a name that lookup refuses."""

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="ckptfs-e2e-robust-")
        self.src = os.path.join(self.tmp, "src")
        os.makedirs(self.src)

    def tearDown(self):
        shutil.rmtree(self.tmp, ignore_errors=True)

    def ls_la(self, path):
        p = subprocess.run(["ls", "-la", path], capture_output=True, text=True)
        self.assertEqual(p.returncode, 0, p.stderr)
        return p.stdout

    def test_ls_la_of_an_empty_source(self):
        with mounted(self.src) as (mnt, _, _):
            out = self.ls_la(mnt)
            self.assertNotIn("latest", out)
            for name in ("best", "top", "avg", "where", "new", "index.json"):
                self.assertIn(name, out)
            for name in os.listdir(mnt):
                os.lstat(os.path.join(mnt, name))

    def test_ls_la_of_an_experiment_with_only_invalid_checkpoints(self):
        experiments.speechbrain(os.path.join(self.src, "exp"), [
            ("a", "loss: 0.1\n\n@ garbage {"), ("b", "unixtime: [1, 2\n")])
        with mounted(self.src) as (mnt, _, _):
            for path in (mnt, os.path.join(mnt, "exp")):
                self.assertNotIn("latest", self.ls_la(path))
            with open(os.path.join(mnt, "exp", "index.json")) as f:
                self.assertEqual([c["valid"] for c in json.load(f)], [False, False])

    def test_every_listed_name_can_be_looked_up(self):
        experiments.speechbrain(os.path.join(self.src, "sb"), [
            ("a", {"unixtime": BASE + 1, "loss": 0.5, "val/loss": 0.4, "epoch": 1}),
            ("b", {"unixtime": BASE + 2, "loss": 0.2, "acc": "nan", "epoch": 2}),
            ("c", {"unixtime": BASE + 3, "loss": 0.3, "split": "full"}),
            ("d", "loss: 0.01\n\n@ garbage {"),
        ])
        experiments.speechbrain(os.path.join(self.src, "broken"), [("x", "a: [\n")])
        experiments.huggingface(os.path.join(self.src, "hf"), [(500, 0.9), (1000, 0.4)])
        pl = os.path.join(self.src, "pl")
        os.makedirs(pl)
        for epoch, val in [(1, 0.7), (2, 0.6)]:
            torch.save({"w": torch.full((3,), float(epoch))},
                       os.path.join(pl, f"epoch={epoch}-step={epoch * 10}-val_loss={val}.ckpt"))
        os.makedirs(os.path.join(self.src, "empty", "deeper"))
        write_checkpoint(os.path.join(self.src, "odd"), b"CKPT+" + ODD, f"unixtime: {BASE}\nloss: 1\n", 9)
        with mounted(self.src) as (mnt, proc, _):
            errors = []
            looked_up = 0
            # os.walk lists every directory; every name it lists must lstat.
            # avg/ lists nothing, so no average is computed on the way.
            for root, dirs, files in os.walk(os.fsencode(mnt), onerror=errors.append):
                for name in dirs + files:
                    try:
                        os.lstat(os.path.join(root, name))
                        looked_up += 1
                    except OSError as e:
                        errors.append(e)
            self.assertEqual(errors, [])
            self.assertGreater(looked_up, 80)
            # The open-ended directories, completed by hand.
            for sub in ("sb/top/2/min", "sb/top/2/min/loss", "sb/avg/best3/min", "sb/avg/best2/max",
                        "sb/where/epoch>=2", "sb/where/epoch>=5", "best/max", "hf/top/9/max/eval_loss"):
                path = os.path.join(mnt, sub)
                for name in os.listdir(path):
                    os.lstat(os.path.join(path, name))
            self.assertNotIn("val/loss", os.listdir(os.path.join(mnt, "sb/best/min")))
            self.assertEqual(sorted(os.listdir(os.path.join(mnt, "sb/avg/best3/min"))), ["loss", "unixtime"])
            self.assertNotIn("latest", os.listdir(os.path.join(mnt, "sb/where/epoch>=5")))
            self.assertNotIn("latest", os.listdir(os.path.join(mnt, "broken")))
            self.assertEqual(subprocess.run(["ls", "-laR", mnt], capture_output=True).returncode, 0)
            self.assertIsNone(proc.poll())


READER = r"""
import sys
path = sys.argv[1]
with open(path, "rb") as f:
    first = True
    while True:
        f.seek(0)
        while f.read(1 << 20):
            pass
        if first:
            print("reading", flush=True)
            first = False
"""


class StopTest(unittest.TestCase):
    """SIGTERM stops the daemon while a reader keeps it busy."""

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="ckptfs-e2e-robust-")
        self.src = os.path.join(self.tmp, "src")
        self.exp = os.path.join(self.src, "exp")
        experiments.speechbrain(self.exp, [("a", {"unixtime": BASE + 1, "loss": 0.5}),
                                           ("b", {"unixtime": BASE + 2, "loss": 0.4})])
        with open(os.path.join(self.exp, "CKPT+b", "big.bin"), "wb") as f:
            f.write(os.urandom(16 << 20))

    def tearDown(self):
        shutil.rmtree(self.tmp, ignore_errors=True)

    def test_sigterm_while_a_reader_is_busy(self):
        stop = threading.Event()

        def churn(mnt):
            # Changes in the source (the watcher notifies the kernel) and
            # lookups through the mount, while the daemon stops.
            i = 0
            while not stop.is_set():
                scratch = os.path.join(self.exp, f"scratch-{i % 4}")
                with open(scratch, "w") as f:
                    f.write("x")
                os.unlink(scratch)
                try:
                    os.listdir(os.path.join(mnt, "exp"))
                    os.stat(os.path.join(mnt, "exp", "latest", "big.bin"))
                except OSError:
                    pass  # the mount is going away
                i += 1

        with mounted(self.src) as (mnt, proc, log):
            reader = subprocess.Popen([sys.executable, "-c", READER, os.path.join(mnt, "exp/latest/big.bin")],
                                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            churner = threading.Thread(target=churn, args=(mnt,))
            try:
                self.assertEqual(reader.stdout.readline().strip(), "reading")
                churner.start()
                proc.send_signal(signal.SIGTERM)
                try:
                    rc = proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.fail("the daemon did not stop on SIGTERM: " + read_log(log))
                self.assertEqual(rc, 0, read_log(log))
                self.assertFalse(os.path.ismount(mnt))
                self.assertIn("stopping", read_log(log))
            finally:
                stop.set()
                if churner.is_alive():
                    churner.join(timeout=30)
                reader.kill()
                reader.wait()

    def test_sigint_and_sighup_stop_an_idle_mount(self):
        for sig in (signal.SIGINT, signal.SIGHUP):
            with mounted(self.src) as (mnt, proc, log):
                os.listdir(os.path.join(mnt, "exp", "latest"))
                proc.send_signal(sig)
                self.assertEqual(proc.wait(timeout=10), 0, read_log(log))
                self.assertFalse(os.path.ismount(mnt))


if __name__ == "__main__":
    unittest.main()
