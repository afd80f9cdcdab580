"""End-to-end tests of `ckptfs inspect`: real torch.save files, clean and
carrying os.system / eval / subprocess.Popen REDUCEs; nothing may run, the
exit status gates (0 safe, 3 unsafe, 1 error)."""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import unittest

import torch

import experiments

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "../fixtures/convert"))
import torch_cases  # noqa: E402

CKPTFS = os.environ.get("CKPTFS_BIN", "ckptfs")


def inspect(*args):
    return subprocess.run([CKPTFS, "inspect", *args], capture_output=True, text=True, timeout=120)


class InspectTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="ckptfs-e2e-")
        cls.src = os.path.join(cls.tmp, "src")
        cls.index = os.path.join(cls.tmp, "state", "index.sqlite")
        cls.sb = os.path.join(cls.src, "sb")
        base = 1_700_000_000
        experiments.speechbrain(cls.sb, [
            ("a", {"unixtime": base + 1, "loss": 0.5}),
            ("b", {"unixtime": base + 2, "loss": 0.2}),
            ("c", {"unixtime": base + 3, "loss": 0.3}),
        ])
        cls.marker = os.path.join(cls.tmp, "PWNED_")
        os.environ["CKPTFS_PWNED"] = cls.marker
        # A checkpoint of the experiment carries the REDUCEs too.
        torch.save(torch_cases.case("unsafe"), os.path.join(cls.sb, "CKPT+b", "evil.ckpt"))
        cls.unsafe = os.path.join(cls.tmp, "unsafe.pt")
        torch.save(torch_cases.case("unsafe"), cls.unsafe)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def assertNothingRan(self):
        for name in ("system", "eval", "popen"):
            self.assertFalse(os.path.exists(self.marker + name), "executed: " + name)

    def test_clean_file_exits_0(self):
        path = os.path.join(self.sb, "CKPT+a", "mdl.ckpt")
        p = inspect(path)
        self.assertEqual(p.returncode, 0, p.stderr)
        sd = torch.load(path)
        for name, t in sd.items():
            self.assertIn(f"tensor  {name}  ", p.stdout)
        self.assertIn("global  torch._utils._rebuild_tensor_v2  allowed", p.stdout)
        self.assertNotIn("NOT ALLOWED", p.stdout)
        self.assertIn("verdict: safe", p.stdout)

    def test_json_matches_torch_load(self):
        path = os.path.join(self.sb, "CKPT+c", "mdl.ckpt")
        p = inspect("--json", path)
        self.assertEqual(p.returncode, 0, p.stderr)
        doc = json.loads(p.stdout)
        self.assertTrue(doc["safe"])
        self.assertEqual(doc["verdict"], "safe")
        sd = torch.load(path)
        got = {t["name"]: t for t in doc["tensors"]}
        self.assertEqual(set(got), set(sd))
        for name, t in sd.items():
            self.assertEqual(got[name]["shape"], list(t.shape))
            self.assertEqual(got[name]["bytes"], t.numel() * t.element_size())
        self.assertEqual(got["1.num_batches_tracked"]["dtype"], "I64")
        self.assertTrue(all(g["allowed"] for g in doc["globals"]))

    def test_unsafe_reduces_exit_3_and_are_named(self):
        p = inspect(self.unsafe)
        self.assertEqual(p.returncode, 3, p.stderr)
        for g in ("posix.system", "__builtin__.eval", "commands.Popen"):
            self.assertIn(f"global  {g}  NOT ALLOWED", p.stdout)
        self.assertIn("verdict: unsafe: posix.system, __builtin__.eval, commands.Popen", p.stdout)
        p = inspect("--json", self.unsafe)
        self.assertEqual(p.returncode, 3, p.stderr)
        doc = json.loads(p.stdout)
        self.assertFalse(doc["safe"])
        bad = sorted(g["name"] for g in doc["globals"] if not g["allowed"])
        self.assertEqual(bad, ["__builtin__.eval", "commands.Popen", "posix.system"])
        values = {v["name"]: v for v in doc["values"]}
        self.assertEqual(values["system"]["value"], "posix.system")
        self.assertTrue(values["system"]["opaque"])
        self.assertNotIn("touch", p.stdout)  # contents of opaque objects are never shown
        self.assertNothingRan()

    def test_virtual_paths_like_cat(self):
        p = inspect("--index", self.index, self.src, "/sb/best/min/loss/evil.ckpt")
        self.assertEqual(p.returncode, 3, p.stderr)
        self.assertIn("posix.system  NOT ALLOWED", p.stdout)
        self.assertIn(os.path.join(self.sb, "CKPT+b", "evil.ckpt"), p.stdout)
        p = inspect("--json", "--index", self.index, self.src, "/sb/latest/mdl.ckpt")
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertTrue(json.loads(p.stdout)["safe"])
        # An average is computed (or taken from the cache) and inspected.
        p = inspect("--index", self.index, "--avg-cache", os.path.join(self.tmp, "avg"), self.src,
                    "/sb/avg/last3/mdl.ckpt")
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertIn("tensor  0.weight  F32  [4,8]  128 bytes", p.stdout)
        p = inspect("--index", self.index, self.src, "/sb/best/min/loss")
        self.assertEqual(p.returncode, 1)
        self.assertIn("not a file", p.stderr)
        self.assertNothingRan()

    def test_broken_files_exit_1_naming_them(self):
        good = open(os.path.join(self.sb, "CKPT+a", "mdl.ckpt"), "rb").read()
        cases = {"half.pt": good[: len(good) // 2], "head.pt": good[:40], "text.pt": b"hello",
                 "empty.pt": b"", "st.safetensors": b"\x10\0\0\0\0\0\0\0{\"a\":1}"}
        flipped = bytearray(good)
        at = good.find(b"data.pkl") + 60
        for i in range(at, at + 100):
            flipped[i] ^= 0x5A
        cases["flipped.pt"] = bytes(flipped)
        for name, data in cases.items():
            path = os.path.join(self.tmp, name)
            with open(path, "wb") as f:
                f.write(data)
            p = inspect(path)
            self.assertEqual(p.returncode, 1, f"{name}: {p.stdout} {p.stderr}")
            self.assertIn(path, p.stderr)
        p = inspect(os.path.join(self.tmp, "missing.pt"))
        self.assertEqual(p.returncode, 1)
        self.assertIn("missing.pt", p.stderr)

    def test_usage(self):
        p = inspect("--help")
        self.assertEqual(p.returncode, 0)
        self.assertIn("inspect [--json] PATH", p.stdout)
        p = inspect()
        self.assertEqual(p.returncode, 2)
        self.assertIn("inspect", p.stderr)


if __name__ == "__main__":
    unittest.main()
