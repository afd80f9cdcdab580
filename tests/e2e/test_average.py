"""End-to-end tests of averaging (DESIGN.md §3): `ckptfs cat` of avg/ paths on
checkpoints written by real torch.save, checked with real torch.load against
a Python reference average, and through a real mount."""
import argparse
import collections
import errno
import os
import shutil
import subprocess
import tempfile
import unittest

import torch

import tensor_fixtures as tf
from mount_util import CKPTFS, errno_of, mounted


class AverageTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="ckptfs-e2e-avg-")
        self.src = os.path.join(self.tmp, "src")
        self.index = os.path.join(self.tmp, "index.sqlite")

    def tearDown(self):
        shutil.rmtree(self.tmp, ignore_errors=True)

    def experiment(self, name, objects, file="model.ckpt", save=None):
        """CKPT+i directories, CKPT+{n-1} newest; returns the member paths newest first."""
        exp = os.path.join(self.src, name)
        paths = []
        for i, obj in enumerate(objects):
            d = os.path.join(exp, f"CKPT+{i}")
            os.makedirs(d)
            with open(os.path.join(d, "CKPT.yaml"), "w") as f:
                f.write(f"unixtime: {1000 + i}\nloss: {1.0 / (i + 1)}\n")
            p = os.path.join(d, file)
            (save or torch.save)(obj, p)
            paths.append(p)
        return paths[::-1]

    def cat(self, vpath, check=True):
        p = subprocess.run([CKPTFS, "cat", "--index", self.index, self.src, vpath],
                           capture_output=True, timeout=300)
        if check and p.returncode != 0:
            raise AssertionError(f"cat {vpath}: {p.stderr.decode()}")
        return p

    def cat_to_file(self, vpath, name="out.ckpt"):
        out = os.path.join(self.tmp, name)
        with open(out, "wb") as f:
            f.write(self.cat(vpath).stdout)
        return out

    def assert_same(self, got, want, where=""):
        self.assertEqual(type(got), type(want), where)
        if torch.is_tensor(want):
            self.assertEqual(got.dtype, want.dtype, where)
            self.assertEqual(got.shape, want.shape, where)
            self.assertTrue(torch.equal(got, want) or (got.isnan() == want.isnan()).all()
                            and torch.equal(got[~got.isnan()], want[~want.isnan()]), where)
        elif isinstance(want, dict):
            self.assertEqual(list(got.keys()), list(want.keys()), where)
            for k in want:
                self.assert_same(got[k], want[k], f"{where}.{k}")
        elif isinstance(want, (list, tuple)):
            self.assertEqual(len(got), len(want), where)
            for i, (a, b) in enumerate(zip(got, want)):
                self.assert_same(a, b, f"{where}.{i}")
        else:
            self.assertEqual(got, want, where)

    def test_state_dict_matches_reference(self):
        for protocol in (2, 4):
            with self.subTest(protocol=protocol):
                name = f"sd{protocol}"
                paths = self.experiment(name, [tf.state_dict(i) for i in range(3)],
                                        save=lambda o, p: torch.save(o, p, pickle_protocol=protocol))
                out = torch.load(self.cat_to_file(f"/{name}/avg/last3/model.ckpt", f"{name}.ckpt"))
                members = [torch.load(p) for p in paths]
                self.assertIsInstance(out, collections.OrderedDict)
                self.assertEqual(out._metadata, members[0]._metadata)
                self.assert_same(out, tf.reference_average(members, members[0]))
                # num_batches_tracked stays int64, from the newest member.
                self.assertEqual(out["bn.num_batches_tracked"].dtype, torch.int64)
                self.assertEqual(int(out["bn.num_batches_tracked"]), 3)
                # weights_only loading works as it does for the inputs (torch 1.13's
                # weights-only unpickler does not know protocol 4's FRAME).
                try:
                    torch.load(paths[0], weights_only=True)
                    torch.load(os.path.join(self.tmp, f"{name}.ckpt"), weights_only=True)
                except Exception:  # noqa: BLE001
                    self.assertEqual(protocol, 4)
                    with self.assertRaises(Exception):
                        torch.load(os.path.join(self.tmp, f"{name}.ckpt"), weights_only=True)
                # A model loads it as it loads its own state_dict.
                net = tf.Net()
                net.load_state_dict(out)

    def test_lightning_checkpoint_keeps_everything_but_floats_from_newest(self):
        paths = self.experiment("pl", [tf.lightning(i) for i in range(3)])
        out = torch.load(self.cat_to_file("/pl/avg/best2/min/loss/model.ckpt"))
        # best2 by loss: CKPT+2 (1/3) and CKPT+1 (1/2); newest first.
        members = [torch.load(p) for p in paths[:2]]
        self.assertEqual(out["epoch"], 2)
        self.assertEqual(out["hyper_parameters"], argparse.Namespace(lr=0.003, name="run2"))
        self.assertEqual(out["pytorch-lightning_version"], "1.9.0")
        self.assert_same(out["state_dict"], tf.reference_average([m["state_dict"] for m in members],
                                                              members[0]["state_dict"]))
        got_opt, want = out["optimizer_states"][0], [m["optimizer_states"][0] for m in members]
        self.assertEqual(got_opt["param_groups"], want[0]["param_groups"])
        for pid, st in want[0]["state"].items():
            self.assert_same(got_opt["state"][pid],
                             tf.reference_average([w["state"][pid] for w in want], st), f"state.{pid}")
        score = out["callbacks"]["ModelCheckpoint"]["best_model_score"]
        self.assertAlmostEqual(float(score), (0.3 + 0.4) / 2, places=6)

    def test_shared_storage_views_and_dtypes(self):
        paths = self.experiment("tied", [tf.tied(i) for i in range(3)], file="w.pt")
        out = torch.load(self.cat_to_file("/tied/avg/last3/w.pt"))
        members = [torch.load(p) for p in paths]
        self.assert_same(out, tf.reference_average(members, members[0]))
        self.assertEqual(out["enc.weight"].data_ptr(), out["dec.weight"].data_ptr())
        self.assertTrue(torch.equal(out["row"], out["enc.weight"][1]))
        self.assertTrue(torch.equal(out["wt"], out["enc.weight"].t()))
        self.assertEqual(out["half"].dtype, torch.float16)
        self.assertEqual(out["bf"].dtype, torch.bfloat16)
        self.assertTrue(torch.isnan(out["nan"][0]))  # NaN passes through, not an error
        self.assertTrue(torch.equal(out["steps"], members[0]["steps"]))
        self.assertTrue(torch.equal(out["mask"], members[0]["mask"]))

    def test_safetensors(self):
        objs = [collections.OrderedDict([("w", torch.randn(3, 4)), ("h", torch.randn(4).half()),
                                         ("ids", torch.arange(3) + i)]) for i in range(3)]
        paths = self.experiment("st", objs, file="model.safetensors", save=tf.save_safetensors)
        out = tf.load_safetensors(self.cat_to_file("/st/avg/last3/model.safetensors", "o.safetensors"))
        members = [tf.load_safetensors(p) for p in paths]
        self.assert_same(out, tf.reference_average(members, members[0]))

    def test_bad_members_fail_naming_file_and_tensor(self):
        base = [tf.state_dict(i) for i in range(3)]
        cases = {}
        shape = [dict(m) for m in base]
        shape[0]["lin.weight"] = torch.zeros(2, 2)
        cases["shape"] = (shape, "lin.weight")
        missing = [dict(m) for m in base]
        del missing[0]["lin.bias"]
        cases["missing"] = (missing, "lin.bias")
        dtype = [dict(m) for m in base]
        dtype[0]["lin.bias"] = dtype[0]["lin.bias"].double()
        cases["dtype"] = (dtype, "lin.bias")
        for name, (objs, tensor) in cases.items():
            with self.subTest(case=name):
                self.experiment(name, objs)
                p = self.cat(f"/{name}/avg/last3/model.ckpt", check=False)
                self.assertEqual(p.returncode, 1)
                self.assertIn(tensor, p.stderr.decode())
                self.assertIn("CKPT+", p.stderr.decode())
                self.assertEqual(p.stdout, b"")

    def test_corrupt_files_fail_cleanly(self):
        paths = self.experiment("corrupt", [tf.state_dict(i) for i in range(3)])
        with open(paths[1], "r+b") as f:
            f.truncate(os.path.getsize(paths[1]) // 2)
        p = self.cat("/corrupt/avg/last3/model.ckpt", check=False)
        self.assertEqual(p.returncode, 1)
        self.assertIn(paths[1], p.stderr.decode())
        with open(paths[1], "wb") as f:
            f.write(b"this is not a checkpoint at all")
        p = self.cat("/corrupt/avg/last3/model.ckpt", check=False)
        self.assertEqual(p.returncode, 1)
        self.assertIn(paths[1], p.stderr.decode())
        # Legacy (pre-1.6) files are refused with a clear message.
        torch.save(tf.state_dict(0), paths[1], _use_new_zipfile_serialization=False)
        self.experiment("legacy", [tf.state_dict(i) for i in range(2)],
                        save=lambda o, p: torch.save(o, p, _use_new_zipfile_serialization=False))
        p = self.cat("/legacy/avg/last2/model.ckpt", check=False)
        self.assertEqual(p.returncode, 1)
        self.assertIn("legacy", p.stderr.decode())

    def test_code_in_a_pickle_never_runs(self):
        marker = os.path.join(self.tmp, "pwned")
        objs = [{"w": torch.full((2,), float(i)), "x": tf.Evil(marker)} for i in range(3)]
        self.experiment("evil", objs)
        out = self.cat_to_file("/evil/avg/last3/model.ckpt")
        self.assertFalse(os.path.exists(marker))
        # The object is carried as data: loading without weights_only would run it,
        # so check with weights_only (refuses it) and by reading the pickle text.
        with self.assertRaises(Exception):
            torch.load(out, weights_only=True)
        self.assertFalse(os.path.exists(marker))
        import zipfile
        with zipfile.ZipFile(out) as z:
            pkl = [n for n in z.namelist() if n.endswith("data.pkl")][0]
            self.assertIn(b"system", z.read(pkl))

    def test_through_the_mount(self):
        paths = self.experiment("m", [tf.state_dict(i) for i in range(4)])
        with mounted(self.src, index=self.index) as (mnt, _, log):
            path = os.path.join(mnt, "m", "avg", "last3", "model.ckpt")
            # The newest member's files: model.ckpt averaged, CKPT.yaml its copy.
            self.assertEqual(sorted(os.listdir(os.path.join(mnt, "m", "avg", "last3"))),
                             ["CKPT.yaml", "model.ckpt"])
            out = torch.load(path)
            members = [torch.load(p) for p in paths[:3]]
            self.assert_same(out, tf.reference_average(members, members[0]))
            self.assertEqual(os.getxattr(path, "user.ckptfs.members").decode().split(), paths[:3])
            with open(path, "rb") as f:
                self.assertEqual(f.read(), self.cat("/m/avg/last3/model.ckpt").stdout)
            # A new checkpoint changes the members: the next open recomputes.
            newer = self.experiment("m2", [tf.state_dict(9)])[0]
            d = os.path.join(self.src, "m", "CKPT+9")
            shutil.move(os.path.dirname(newer), d)
            with open(os.path.join(d, "CKPT.yaml"), "w") as f:
                f.write("unixtime: 2000\nloss: 0.1\n")
            import mount_util
            want = [os.path.join(d, "model.ckpt")] + paths[:2]
            self.assertTrue(mount_util.wait_for(
                lambda: os.getxattr(path, "user.ckptfs.members").decode().split() == want, timeout=3))
            members = [torch.load(p) for p in want]
            self.assert_same(torch.load(path), tf.reference_average(members, members[0]))
            # Members that disagree: EIO, and the log names the tensor.
            bad = tf.state_dict(5)
            bad["lin.weight"] = torch.zeros(1)
            torch.save(bad, paths[1])
            self.assertTrue(mount_util.wait_for(lambda: errno_of(lambda: _read(path)) == errno.EIO, timeout=3))
            with open(log) as f:
                self.assertIn("lin.weight", f.read())
            # Other views keep working.
            torch.load(os.path.join(mnt, "m", "latest", "model.ckpt"))


def _read(path):
    with open(path, "rb") as f:
        return f.read()


if __name__ == "__main__":
    unittest.main()
