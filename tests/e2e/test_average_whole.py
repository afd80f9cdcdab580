"""End-to-end: avg/lastN/ and avg/bestN/…/ are whole checkpoints. They list the
newest member's files; tensor files are averaged, every other file
(SpeechBrain's counter.ckpt, CKPT.yaml, hyperparams.yaml, …) is the newest
member's copy, so `cp -r MOUNT/exp/avg/last3 DEST` gives a checkpoint that
loads (real torch.load) and recovers like the newest one."""
import os
import shutil
import struct
import subprocess
import tempfile
import unittest
import zipfile

import torch

import tensor_fixtures as tf
from mount_util import mounted


class AverageWholeTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="ckptfs-e2e-avgwhole-")
        self.src = os.path.join(self.tmp, "src")
        self.exp = os.path.join(self.src, "exp")
        self.models = []
        # Four SpeechBrain checkpoints, CKPT+3 the newest; loss best at CKPT+3.
        for i in range(4):
            d = os.path.join(self.exp, f"CKPT+{i}")
            os.makedirs(d)
            with open(os.path.join(d, "CKPT.yaml"), "w") as f:
                f.write(f"end-of-epoch: true\nunixtime: {1000 + i}\nloss: {1.0 / (i + 1)}\n")
            with open(os.path.join(d, "counter.ckpt"), "w") as f:
                f.write(str(i + 1))  # SpeechBrain's EpochCounter saves a bare number
            with open(os.path.join(d, "hyperparams.yaml"), "w") as f:
                f.write(f"lr: 0.{i + 1}\n")
            torch.manual_seed(i)
            sd = {"w": torch.randn(64, 32), "h": torch.randn(16).half(), "steps": torch.tensor(i)}
            torch.save(sd, os.path.join(d, "mdl.ckpt"))
            self.models.append(sd)
        # Only the newest has this one (written mid-epoch).
        with open(os.path.join(self.exp, "CKPT+3", "dataloader-TRAIN.ckpt"), "w") as f:
            f.write("17")
        self.newest = os.path.join(self.exp, "CKPT+3")

    def tearDown(self):
        shutil.rmtree(self.tmp, ignore_errors=True)

    def read(self, path):
        with open(path, "rb") as f:
            return f.read()

    def check_whole(self, got_dir, members):
        want_names = sorted(os.listdir(self.newest))
        self.assertEqual(sorted(os.listdir(got_dir)), want_names)
        for name in want_names:
            if name == "mdl.ckpt":
                continue
            self.assertEqual(self.read(os.path.join(got_dir, name)),
                             self.read(os.path.join(self.newest, name)), name)
        # The zip ckptfs writes: every CRC-32 right (Python's zipfile checks
        # them all), every record's data aligned to 64 bytes as torch.save
        # aligns it (torch.load(mmap=True) needs that).
        with zipfile.ZipFile(os.path.join(got_dir, "mdl.ckpt")) as z:
            self.assertIsNone(z.testzip())
            with open(os.path.join(got_dir, "mdl.ckpt"), "rb") as f:
                for info in z.infolist():
                    f.seek(info.header_offset + 26)
                    name_len, extra_len = struct.unpack("<HH", f.read(4))
                    self.assertEqual((info.header_offset + 30 + name_len + extra_len) % 64, 0,
                                     info.filename)
        got = torch.load(os.path.join(got_dir, "mdl.ckpt"))
        want = tf.reference_average(members, members[0])
        self.assertEqual(list(got.keys()), list(want.keys()))
        for k in want:
            self.assertEqual(got[k].dtype, want[k].dtype, k)
            self.assertTrue(torch.equal(got[k], want[k]), k)

    def test_cp_r_of_last3_is_a_whole_checkpoint(self):
        with mounted(self.src) as (mnt, _, _):
            last3 = os.path.join(mnt, "exp", "avg", "last3")
            self.assertEqual(sorted(os.listdir(last3)), sorted(os.listdir(self.newest)))
            dest = os.path.join(self.tmp, "copy")
            subprocess.run(["cp", "-r", last3, dest], check=True, timeout=120)
            # The non-tensor files are the newest member's own (its xattr says so).
            self.assertEqual(os.getxattr(os.path.join(last3, "counter.ckpt"),
                                         "user.ckptfs.checkpoint").decode(), self.newest)
        self.check_whole(dest, self.models[:0:-1])  # CKPT+3, CKPT+2, CKPT+1

    def test_best2_lists_and_copies_the_newest_of_the_best(self):
        with mounted(self.src) as (mnt, _, _):
            best2 = os.path.join(mnt, "exp", "avg", "best2", "min", "loss")
            dest = os.path.join(self.tmp, "copy")
            subprocess.run(["cp", "-r", best2, dest], check=True, timeout=120)
        self.check_whole(dest, [self.models[3], self.models[2]])

    def test_a_file_the_newest_lacks_is_not_there(self):
        with mounted(self.src) as (mnt, _, _):
            last3 = os.path.join(mnt, "exp", "avg", "last3")
            self.assertFalse(os.path.exists(os.path.join(last3, "nothing.yaml")))
            # Held by an older member only: not the newest's file, so not listed.
            with open(os.path.join(self.exp, "CKPT+2", "old-only.txt"), "w") as f:
                f.write("x")
            self.assertNotIn("old-only.txt", os.listdir(last3))
            self.assertFalse(os.path.exists(os.path.join(last3, "old-only.txt")))


if __name__ == "__main__":
    unittest.main()
