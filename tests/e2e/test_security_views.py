"""End-to-end tests of the permission model (docs/DESIGN.md, "Security"): a
root daemon mounted with allow_other, an ordinary user (uid 65534) as the
attacker. Through any view the attacker gets nothing it could not read in
SOURCE; root still reads everything; a world-readable experiment stays fully
usable; swapping a directory for a symbolic link never leaks a byte."""
import base64
import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
import unittest

import torch

from mount_util import checkpoint_of, mounted, wait_for

NOBODY = 65534
SECRET = 7777.0  # every tensor of the root-only checkpoints holds this

# Runs as uid 65534: one job (argv[1]: JSON) and prints a JSON answer.
ATTACKER = r'''
import base64, errno, json, os, sys

def read(path):
    try:
        with open(path, "rb") as f:
            return {"data": base64.b64encode(f.read()).decode()}
    except OSError as e:
        return {"errno": e.errno}

def listdir(path):
    try:
        return {"names": sorted(os.listdir(path))}
    except OSError as e:
        return {"errno": e.errno}

def xattr(path, name):
    try:
        return {"value": os.getxattr(path, name).decode("utf-8", "surrogateescape")}
    except OSError as e:
        return {"errno": e.errno}

def race_passthrough(job):
    # race/d/NAME is public; race/d swapped for a link to a root-only dir.
    race, mnt_race, out = job["race"], job["mnt_race"], []
    for _ in range(job["iterations"]):
        path = os.path.join(mnt_race, "d", "NAME")
        got = []
        try:
            dfd = os.open(os.path.join(mnt_race, "d"), os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            dfd = -1
        got.append(read(path))  # looked up, inode cached
        try:  # holds the inode itself: a reopen skips every lookup
            pfd = os.open(path, os.O_PATH)
        except OSError:
            pfd = -1
        os.rename(os.path.join(race, "d"), os.path.join(race, "d.old"))
        os.symlink(job["secret_dir"], os.path.join(race, "d"))
        got.append(read(path))
        if dfd >= 0:
            try:
                fd = os.open("NAME", os.O_RDONLY, dir_fd=dfd)
                got.append({"data": base64.b64encode(os.read(fd, 4096)).decode()})
                os.close(fd)
            except OSError as e:
                got.append({"errno": e.errno})
            os.close(dfd)
        if pfd >= 0:
            got.append(read("/proc/self/fd/%d" % pfd))
            os.close(pfd)
        os.unlink(os.path.join(race, "d"))
        os.rename(os.path.join(race, "d.old"), os.path.join(race, "d"))
        out.extend(g["data"] for g in got if "data" in g)
    return sorted(set(out))

def race_average(job):
    # exp/CKPT+1 (public) swapped for a link to a root-only checkpoint.
    exp, avg, out = job["exp"], job["avg"], []
    for _ in range(job["iterations"]):
        got = [read(avg)]
        os.rename(os.path.join(exp, "CKPT+1"), os.path.join(exp, "old"))
        os.symlink(job["secret_ckpt"], os.path.join(exp, "CKPT+1"))
        got.append(read(avg))
        os.unlink(os.path.join(exp, "CKPT+1"))
        os.rename(os.path.join(exp, "old"), os.path.join(exp, "CKPT+1"))
        got.append(read(avg))
        out.extend(g["data"] for g in got if "data" in g)
    return sorted(set(out))

def walk(job):
    # Every file read through the mount must be a file this user can read
    # in the source, with the same bytes.
    mnt, src, report = job["mnt"], job["src"], {"read": 0, "bad": []}
    for dirpath, dirnames, filenames in os.walk(mnt):
        for name in filenames:
            path = os.path.join(dirpath, name)
            r = read(path)
            if "data" not in r:
                continue
            data = base64.b64decode(r["data"])
            report["read"] += 1
            rel = os.path.relpath(path, mnt)
            members = xattr(path, "user.ckptfs.members")
            real = xattr(path, "user.ckptfs.real_path")
            if "value" in members:  # an average: every member readable here
                for m in members["value"].splitlines():
                    if "data" not in read(m):
                        report["bad"].append([rel, "member " + m])
                continue
            if name == "index.json" and "value" not in real:
                for c in json.loads(data):
                    if "names" not in listdir(c["path"]) and "data" not in read(c["path"]):
                        report["bad"].append([rel, "lists " + c["path"]])
                continue
            if name == ".ckptfs-status":
                continue  # checked by its own test
            source = real["value"] if "value" in real else os.path.join(src, rel)
            mine = read(source)
            if "data" not in mine or base64.b64decode(mine["data"]) != data:
                report["bad"].append([rel, source])
    return report

job = json.loads(open(sys.argv[1]).read())
kind = job["kind"]
if kind == "probe":
    out = {}
    for p in job.get("read", []):
        out["read:" + p] = read(p)
    for p in job.get("list", []):
        out["list:" + p] = listdir(p)
    for p, n in job.get("xattr", []):
        out["xattr:" + p + ":" + n] = xattr(p, n)
elif kind == "race_passthrough":
    out = race_passthrough(job)
elif kind == "race_average":
    out = race_average(job)
else:
    out = walk(job)
print(json.dumps(out))
'''


