"""End-to-end tests of the safetensors/ view (issue 13): every PyTorch file of
the mount, by path, as safetensors converted without running its pickle.

Real mounts of experiments written by real torch.save; every converted file
is parsed here by numpy on its raw bytes (independent of ckptfs and of the
safetensors package, which Debian lacks) and compared with torch.load of the
original. The mount runs with allow_other so that uid 65534 (setpriv) can
try what it must not read."""
import errno
import json
import os
import shutil
import struct
import subprocess
import tempfile
import unittest

import numpy as np
import torch

from mount_util import CKPTFS, errno_of, mounted
from tensor_fixtures import Evil

NOBODY = 65534
NP_DTYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "I64": np.int64,
             "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def parse_safetensors(data):
    """(tensors as numpy arrays, __metadata__) from safetensors bytes, checking
    the format's own rules: 8-byte little-endian header length, JSON header,
    data 8-byte aligned, offsets dense and in order."""
    n = struct.unpack("<Q", data[:8])[0]
    assert (8 + n) % 8 == 0, "data section not 8-byte aligned"
    header = json.loads(data[8:8 + n])
    body = data[8 + n:]
    meta = header.pop("__metadata__", {})
    tensors, end = {}, 0
    for name, e in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"]):
        b, e_end = e["data_offsets"]
        assert b == end, f"{name}: offsets not dense ({b} after {end})"
        end = e_end
        tensors[name] = np.frombuffer(body[b:e_end], dtype=NP_DTYPES[e["dtype"]]).reshape(e["shape"])
    assert end == len(body), "data section longer than its tensors"
    return tensors, meta


def read(path):
    with open(path, "rb") as f:
        return f.read()


def model(seed, scale=1.0):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    return {k: v * scale for k, v in m.state_dict().items()}


def write_sb(path, unixtime, loss, seed, mode=0o644):
    os.makedirs(path)
    with open(os.path.join(path, "CKPT.yaml"), "w") as f:
        f.write(f"# yamllint disable\nend-of-epoch: true\nloss: {loss}\nunixtime: {unixtime}\n")
    torch.save(model(seed), os.path.join(path, "mdl.ckpt"))
    with open(os.path.join(path, "counter.ckpt"), "w") as f:  # SpeechBrain's: text
        f.write(f"{seed}\n")
    os.chmod(os.path.join(path, "mdl.ckpt"), mode)


# Runs as uid 65534: reads each path of argv[1:], prints {path: errno or "ok"}.
ATTACKER = r'''
import json, sys
out = {}
for p in sys.argv[1:]:
    try:
        with open(p, "rb") as f:
            f.read()
        out[p] = "ok"
    except OSError as e:
        out[p] = e.errno
print(json.dumps(out))
'''


class SafetensorsViewTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="ckptfs-st-")
        os.chmod(cls.tmp, 0o755)
        cls.src = os.path.join(cls.tmp, "src")
        cls.marker = os.path.join(cls.tmp, "pwned")
        exp = os.path.join(cls.src, "exp")
        for i, loss in enumerate([0.5, 0.2, 0.4, 0.3], start=1):
            write_sb(os.path.join(exp, f"CKPT+{i}"), 1000 * i, loss, seed=i)
        newest = os.path.join(exp, "CKPT+4")
        torch.save(model(40), os.path.join(newest, "model.bin"))  # clash: model.bin sorts first
        torch.save(model(41), os.path.join(newest, "model.pt"))
        torch.save(model(42), os.path.join(newest, "weights.pt"))  # beside a real weights.safetensors
        with open(os.path.join(newest, "weights.safetensors"), "wb") as f:
            raw = json.dumps({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
            raw += b" " * (-len(raw) % 8)
            f.write(struct.pack("<Q", len(raw)) + raw + np.array([1.5, 2.5], np.float32).tobytes())
        torch.save({"w": torch.ones(2), "x": Evil(cls.marker)}, os.path.join(newest, "evil.pt"))
        pl = os.path.join(cls.src, "pl")
        os.makedirs(pl)
        for epoch, loss in [(1, 0.7), (2, 0.6), (3, 0.9)]:
            torch.save({"state_dict": model(100 + epoch), "epoch": epoch},
                       os.path.join(pl, f"epoch={epoch}-step={epoch * 10}-val_loss={loss}.ckpt"))
        # An experiment whose model file only root may read (its directory is public).
        write_sb(os.path.join(cls.src, "priv", "CKPT+1"), 1000, 0.1, seed=9, mode=0o600)
        cls.script = os.path.join(cls.tmp, "attacker.py")
        with open(cls.script, "w") as f:
            f.write(ATTACKER)
        os.chmod(cls.script, 0o644)
        cls.index = os.path.join(cls.tmp, "index.sqlite")
        cls._mount = mounted(cls.src, "-o", "allow_other", index=cls.index)
        cls.mnt, cls.proc, cls.log = cls._mount.__enter__()

    @classmethod
    def tearDownClass(cls):
        try:
            cls._mount.__exit__(None, None, None)
        finally:
            shutil.rmtree(cls.tmp, ignore_errors=True)

    def m(self, *parts):
        return os.path.join(self.mnt, *parts)

    def s(self, *parts):
        return os.path.join(self.src, *parts)

    def assert_converts(self, path, original):
        """path (safetensors bytes) holds exactly the tensors of original (a dict)."""
        tensors, meta = parse_safetensors(read(path))
        self.assertEqual(sorted(tensors), sorted(original), path)
        for name, t in original.items():
            self.assertEqual(tensors[name].shape, tuple(t.shape), name)
            self.assertTrue(np.array_equal(tensors[name], t.numpy()), name)
        return meta

    def cat(self, vpath):
        p = subprocess.run([CKPTFS, "cat", "--index", os.path.join(self.tmp, "cli.sqlite"),
                            "--avg-cache", os.path.join(self.tmp, "cli-cache"), self.src, vpath],
                           capture_output=True, timeout=120)
        self.assertEqual(p.returncode, 0, p.stderr.decode(errors="replace"))
        return p.stdout

    def resolve(self, vpath):
        p = subprocess.run([CKPTFS, "resolve", "--index", os.path.join(self.tmp, "cli.sqlite"),
                            self.src, vpath], capture_output=True, timeout=120)
        self.assertEqual(p.returncode, 0, p.stderr.decode(errors="replace"))
        return p.stdout.decode().split("\n")[:-1]

    def test_best_and_average_convert(self):
        best = self.m("exp", "safetensors", "best", "min", "loss", "mdl.safetensors")
        self.assert_converts(best, torch.load(self.s("exp", "CKPT+2", "mdl.ckpt")))
        avg = self.m("exp", "safetensors", "avg", "last3", "mdl.safetensors")
        average = torch.load(self.m("exp", "avg", "last3", "mdl.ckpt"))
        self.assert_converts(avg, average)
        # The average really is one: the mean of the three newest members.
        members = [torch.load(self.s("exp", f"CKPT+{i}", "mdl.ckpt")) for i in (2, 3, 4)]
        for name, t in average.items():
            self.assertTrue(torch.allclose(t, sum(m[name] for m in members) / 3), name)
        self.assertEqual(os.stat(avg).st_size, len(read(avg)))

    def test_real_dirs_single_files_and_the_source_root(self):
        self.assert_converts(self.m("exp", "safetensors", "CKPT+1", "mdl.safetensors"),
                             torch.load(self.s("exp", "CKPT+1", "mdl.ckpt")))
        # Lightning: the dict's top-level keys are prefixes, numbers metadata.
        name = "epoch=2-step=20-val_loss=0.6"
        original = torch.load(self.s("pl", name + ".ckpt"))
        expected = {"state_dict." + k: v for k, v in original["state_dict"].items()}
        meta = self.assert_converts(self.m("pl", "safetensors", name + ".safetensors"), expected)
        self.assertEqual(json.loads(meta["epoch"]), 2)
        self.assertEqual(read(self.m("pl", "safetensors", "best", "min", "val_loss", "checkpoint.safetensors")),
                         read(self.m("pl", "safetensors", name + ".safetensors")))
        self.assertEqual(sorted(os.listdir(self.m("pl", "safetensors", "latest"))),
                         ["checkpoint.safetensors", "epoch=3-step=30-val_loss=0.9.safetensors"])
        # The source root mirrors the experiments and its own views.
        root = os.listdir(self.m("safetensors"))
        for n in ("exp", "pl", "priv", "best", "latest", "avg", "index.json"):
            self.assertIn(n, root)
        self.assertNotIn("new", root)
        self.assertNotIn("safetensors", root)
        self.assertEqual(read(self.m("safetensors", "exp", "best", "min", "loss", "mdl.safetensors")),
                         read(self.m("exp", "safetensors", "best", "min", "loss", "mdl.safetensors")))
        self.assert_converts(self.m("safetensors", "best", "min", "loss", "mdl.safetensors"),
                             torch.load(self.s("priv", "CKPT+1", "mdl.ckpt")))  # loss 0.1 overall
        self.assertEqual(errno_of(lambda: os.listdir(self.m("exp", "safetensors", "safetensors"))),
                         errno.ENOENT)
        self.assertEqual(errno_of(lambda: os.listdir(self.m("exp", "safetensors", "new"))), errno.ENOENT)

    def test_other_files_pass_through_and_the_clash_rule(self):
        latest = self.m("exp", "safetensors", "latest")
        self.assertEqual(sorted(os.listdir(latest)),
                         ["CKPT.yaml", "counter.ckpt", "evil.safetensors", "mdl.safetensors",
                          "model.pt.safetensors", "model.safetensors", "weights.pt.safetensors",
                          "weights.safetensors"])
        newest = self.s("exp", "CKPT+4")
        for n in ("CKPT.yaml", "counter.ckpt", "weights.safetensors"):
            self.assertEqual(read(os.path.join(latest, n)), read(os.path.join(newest, n)), n)
        self.assert_converts(os.path.join(latest, "model.safetensors"),
                             torch.load(os.path.join(newest, "model.bin")))
        self.assert_converts(os.path.join(latest, "model.pt.safetensors"),
                             torch.load(os.path.join(newest, "model.pt")))
        self.assert_converts(os.path.join(latest, "weights.pt.safetensors"),
                             torch.load(os.path.join(newest, "weights.pt")))
        self.assertEqual(errno_of(lambda: read(os.path.join(latest, "model.pt"))), errno.ENOENT)
        # avg/: files not every member holds are the newest member's copies,
        # here too (converted when they are PyTorch files).
        self.assertEqual(sorted(os.listdir(self.m("exp", "safetensors", "avg", "last3"))),
                         sorted(os.listdir(latest)))
        self.assert_converts(self.m("exp", "safetensors", "avg", "last3", "model.safetensors"),
                             torch.load(os.path.join(newest, "model.bin")))
        for base in (self.m("exp", "avg", "last3"), self.m("exp", "safetensors", "avg", "last3")):
            self.assertEqual(read(os.path.join(base, "counter.ckpt")), b"4\n")

    def test_read_only(self):
        latest = self.m("exp", "safetensors", "latest")
        self.assertEqual(errno_of(lambda: open(os.path.join(latest, "x.txt"), "wb")), errno.EROFS)
        self.assertEqual(errno_of(lambda: open(os.path.join(latest, "mdl.safetensors"), "r+b")),
                         errno.EROFS)
        self.assertEqual(errno_of(lambda: os.unlink(os.path.join(latest, "mdl.safetensors"))),
                         errno.EROFS)
        self.assertEqual(errno_of(lambda: os.mkdir(self.m("exp", "safetensors", "d"))), errno.EROFS)
        self.assertEqual(errno_of(lambda: os.mkdir(self.m("exp", "safetensors", "new"))), errno.EROFS)

    def test_globals_xattr(self):
        name = "user.ckptfs.globals"
        for path in (self.m("exp", "CKPT+1", "mdl.ckpt"), self.m("exp", "latest", "mdl.ckpt"),
                     self.m("exp", "avg", "last3", "mdl.ckpt"),
                     self.m("exp", "safetensors", "latest", "mdl.safetensors"),
                     self.m("exp", "safetensors", "avg", "last3", "mdl.safetensors"),
                     self.m("exp", "latest", "weights.safetensors"),
                     self.m("pl", "latest", "checkpoint.ckpt")):
            self.assertEqual(os.getxattr(path, name), b"safe", path)
            self.assertIn(name, os.listxattr(path), path)
        for path in (self.m("exp", "latest", "evil.pt"),
                     self.m("exp", "safetensors", "latest", "evil.safetensors")):
            value = os.getxattr(path, name).decode()
            self.assertTrue(value.startswith("unsafe: "), value)
            self.assertIn("system", value)
        for path in (self.m("exp", "latest", "CKPT.yaml"), self.m("exp", "latest", "counter.ckpt")):
            self.assertEqual(errno_of(lambda: os.getxattr(path, name)), errno.ENODATA, path)
            self.assertNotIn(name, os.listxattr(path))
        # The unsafe file converts all the same, and nothing of it ran.
        tensors, meta = parse_safetensors(read(self.m("exp", "safetensors", "latest", "evil.safetensors")))
        self.assertTrue(np.array_equal(tensors["w"], np.ones(2, np.float32)))
        self.assertIn("system", json.dumps(meta))
        self.assertFalse(os.path.exists(self.marker))

    def test_a_caller_reads_no_conversion_of_what_it_cannot_read(self):
        if os.geteuid() != 0:
            self.skipTest("needs root to act as uid 65534")
        private = self.m("priv", "safetensors", "latest", "mdl.safetensors")
        public = self.m("exp", "safetensors", "best", "min", "loss", "mdl.safetensors")
        # Root converts both first: a cached conversion is no way around the check.
        self.assert_converts(private, torch.load(self.s("priv", "CKPT+1", "mdl.ckpt")))
        read(public)
        p = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                            "/usr/bin/python3", self.script, private, public,
                            self.m("safetensors", "priv", "CKPT+1", "mdl.safetensors"),
                            self.m("priv", "CKPT+1", "mdl.ckpt")],
                           capture_output=True, timeout=120)
        self.assertEqual(p.returncode, 0, p.stderr.decode(errors="replace"))
        got = json.loads(p.stdout)
        self.assertEqual(got[public], "ok")
        for path, e in got.items():
            if path != public:
                self.assertEqual(e, errno.EACCES, path)

    def test_cat_and_resolve(self):
        for vpath in ("/exp/safetensors/best/min/loss/mdl.safetensors",
                      "/exp/safetensors/avg/last3/mdl.safetensors",
                      "/safetensors/pl/latest/checkpoint.safetensors",
                      "/exp/safetensors/latest/model.pt.safetensors"):
            self.assertEqual(self.cat(vpath), read(self.mnt + vpath), vpath)
        for vpath in ("/exp/avg/last3/counter.ckpt", "/exp/safetensors/avg/last3/counter.ckpt",
                      "/exp/avg/last3/CKPT.yaml", "/exp/safetensors/latest/weights.safetensors"):
            self.assertEqual(self.cat(vpath), read(self.mnt + vpath), vpath)
        self.assertEqual(self.resolve("/exp/avg/last3/counter.ckpt"),
                         [self.s("exp", "CKPT+4", "counter.ckpt")])
        self.assertEqual(self.resolve("/exp/safetensors/best/min/loss/mdl.safetensors"),
                         [self.s("exp", "CKPT+2", "mdl.ckpt")])
        self.assertEqual(self.resolve("/exp/safetensors/avg/last3/mdl.safetensors"),
                         [self.s("exp", f"CKPT+{i}", "mdl.ckpt") for i in (4, 3, 2)])


if __name__ == "__main__":
    unittest.main()
