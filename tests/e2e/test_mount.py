"""End-to-end tests of the mount: real /dev/fuse, real torch.save files,
real torch.load through the mount."""
import errno
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
import unittest

import torch
import yaml

import experiments
from mount_util import CKPTFS, errno_of, mounted, unmount, wait_for

BASE = 1_700_000_000


def same_state(a, b):
    return list(a.keys()) == list(b.keys()) and all(torch.equal(a[k], b[k]) for k in a)


class MountTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="ckptfs-e2e-mount-")
        self.src = os.path.join(self.tmp, "src")
        self.sb = os.path.join(self.src, "sb")
        experiments.speechbrain(self.sb, [
            ("a", {"unixtime": BASE + 1, "loss": 0.5, "epoch": 1, "validation-type": "full"}),
            ("b", {"unixtime": BASE + 2, "loss": 0.2, "epoch": 2, "validation-type": "quick"}),
            ("c", {"unixtime": BASE + 3, "loss": 0.3, "epoch": 3, "validation-type": "full"}),
            ("d", {"unixtime": BASE + 4, "epoch": 4}),
            ("e", "unixtime: 1700000005\nloss: 0.01\n\n@ garbage {"),
        ])
        self.hf = os.path.join(self.src, "hf")
        experiments.huggingface(self.hf, [(500, 0.9), (1000, 0.4)])
        self.pl = os.path.join(self.src, "pl")
        os.makedirs(self.pl)
        for epoch, val in [(1, 0.7), (2, 0.6), (3, 0.9)]:
            torch.save({"state_dict": {"w": torch.full((3,), float(epoch))}, "epoch": epoch},
                       os.path.join(self.pl, f"epoch={epoch}-step={epoch * 10}-val_loss={val}.ckpt"))
            os.utime(os.path.join(self.pl, f"epoch={epoch}-step={epoch * 10}-val_loss={val}.ckpt"),
                     (BASE + epoch, BASE + epoch))

    def tearDown(self):
        shutil.rmtree(self.tmp, ignore_errors=True)

    def real(self, *parts):
        return os.path.join(self.sb, *parts)

    def test_selectors_serve_real_files_to_torch_load(self):
        with mounted(self.src) as (mnt, _, _):
            loaded = torch.load(os.path.join(mnt, "sb/best/min/loss/mdl.ckpt"))
            self.assertTrue(same_state(loaded, torch.load(self.real("CKPT+b", "mdl.ckpt"))))
            # weights_only loading works through the mount too.
            torch.load(os.path.join(mnt, "sb/latest/mdl.ckpt"), weights_only=True)
            self.assertEqual(os.getxattr(os.path.join(mnt, "sb/latest"), "user.ckptfs.checkpoint").decode(),
                             self.real("CKPT+d"))
            self.assertEqual(
                os.getxattr(os.path.join(mnt, "sb/best/max/loss/mdl.ckpt"), "user.ckptfs.real_path").decode(),
                self.real("CKPT+a", "mdl.ckpt"))
            self.assertEqual(os.getxattr(os.path.join(mnt, "sb/top/3/min/loss/2"),
                                         "user.ckptfs.checkpoint").decode(), self.real("CKPT+c"))
            self.assertEqual(os.getxattr(os.path.join(mnt, "sb/where/validation-type=full/best/min/loss"),
                                         "user.ckptfs.checkpoint").decode(), self.real("CKPT+c"))
            self.assertEqual(sorted(os.listdir(os.path.join(mnt, "sb/top/3/min/loss"))), ["1", "2", "3"])
            self.assertEqual(sorted(os.listdir(os.path.join(mnt, "sb/best/min/loss"))),
                             ["CKPT.yaml", "counter.ckpt", "mdl.ckpt"])
            # Hugging Face and Lightning layouts.
            hf = torch.load(os.path.join(mnt, "hf/best/min/eval_loss/pytorch_model.bin"))
            self.assertTrue(same_state(hf, torch.load(os.path.join(self.hf, "checkpoint-1000/pytorch_model.bin"))))
            pl = torch.load(os.path.join(mnt, "pl/best/min/val_loss/checkpoint.ckpt"))
            self.assertEqual(pl["epoch"], 2)
            self.assertEqual(sorted(os.listdir(os.path.join(mnt, "pl/latest"))),
                             ["checkpoint.ckpt", "epoch=3-step=30-val_loss=0.9.ckpt"])
            # The top of the tree answers across experiments.
            self.assertEqual(os.getxattr(os.path.join(mnt, "best/min/loss"), "user.ckptfs.checkpoint").decode(),
                             self.real("CKPT+b"))
            # Bytes are identical to the real file, read in odd-sized chunks.
            with open(os.path.join(mnt, "sb/best/min/loss/mdl.ckpt"), "rb") as f:
                data = b"".join(iter(lambda: f.read(4093), b""))
            with open(self.real("CKPT+b", "mdl.ckpt"), "rb") as f:
                self.assertEqual(data, f.read())

    def test_passthrough_and_index_json(self):
        with mounted(self.src) as (mnt, _, _):
            names = os.listdir(os.path.join(mnt, "sb"))
            for n in ["CKPT+a", "CKPT+e", "latest", "best", "top", "avg", "where", "index.json"]:
                self.assertIn(n, names)
            # What SpeechBrain's Checkpointer does on a directory: list CKPT+*, parse CKPT.yaml.
            listed = {}
            for n in sorted(os.listdir(os.path.join(mnt, "sb"))):
                if n.startswith("CKPT+"):
                    try:
                        with open(os.path.join(mnt, "sb", n, "CKPT.yaml")) as f:
                            listed[n] = yaml.safe_load(f)
                    except yaml.YAMLError:
                        listed[n] = None
            self.assertEqual(listed["CKPT+b"]["loss"], 0.2)
            self.assertIsNone(listed["CKPT+e"])
            with open(os.path.join(mnt, "sb/index.json")) as f:
                rows = json.load(f)
            self.assertEqual({r["name"] for r in rows}, {"CKPT+" + c for c in "abcde"})
            bad = [r for r in rows if not r["valid"]]
            self.assertEqual(len(bad), 1)
            self.assertIn("CKPT+e/CKPT.yaml", bad[0]["error"])

    def test_errors(self):
        with mounted(self.src) as (mnt, _, _):
            err = errno_of
            self.assertEqual(err(lambda: os.stat(os.path.join(mnt, "sb/best/min/nokey"))), errno.ENOENT)
            self.assertEqual(err(lambda: os.stat(os.path.join(mnt, "sb/nothing"))), errno.ENOENT)
            self.assertEqual(err(lambda: os.stat(os.path.join(mnt, "sb/best/middle/loss"))), errno.EINVAL)
            self.assertEqual(err(lambda: os.stat(os.path.join(mnt, "sb/top/0/min/loss"))), errno.EINVAL)
            self.assertEqual(err(lambda: os.stat(os.path.join(mnt, "sb/where/=3"))), errno.EINVAL)
            self.assertEqual(err(lambda: os.stat(os.path.join(mnt, "sb/" + "x" * 255))), errno.ENOENT)
            self.assertEqual(err(lambda: open(os.path.join(mnt, "sb/latest/mdl.ckpt"), "r+b")), errno.EROFS)
            self.assertEqual(err(lambda: open(os.path.join(mnt, "sb/new-file"), "wb")), errno.EROFS)
            self.assertEqual(err(lambda: os.mkdir(os.path.join(mnt, "sb/CKPT+a/dir"))), errno.EROFS)
            self.assertEqual(err(lambda: os.unlink(os.path.join(mnt, "sb/CKPT+a/mdl.ckpt"))), errno.EROFS)
            self.assertEqual(err(lambda: os.rename(os.path.join(mnt, "sb/CKPT+a"), os.path.join(mnt, "sb/z"))),
                             errno.EROFS)
            # '..' is resolved by the kernel inside the mount: it never leaves it.
            self.assertEqual(os.path.realpath(os.path.join(mnt, "sb/latest/../..")), mnt)
            self.assertTrue(os.path.exists(self.real("CKPT+a", "mdl.ckpt")))

    def test_views_follow_the_disk(self):
        with mounted(self.src) as (mnt, _, _):
            latest = os.path.join(mnt, "sb/latest")
            best = os.path.join(mnt, "sb/best/min/loss/mdl.ckpt")
            ckpt = lambda p: os.getxattr(p, "user.ckptfs.checkpoint").decode()
            self.assertEqual(ckpt(latest), self.real("CKPT+d"))
            os.stat(best)  # cached in the kernel from here on
            # Training code writes a new best checkpoint straight into the source.
            t0 = time.monotonic()
            experiments.speechbrain(self.sb, [("f", {"unixtime": BASE + 6, "loss": 0.1, "epoch": 6})])
            self.assertTrue(wait_for(lambda: ckpt(latest) == self.real("CKPT+f"), timeout=1.0),
                            "latest did not move within 1 s")
            self.assertTrue(wait_for(lambda: os.getxattr(best, "user.ckptfs.real_path").decode()
                                     == self.real("CKPT+f", "mdl.ckpt"), timeout=1.0))
            moved = time.monotonic() - t0
            with open(best, "rb") as f, open(self.real("CKPT+f", "mdl.ckpt"), "rb") as g:
                self.assertEqual(f.read(), g.read())
            # ...and removes it again.
            shutil.rmtree(self.real("CKPT+f"))
            self.assertTrue(wait_for(lambda: ckpt(latest) == self.real("CKPT+d"), timeout=1.0))
            self.assertTrue(wait_for(lambda: not os.path.exists(os.path.join(mnt, "sb/CKPT+f")), timeout=1.0))
            self.assertLess(moved, 1.0)

    def test_open_after_the_view_moved_lands_on_the_new_choice(self):
        """The kernel holds latest/mdl.ckpt from a lookup; the checkpoint is
        deleted before the open reaches the daemon: the open must land on the
        checkpoint latest/ selects now, not fail with ENOENT."""
        gone = os.path.join(self.tmp, "gone")
        os.makedirs(gone)
        with mounted(self.src) as (mnt, _, _):
            path = os.path.join(mnt, "sb/latest/mdl.ckpt")
            for name, after in [("d", "c"), ("c", "b"), ("b", "a")]:
                os.stat(path)  # the kernel now caches the entry for CKPT+name
                os.rename(self.real(f"CKPT+{name}"), os.path.join(gone, name))
                with open(path, "rb") as f:  # before the watcher reacts
                    data = f.read()
                with open(self.real(f"CKPT+{after}", "mdl.ckpt"), "rb") as f:
                    self.assertEqual(data, f.read(), f"after CKPT+{name} went away")

    def test_open_file_stays_bound(self):
        with mounted(self.src) as (mnt, _, _):
            with open(self.real("CKPT+d", "mdl.ckpt"), "rb") as f:
                expected = f.read()
            with open(os.path.join(mnt, "sb/latest/mdl.ckpt"), "rb") as f:
                head = f.read(100)
                experiments.speechbrain(self.sb, [("g", {"unixtime": BASE + 7, "loss": 0.9})])
                shutil.rmtree(self.real("CKPT+d"))
                wait_for(lambda: os.getxattr(os.path.join(mnt, "sb/latest"),
                                             "user.ckptfs.checkpoint").decode() == self.real("CKPT+g"))
                rest = f.read()
            self.assertEqual(head + rest, expected)

    def test_no_fd_leak_under_many_requests(self):
        with mounted(self.src) as (mnt, proc, _):
            def fds():
                # libfuse keeps a splice pipe per worker thread (bounded by the
                # thread limit); everything else is what a leak would grow.
                names = []
                for fd in os.listdir(f"/proc/{proc.pid}/fd"):
                    try:
                        names.append(os.readlink(f"/proc/{proc.pid}/fd/{fd}"))
                    except OSError:
                        pass
                return len([n for n in names if not n.startswith("pipe:")])
            for _ in range(50):
                open(os.path.join(mnt, "sb/latest/mdl.ckpt"), "rb").close()
            # A close returns before the daemon handles the release: settle first.
            time.sleep(0.3)
            before = fds()
            for i in range(3000):
                with open(os.path.join(mnt, "sb/best/min/loss/mdl.ckpt"), "rb") as f:
                    f.read(64)
                os.stat(os.path.join(mnt, "sb/top/3/min/loss/%d" % (i % 3 + 1)))
                try:
                    os.stat(os.path.join(mnt, "sb/where/epoch>%d/latest" % i))
                except FileNotFoundError:
                    pass
                os.listdir(os.path.join(mnt, "sb/best/min"))
            self.assertTrue(wait_for(lambda: fds() <= before, timeout=3), (fds(), before))

    def test_concurrent_readers(self):
        with mounted(self.src) as (mnt, _, _):
            expected = torch.load(self.real("CKPT+b", "mdl.ckpt"))
            errors = []

            def reader():
                try:
                    for _ in range(30):
                        if not same_state(torch.load(os.path.join(mnt, "sb/best/min/loss/mdl.ckpt")), expected):
                            errors.append("mismatch")
                except Exception as e:  # noqa: BLE001 - collected and asserted below
                    errors.append(repr(e))

            threads = [threading.Thread(target=reader) for _ in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=120)
            self.assertEqual(errors, [])

    def test_links_mode(self):
        with mounted(self.src, "--links") as (mnt, _, _):
            best = os.path.join(mnt, "sb/best/min/loss")
            self.assertTrue(os.path.islink(best))
            self.assertEqual(os.readlink(best), self.real("CKPT+b"))
            loaded = torch.load(os.path.join(best, "mdl.ckpt"))
            self.assertTrue(same_state(loaded, torch.load(self.real("CKPT+b", "mdl.ckpt"))))
            link = os.path.join(mnt, "pl/best/min/val_loss/checkpoint.ckpt")
            self.assertTrue(os.path.islink(link))
            self.assertEqual(torch.load(link)["epoch"], 2)
            # Passthrough entries stay what they are.
            self.assertFalse(os.path.islink(os.path.join(mnt, "sb/CKPT+a")))

    def test_daemonises_once_ready(self):
        mnt = tempfile.mkdtemp(prefix="ckptfs-mnt-")
        try:
            p = subprocess.run([CKPTFS, "mount", "--index", os.path.join(self.tmp, "i.sqlite"), self.src, mnt],
                               capture_output=True, text=True, timeout=60)
            self.assertEqual(p.returncode, 0, p.stderr)
            # The very next line can use the mount.
            self.assertEqual(os.getxattr(os.path.join(mnt, "sb/best/min/loss"),
                                         "user.ckptfs.checkpoint").decode(), self.real("CKPT+b"))
        finally:
            unmount(mnt)
            wait_for(lambda: not os.path.ismount(mnt))
            os.rmdir(mnt)

    def test_mount_errors_are_clear(self):
        p = subprocess.run([CKPTFS, "mount", self.src, os.path.join(self.tmp, "nope")],
                           capture_output=True, text=True, timeout=30)
        self.assertEqual(p.returncode, 2)
        self.assertIn("MOUNTPOINT", p.stderr)
        p = subprocess.run([CKPTFS, "mount", self.src, self.sb], capture_output=True, text=True, timeout=30)
        self.assertEqual(p.returncode, 2)
        self.assertIn("inside SOURCE", p.stderr)


if __name__ == "__main__":
    unittest.main()