def model(value=None, seed=0):
    torch.manual_seed(seed)
    sd = torch.nn.Linear(4, 2).state_dict()
    if value is not None:
        sd = {k: torch.full_like(v, value) for k, v in sd.items()}
    return sd


def write_ckpt(path, unixtime, loss, value=None, seed=0, mode=0o644):
    os.makedirs(path)
    with open(os.path.join(path, "CKPT.yaml"), "w") as f:
        f.write(f"unixtime: {unixtime}\nloss: {loss}\n")
    torch.save(model(value, seed), os.path.join(path, "mdl.ckpt"))
    for name in os.listdir(path):
        os.chmod(os.path.join(path, name), mode)


def holds_secret(data):
    """Whether torch bytes hold a tensor of the root-only checkpoints."""
    path = tempfile.mktemp(prefix="ckptfs-sec-load-")
    with open(path, "wb") as f:
        f.write(data)
    try:
        sd = torch.load(path)
    except Exception:  # not a torch file: compare raw bytes
        return str(SECRET).encode() in data
    finally:
        os.unlink(path)
    return any(torch.is_tensor(v) and bool((v == SECRET).any()) for v in sd.values())


class SecurityViewsTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="ckptfs-e2e-sec-")
        os.chmod(self.tmp, 0o755)  # the attacker must reach the source to compare
        self.src = os.path.join(self.tmp, "src")
        os.makedirs(self.src)
        os.chmod(self.src, 0o755)
        # pub: world-readable.
        write_ckpt(os.path.join(self.src, "pub", "CKPT+a"), 1000, 0.5, seed=1)
        write_ckpt(os.path.join(self.src, "pub", "CKPT+b"), 2000, 0.4, seed=2)
        # mixed: CKPT+2 (best, newest) is a 0700 directory; CKPT+3 has 0600 files.
        mixed = os.path.join(self.src, "mixed")
        write_ckpt(os.path.join(mixed, "CKPT+1"), 1000, 0.9, seed=3)
        write_ckpt(os.path.join(mixed, "CKPT+2"), 3000, 0.1, value=SECRET)
        os.chmod(os.path.join(mixed, "CKPT+2"), 0o700)
        write_ckpt(os.path.join(mixed, "CKPT+3"), 2000, 0.5, value=SECRET, mode=0o600)
        # private: a 0700 experiment directory.
        write_ckpt(os.path.join(self.src, "private", "exp", "CKPT+9"), 9000, 0.01, value=SECRET)
        os.chmod(os.path.join(self.src, "private"), 0o700)
        self.script = os.path.join(self.tmp, "attacker.py")
        with open(self.script, "w") as f:
            f.write(ATTACKER)
        os.chmod(self.script, 0o644)

    def tearDown(self):
        shutil.rmtree(self.tmp, ignore_errors=True)

    def mount(self, *extra):
        return mounted(self.src, "-o", "allow_other", *extra,
                       index=os.path.join(self.tmp, "index.sqlite"))

    def attacker(self, job, timeout=300):
        path = tempfile.mktemp(prefix="job-", dir=self.tmp)
        with open(path, "w") as f:
            json.dump(job, f)
        os.chmod(path, 0o644)
        p = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                            "/usr/bin/python3", self.script, path],
                           capture_output=True, timeout=timeout)
        self.assertEqual(p.returncode, 0, p.stderr.decode(errors="replace"))
        return json.loads(p.stdout)

    def probe(self, read=(), listing=(), xattrs=()):
        return self.attacker({"kind": "probe", "read": list(read), "list": list(listing),
                              "xattr": [list(x) for x in xattrs]})

    def assert_no_secret(self, answers):
        for key, r in answers.items():
            if "data" in r:
                self.assertFalse(holds_secret(base64.b64decode(r["data"])), key)
            for field in ("value",):
                if field in r:
                    self.assertNotIn("CKPT+2", r[field], key)
                    self.assertNotIn("private", r[field], key)

    def test_views_show_only_what_the_caller_can_read(self):
        with self.mount() as (mnt, _, _):
            m = os.path.join(mnt, "mixed")
            # Root sees the private checkpoint everywhere.
            self.assertEqual(checkpoint_of(os.path.join(m, "best", "min", "loss")),
                             os.path.join(self.src, "mixed", "CKPT+2"))
            self.assertEqual(checkpoint_of(os.path.join(m, "latest")),
                             os.path.join(self.src, "mixed", "CKPT+2"))
            with open(os.path.join(m, "avg", "last1", "mdl.ckpt"), "rb") as f:
                self.assertTrue(holds_secret(f.read()))
            with open(os.path.join(mnt, "private", "exp", "avg", "last1", "mdl.ckpt"), "rb") as f:
                self.assertTrue(holds_secret(f.read()))
            self.assertIn("CKPT+9", open(os.path.join(mnt, "index.json")).read())
            self.assertIn("private", open(os.path.join(mnt, ".ckptfs-status")).read())

            views = ["best/min/loss", "latest", "top/3/min/loss/1", "top/3/min/loss/2",
                     "where/loss<1/best/min/loss", "best/max/loss"]
            reads = []
            for scope in ("", "mixed", "private/exp"):
                base = os.path.join(mnt, scope) if scope else mnt
                for v in views:
                    for f in ("mdl.ckpt", "CKPT.yaml"):
                        reads.append(os.path.join(base, v, f))
                for n in (1, 2, 3):
                    reads.append(os.path.join(base, "avg", f"last{n}", "mdl.ckpt"))
                reads.append(os.path.join(base, "index.json"))
            reads.append(os.path.join(mnt, ".ckptfs-status"))
            reads.append(os.path.join(m, "CKPT+3", "mdl.ckpt"))
            xattrs = [(os.path.join(m, v), n) for v in ("best/min/loss", "latest", "best/min/loss/mdl.ckpt",
                                                         "avg/last1/mdl.ckpt", "avg/last2/mdl.ckpt")
                      for n in ("user.ckptfs.checkpoint", "user.ckptfs.real_path",
                                "user.ckptfs.members")]
            xattrs += [(os.path.join(mnt, "best", "min", "loss"), "user.ckptfs.checkpoint")]
            got = self.probe(read=reads, listing=[os.path.join(mnt, "private"), m,
                                                  os.path.join(m, "top", "3", "min", "loss")],
                             xattrs=xattrs)
            self.assert_no_secret(got)
            # What it can see: the selections among the readable checkpoints.
            sel = got["xattr:" + os.path.join(m, "best/min/loss") + ":user.ckptfs.checkpoint"]
            self.assertEqual(sel["value"], os.path.join(self.src, "mixed", "CKPT+3"))
            self.assertEqual(got["read:" + os.path.join(m, "best/min/loss/mdl.ckpt")]["errno"],
                             errno.EACCES)  # 0600 file of a readable directory
            self.assertEqual(got["read:" + os.path.join(m, "avg/last1/mdl.ckpt")]["errno"],
                             errno.EACCES)  # CKPT+3's mdl.ckpt is 0600
            self.assertNotIn("data", got["read:" + os.path.join(m, "avg/last3/mdl.ckpt")])
            self.assertIn("data", got["read:" + os.path.join(m, "best/max/loss/mdl.ckpt")])
            self.assertEqual(got["list:" + os.path.join(mnt, "private")]["errno"], errno.EACCES)
            self.assertEqual(got["list:" + os.path.join(m, "top/3/min/loss")]["names"], ["1", "2"])
            index = json.loads(base64.b64decode(got["read:" + os.path.join(m, "index.json")]["data"]))
            self.assertEqual(sorted(c["name"] for c in index), ["CKPT+1", "CKPT+3"])
            root_index = json.loads(base64.b64decode(got["read:" + os.path.join(mnt, "index.json")]["data"]))
            self.assertNotIn("CKPT+9", [c["name"] for c in root_index])
            status = base64.b64decode(got["read:" + os.path.join(mnt, ".ckptfs-status")]["data"]).decode()
            self.assertNotIn("private", status)
            self.assertIn("averages", json.loads(status)["totals"])
            for v in views:
                self.assertNotIn("data", got["read:" + os.path.join(mnt, "private/exp", v, "mdl.ckpt")])

            # pub stays fully usable, and root's reads still work afterwards.
            p = os.path.join(mnt, "pub")
            got = self.probe(read=[os.path.join(p, "best/min/loss/mdl.ckpt"),
                                   os.path.join(p, "avg/last2/mdl.ckpt"),
                                   os.path.join(p, "index.json")])
            with open(os.path.join(self.src, "pub", "CKPT+b", "mdl.ckpt"), "rb") as f:
                self.assertEqual(base64.b64decode(got["read:" + os.path.join(p, "best/min/loss/mdl.ckpt")]["data"]),
                                 f.read())
            self.assertIn("data", got["read:" + os.path.join(p, "avg/last2/mdl.ckpt")])
            self.assertEqual(len(json.loads(base64.b64decode(got["read:" + os.path.join(p, "index.json")]["data"]))), 2)
            self.assertEqual(checkpoint_of(os.path.join(m, "best", "min", "loss")),
                             os.path.join(self.src, "mixed", "CKPT+2"))

    def test_chmod_after_a_lookup_is_seen(self):
        with self.mount() as (mnt, _, _):
            path = os.path.join(mnt, "pub", "best", "min", "loss", "mdl.ckpt")
            self.assertIn("data", self.probe(read=[path])["read:" + path])
            os.chmod(os.path.join(self.src, "pub", "CKPT+b", "mdl.ckpt"), 0o600)
            self.assertEqual(self.probe(read=[path])["read:" + path]["errno"], errno.EACCES)

    def test_swapping_a_directory_for_a_link_never_leaks(self):
        race = os.path.join(self.src, "race")
        os.makedirs(os.path.join(race, "d"))
        with open(os.path.join(race, "d", "NAME"), "w") as f:
            f.write("public")
        secret = os.path.join(self.src, "secret")
        os.makedirs(secret)
        with open(os.path.join(secret, "NAME"), "w") as f:
            f.write(f"SECRET {SECRET}")
        os.chmod(secret, 0o700)
        # An attacker-owned experiment whose checkpoint is swapped behind avg/last1/.
        exp = os.path.join(self.src, "mine")
        write_ckpt(os.path.join(exp, "CKPT+1"), 1000, 0.5, seed=5)
        secret_ckpt = os.path.join(self.src, "vault", "CKPT+1")
        write_ckpt(secret_ckpt, 1000, 0.5, value=SECRET)
        os.chmod(os.path.join(self.src, "vault"), 0o700)
        for top in (race, exp):
            for dirpath, dirnames, filenames in os.walk(top):
                for n in dirnames + filenames + [""]:
                    os.chown(os.path.join(dirpath, n), NOBODY, NOBODY)
        with self.mount() as (mnt, _, _):
            data = self.attacker({"kind": "race_passthrough", "race": race,
                                  "mnt_race": os.path.join(mnt, "race"),
                                  "secret_dir": secret, "iterations": 200})
            texts = [base64.b64decode(d) for d in data]
            self.assertIn(b"public", texts)  # the race ran against real reads
            self.assertFalse(any(b"SECRET" in t for t in texts), texts)
            data = self.attacker({"kind": "race_average", "exp": exp,
                                  "avg": os.path.join(mnt, "mine", "avg", "last1", "mdl.ckpt"),
                                  "secret_ckpt": secret_ckpt, "iterations": 200})
            self.assertTrue(data, "the average was never readable")
            for d in data:
                self.assertFalse(holds_secret(base64.b64decode(d)))

    def test_walk_reads_nothing_the_user_cannot_read_in_source(self):
        with self.mount() as (mnt, _, _):
            # Root reads averages first, so the cache holds the private ones.
            for scope in ("mixed", "private/exp"):
                with open(os.path.join(mnt, scope, "avg", "last1", "mdl.ckpt"), "rb") as f:
                    f.read()
            report = self.attacker({"kind": "walk", "mnt": mnt, "src": self.src})
            self.assertEqual(report["bad"], [])
            self.assertGreater(report["read"], 10)


if __name__ == "__main__":
    unittest.main()
