"""End-to-end: on a root daemon mounted with allow_other, the experiment's
owner (an ordinary user, uid 65534) writes checkpoints through new/ as on
the experiment's own filesystem: what they create is theirs, commits land
in their experiment, and someone who may not write the experiment may not
write its new/ either (docs/DESIGN.md, "Security")."""
import json
import os
import shutil
import subprocess
import tempfile
import unittest

import torch

import experiments
from mount_util import mounted, wait_for

OWNER = 65534
STRANGER = 65533

# Runs as another user: saves one checkpoint through new/ the way
# SpeechBrain's Checkpointer does (makedirs, then each file), then asks for
# the commit; or only tries to make a directory. Prints a JSON answer.
WRITER = r'''
import errno, json, os, sys
import torch
job = json.loads(sys.argv[1])
new = job["new"]
try:
    d = os.path.join(new, job["name"])
    if job.get("list"):
        print(json.dumps({"names": sorted(os.listdir(new))}))
        sys.exit(0)
    if job.get("rmtree"):
        import shutil
        shutil.rmtree(d)
        print(json.dumps({"ok": True}))
        sys.exit(0)
    os.makedirs(d, exist_ok=True)
    if job.get("only_mkdir"):
        print(json.dumps({"ok": True}))
        sys.exit(0)
    with open(os.path.join(d, "CKPT.yaml"), "w") as f:
        f.write("unixtime: %d\nloss: %s\n" % (job["unixtime"], job["loss"]))
    torch.save({"w": torch.full((4,), float(job["loss"]))}, os.path.join(d, "mdl.ckpt"))
    open(os.path.join(d, ".commit"), "w").close()
    print(json.dumps({"ok": True}))
except OSError as e:
    print(json.dumps({"errno": e.errno}))
'''


class OwnerWritesThroughNewTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="ckptfs-e2e-secnew-")
        os.chmod(self.tmp, 0o755)
        self.src = os.path.join(self.tmp, "src")
        self.exp = os.path.join(self.src, "exp")
        experiments.speechbrain(self.exp, [("1", {"unixtime": 100, "loss": 0.5})])
        for root, dirs, files in os.walk(self.exp):
            for n in [root] + [os.path.join(root, x) for x in dirs + files]:
                os.chown(n, OWNER, OWNER)
        os.chmod(self.src, 0o755)
        os.chmod(self.exp, 0o755)
        self.script = os.path.join(self.tmp, "writer.py")
        with open(self.script, "w") as f:
            f.write(WRITER)
        os.chmod(self.script, 0o644)

    def tearDown(self):
        shutil.rmtree(self.tmp)

    def run_as(self, uid, job):
        p = subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                            "/usr/bin/python3", self.script, json.dumps(job)],
                           capture_output=True, text=True, timeout=120, cwd="/")
        self.assertEqual(p.returncode, 0, p.stderr)
        return json.loads(p.stdout.strip().splitlines()[-1])

    def test_owner_commits_checkpoints_that_stay_theirs(self):
        with mounted(self.src, "-o", "allow_other", "--explicit-commit", "--keep-last", "2") as (mnt, _, log):
            new = os.path.join(mnt, "exp", "new")
            st = os.stat(new)
            self.assertEqual((st.st_uid, st.st_mode & 0o7777), (OWNER, 0o755))
            for i, loss in [(2, 0.25), (3, 0.125)]:
                name = f"CKPT+{i}"
                answer = self.run_as(OWNER, {"new": new, "name": name, "unixtime": 100 * i, "loss": loss})
                self.assertEqual(answer, {"ok": True})
                self.assertTrue(wait_for(lambda: os.path.exists(os.path.join(self.exp, name)), timeout=30),
                                open(log).read())
                for f in ("", "CKPT.yaml", "mdl.ckpt"):
                    path = os.path.join(self.exp, name, f)
                    self.assertEqual(os.stat(path).st_uid, OWNER, path)
                    self.assertEqual(os.stat(path).st_gid, OWNER, path)
            # Retention counts the owner's checkpoints (they own the experiment).
            self.assertTrue(wait_for(lambda: not os.path.exists(os.path.join(self.exp, "CKPT+1")), timeout=30),
                            open(log).read())
            self.assertTrue(wait_for(lambda: (os.path.realpath(os.getxattr(
                os.path.join(mnt, "exp", "latest"), "user.ckptfs.checkpoint").decode())
                == os.path.join(self.exp, "CKPT+3")), timeout=30))
            self.assertEqual(torch.load(os.path.join(mnt, "exp", "latest", "mdl.ckpt"))["w"].tolist(), [0.125] * 4)

    def test_owner_resaves_and_deletes_through_new_a_stranger_cannot(self):
        with mounted(self.src, "-o", "allow_other", "--explicit-commit") as (mnt, _, log):
            new = os.path.join(mnt, "exp", "new")
            ckpt = os.path.join(self.exp, "CKPT+2")
            job = {"new": new, "name": "CKPT+2", "unixtime": 200, "loss": 0.25}
            self.assertEqual(self.run_as(OWNER, job), {"ok": True})
            self.assertTrue(wait_for(lambda: os.path.exists(ckpt), timeout=30), open(log).read())
            # new/ lists the experiment for its owner (staging exists now).
            self.assertEqual(self.run_as(OWNER, dict(job, list=True)), {"names": ["CKPT+1", "CKPT+2"]})
            # A stranger can neither delete it nor write into it through new/.
            self.assertEqual(self.run_as(STRANGER, dict(job, rmtree=True)), {"errno": 13})
            self.assertEqual(self.run_as(STRANGER, dict(job, loss=9.0)), {"errno": 13})
            self.assertEqual(sorted(os.listdir(ckpt)), ["CKPT.yaml", "mdl.ckpt"])
            self.assertIn("loss: 0.25", open(os.path.join(ckpt, "CKPT.yaml")).read())
            # The owner saves it again: a new version replaces it whole, still theirs.
            self.assertEqual(self.run_as(OWNER, dict(job, loss=0.125)), {"ok": True})
            self.assertTrue(wait_for(lambda: "loss: 0.125" in open(os.path.join(ckpt, "CKPT.yaml")).read(),
                                     timeout=30), open(log).read())
            self.assertEqual(torch.load(os.path.join(ckpt, "mdl.ckpt"))["w"].tolist(), [0.125] * 4)
            for f in ("", "CKPT.yaml", "mdl.ckpt"):
                self.assertEqual(os.stat(os.path.join(ckpt, f)).st_uid, OWNER, f)
            # ...and deletes it: gone at once, logged as a deletion through new/.
            self.assertEqual(self.run_as(OWNER, dict(job, rmtree=True)), {"ok": True})
            self.assertFalse(os.path.exists(ckpt))
            self.assertIn(f"deleted {ckpt} through new/ (uid {OWNER})", open(log).read())
            self.assertNotIn("CKPT+2", os.listdir(new))

    def test_a_user_who_may_not_write_the_experiment_may_not_write_new(self):
        with mounted(self.src, "-o", "allow_other", "--explicit-commit") as (mnt, _, log):
            new = os.path.join(mnt, "exp", "new")
            answer = self.run_as(STRANGER, {"new": new, "name": "CKPT+9", "only_mkdir": True})
            self.assertEqual(answer, {"errno": 13})  # EACCES, as mkdir in the experiment itself
            self.assertFalse(os.path.exists(os.path.join(self.exp, "CKPT+9")))
            self.assertEqual(sorted(n for n in os.listdir(self.exp) if n.startswith("CKPT+")), ["CKPT+1"])


if __name__ == "__main__":
    unittest.main()
