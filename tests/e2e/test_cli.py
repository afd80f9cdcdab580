"""End-to-end tests of `ckptfs ls` and `ckptfs resolve` on experiments made by
real torch.save, checked against what real torch.load reads."""
import json
import os
import shutil
import subprocess
import tempfile
import unittest

import torch

import experiments

CKPTFS = os.environ.get("CKPTFS_BIN", "ckptfs")
WILD = os.environ.get("CKPTFS_WILD", os.path.join(os.path.dirname(__file__), "../fixtures/wild"))


def run(*args, check=True):
    p = subprocess.run([CKPTFS, *args], capture_output=True, text=True, timeout=120)
    if check and p.returncode != 0:
        raise AssertionError(f"ckptfs {' '.join(args)} exited {p.returncode}: {p.stderr}")
    return p


class CliTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="ckptfs-e2e-")
        cls.src = os.path.join(cls.tmp, "src")
        cls.index = os.path.join(cls.tmp, "state", "index.sqlite")
        cls.sb = os.path.join(cls.src, "sb")
        base = 1_700_000_000
        cls.sb_paths = experiments.speechbrain(cls.sb, [
            ("a", {"unixtime": base + 1, "loss": 0.5, "acc": 0.7, "epoch": 1, "validation-type": "full"}),
            ("b", {"unixtime": base + 2, "loss": 0.2, "acc": 0.9, "epoch": 2, "validation-type": "quick"}),
            ("c", {"unixtime": base + 3, "loss": 0.3, "acc": 0.8, "epoch": 3, "validation-type": "full"}),
            ("d", {"unixtime": base + 4, "acc": 0.95, "epoch": 4}),                  # no loss
            ("e", "unixtime: 1700000005\nloss: 0.01\n\n@ trailing garbage {"),       # invalid
        ])
        cls.hf = os.path.join(cls.src, "hf")
        experiments.huggingface(cls.hf, [(500, 0.9), (1000, 0.4), (1500, 0.6)])

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def resolve(self, vpath, check=True):
        return run("resolve", "--index", self.index, self.src, vpath, check=check)

    def real(self, vpath):
        return self.resolve(vpath).stdout.strip()

    def test_ls_lists_all_with_invalid(self):
        out = run("ls", "--index", self.index, self.src).stdout
        self.assertIn("sb/CKPT+e", out)
        self.assertIn("INVALID", out)
        self.assertIn("CKPT+e/CKPT.yaml", out)
        self.assertIn("hf/checkpoint-1500", out)
        self.assertIn("8 checkpoint(s)", out)
        rows = json.loads(run("ls", "--json", "--index", self.index, self.src).stdout)
        by_name = {r["name"]: r for r in rows}
        self.assertFalse(by_name["CKPT+e"]["valid"])
        self.assertEqual(by_name["CKPT+b"]["meta"]["loss"], 0.2)
        self.assertEqual(by_name["CKPT+b"]["meta"]["validation-type"], "quick")
        self.assertEqual(by_name["checkpoint-1000"]["meta"]["eval_loss"], 0.4)
        self.assertEqual(by_name["checkpoint-1000"]["layout"], "huggingface")

    def test_latest_best_top(self):
        self.assertEqual(self.real("/sb/latest"), os.path.join(self.sb, "CKPT+d"))
        self.assertEqual(self.real("/sb/best/min/loss"), os.path.join(self.sb, "CKPT+b"))
        self.assertEqual(self.real("/sb/best/max/loss"), os.path.join(self.sb, "CKPT+a"))
        self.assertEqual(self.real("/sb/best/max/acc"), os.path.join(self.sb, "CKPT+d"))
        self.assertEqual(self.real("/sb/top/3/min/loss/2"), os.path.join(self.sb, "CKPT+c"))
        self.assertEqual(self.real("/sb/top/3/min/loss/3"), os.path.join(self.sb, "CKPT+a"))
        self.assertEqual(self.resolve("/sb/top/3/min/loss").stdout.split(),
                         [os.path.join(self.sb, "CKPT+" + n) for n in "bca"])
        self.assertEqual(self.real("/hf/latest"), os.path.join(self.hf, "checkpoint-1500"))
        self.assertEqual(self.real("/hf/best/min/eval_loss/pytorch_model.bin"),
                         os.path.join(self.hf, "checkpoint-1000", "pytorch_model.bin"))
        # The top of the tree answers across experiments.
        self.assertEqual(self.real("/best/min/loss"), os.path.join(self.sb, "CKPT+b"))

    def test_resolved_file_is_what_torch_load_reads(self):
        path = self.real("/sb/best/min/loss/mdl.ckpt")
        loaded = torch.load(path)
        expected = torch.load(os.path.join(self.sb, "CKPT+b", "mdl.ckpt"))
        self.assertEqual(list(loaded.keys()), list(expected.keys()))
        for k in expected:
            self.assertTrue(torch.equal(loaded[k], expected[k]), k)

    def test_where_with_each_operator(self):
        cases = {
            "/sb/where/validation-type=full/best/min/loss": "CKPT+c",
            "/sb/where/validation-type!=full/latest": "CKPT+b",
            "/sb/where/epoch<2/latest": "CKPT+a",
            "/sb/where/epoch<=2/latest": "CKPT+b",
            "/sb/where/epoch>3/latest": "CKPT+d",
            "/sb/where/epoch>=3/best/min/loss": "CKPT+c",
            "/sb/where/epoch>=2/where/acc<0.9/latest": "CKPT+c",
        }
        for vpath, name in cases.items():
            self.assertEqual(self.real(vpath), os.path.join(self.sb, name), vpath)

    def test_no_match_and_bad_paths_fail_with_a_message(self):
        p = self.resolve("/sb/best/min/nosuchkey", check=False)
        self.assertEqual(p.returncode, 1)
        self.assertIn("no checkpoint matches", p.stderr)
        p = self.resolve("/sb/where/epoch>10/latest", check=False)
        self.assertEqual(p.returncode, 1)
        p = self.resolve("/sb/best/middle/loss", check=False)
        self.assertEqual(p.returncode, 1)
        self.assertIn("expected min or max", p.stderr)
        p = self.resolve("/sb/../../etc/passwd", check=False)
        self.assertEqual(p.returncode, 1)
        self.assertIn("'..'", p.stderr)

    def test_avg_resolves_to_members_newest_first(self):
        out = self.resolve("/sb/avg/last3/mdl.ckpt").stdout.split()
        self.assertEqual(out, [os.path.join(self.sb, f"CKPT+{n}", "mdl.ckpt") for n in "dcb"])
        out = self.resolve("/sb/avg/best2/min/loss/mdl.ckpt").stdout.split()
        self.assertEqual(out, [os.path.join(self.sb, f"CKPT+{n}", "mdl.ckpt") for n in "cb"])

    def test_new_checkpoint_is_seen_on_the_next_command(self):
        tmp = tempfile.mkdtemp(prefix="ckptfs-e2e-new-")
        try:
            idx = os.path.join(tmp, "i.sqlite")
            exp = os.path.join(tmp, "exp")
            experiments.speechbrain(exp, [("1", {"unixtime": 10, "loss": 1.0})])
            self.assertEqual(run("resolve", "--index", idx, exp, "/latest").stdout.strip(),
                             os.path.join(exp, "CKPT+1"))
            experiments.speechbrain(exp, [("2", {"unixtime": 20, "loss": 0.5})])
            self.assertEqual(run("resolve", "--index", idx, exp, "/best/min/loss").stdout.strip(),
                             os.path.join(exp, "CKPT+2"))
            shutil.rmtree(os.path.join(exp, "CKPT+2"))
            self.assertEqual(run("resolve", "--index", idx, exp, "/latest").stdout.strip(),
                             os.path.join(exp, "CKPT+1"))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def test_wild_huggingface_run_agrees_with_trainer(self):
        tmp = tempfile.mkdtemp(prefix="ckptfs-e2e-wild-")
        try:
            src = os.path.join(tmp, "whisper")
            shutil.copytree(os.path.join(WILD, "hf-whisper-ja"), src)
            with open(os.path.join(src, "checkpoint-5000", "trainer_state.json")) as f:
                recorded = json.load(f)
            best = os.path.basename(recorded["best_model_checkpoint"])
            got = run("resolve", "--index", os.path.join(tmp, "i"), src, "/best/min/eval_wer").stdout.strip()
            self.assertEqual(os.path.basename(got), best)
            got = run("resolve", "--index", os.path.join(tmp, "i"), src, "/best/min/eval_loss").stdout.strip()
            self.assertEqual(os.path.basename(got), "checkpoint-1000")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def test_usage_errors(self):
        p = subprocess.run([CKPTFS, "frobnicate"], capture_output=True, text=True)
        self.assertEqual(p.returncode, 2)
        self.assertIn("unknown command", p.stderr)
        p = subprocess.run([CKPTFS, "ls"], capture_output=True, text=True)
        self.assertEqual(p.returncode, 2)
        p = subprocess.run([CKPTFS, "ls", "/nonexistent/dir"], capture_output=True, text=True)
        self.assertEqual(p.returncode, 2)
        self.assertIn("/nonexistent/dir", p.stderr)
        p = subprocess.run([CKPTFS, "ls", "--bogus", self.src], capture_output=True, text=True)
        self.assertEqual(p.returncode, 2)
        p = subprocess.run([CKPTFS, "--help"], capture_output=True, text=True)
        self.assertEqual(p.returncode, 0)
        self.assertIn("resolve", p.stdout)
        p = subprocess.run([CKPTFS, "--version"], capture_output=True, text=True)
        self.assertEqual(p.returncode, 0)
        self.assertRegex(p.stdout, r"ckptfs \d+\.\d+")


if __name__ == "__main__":
    unittest.main()
