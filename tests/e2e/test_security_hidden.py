"""End-to-end tests of the reported attacks on ckptfs's hidden directories and
on retention (DESIGN.md §6), run for real: the daemon runs as root (as these
tests do), the attacker's steps run as nobody through setpriv, in a shared
experiment directory (mode 1777, root's)."""
import errno
import os
import shutil
import subprocess
import tempfile
import unittest

import experiments
from mount_util import CKPTFS, checkpoint_of, mounted, wait_for

NOBODY = 65534


def as_nobody(*cmd):
    subprocess.run(["setpriv", "--reuid=%d" % NOBODY, "--regid=%d" % NOBODY, "--clear-groups", *cmd],
                   check=True, capture_output=True)


def read(path):
    with open(path) as f:
        return f.read()


def tree(root):
    """Every path below root with its content (files) or None (directories)."""
    out = {}
    for d, dirs, files in os.walk(root):
        for n in dirs:
            out[os.path.relpath(os.path.join(d, n), root)] = None
        for n in files:
            out[os.path.relpath(os.path.join(d, n), root)] = read(os.path.join(d, n))
    return out


@unittest.skipUnless(os.geteuid() == 0 and shutil.which("setpriv"), "needs root and setpriv")
class SecurityHiddenTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="ckptfs-e2e-sec-")
        os.chmod(self.tmp, 0o755)  # nobody must reach the shared experiment
        self.src = os.path.join(self.tmp, "src")
        self.exp = os.path.join(self.src, "exp")
        experiments.speechbrain(self.exp, [(str(i), {"unixtime": 100 * i, "loss": 1.0 / i, "epoch": i})
                                           for i in (1, 2, 3)])
        os.chmod(self.src, 0o755)
        os.chmod(self.exp, 0o1777)
        # Root's files that an attacker would like deleted or moved.
        self.victim = os.path.join(self.tmp, "victim")
        os.makedirs(os.path.join(self.victim, "sub"))
        with open(os.path.join(self.victim, "precious.txt"), "w") as f:
            f.write("root's data")
        with open(os.path.join(self.victim, "sub", "also.txt"), "w") as f:
            f.write("more of root's data")
        self.victim_before = tree(self.victim)

    def tearDown(self):
        shutil.rmtree(self.tmp, ignore_errors=True)

    def ckpts(self):
        return sorted(n for n in os.listdir(self.exp) if n.startswith("CKPT+"))

    def prune_cli(self, *policy):
        return subprocess.run([CKPTFS, "prune", *policy, "--index", os.path.join(self.tmp, "cli.sqlite"),
                               self.src], capture_output=True, text=True, timeout=60)

    def test_symlinked_trash_is_refused_by_mount_and_prune(self):
        trash = os.path.join(self.exp, ".ckptfs-trash")
        as_nobody("ln", "-s", self.victim, trash)
        with mounted(self.src, "--keep-last", "1", "--commit-quiet", "0.5") as (mnt, _, log):
            self.assertTrue(wait_for(lambda: "retention skipped for " + self.exp in read(log), timeout=10),
                            read(log))
            self.assertIn(trash + ": is a symbolic link", read(log))
            # Still serving everything else.
            self.assertEqual(checkpoint_of(os.path.join(mnt, "exp", "latest")),
                             os.path.join(self.exp, "CKPT+3"))
        self.assertEqual(self.ckpts(), ["CKPT+1", "CKPT+2", "CKPT+3"])
        self.assertEqual(tree(self.victim), self.victim_before)
        self.assertTrue(os.path.islink(trash))

        p = self.prune_cli("--keep-last", "1")
        self.assertNotEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertIn(trash, p.stderr)
        self.assertIn("symbolic link", p.stderr)
        self.assertEqual(self.ckpts(), ["CKPT+1", "CKPT+2", "CKPT+3"])
        self.assertEqual(tree(self.victim), self.victim_before)

    def test_user_owned_trash_directory_is_refused(self):
        trash = os.path.join(self.exp, ".ckptfs-trash")
        as_nobody("mkdir", "-m", "0700", trash)
        as_nobody("sh", "-c", "echo mine > " + os.path.join(trash, "theirs.txt"))
        with mounted(self.src, "--keep-last", "1") as (mnt, _, log):
            self.assertTrue(wait_for(lambda: "retention skipped for " + self.exp in read(log), timeout=10),
                            read(log))
            self.assertIn("owned by uid %d" % NOBODY, read(log))
            self.assertEqual(checkpoint_of(os.path.join(mnt, "exp", "latest")),
                             os.path.join(self.exp, "CKPT+3"))
        p = self.prune_cli("--keep-last", "1")
        self.assertNotEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertIn(trash, p.stderr)
        self.assertEqual(self.ckpts(), ["CKPT+1", "CKPT+2", "CKPT+3"])
        self.assertEqual(read(os.path.join(trash, "theirs.txt")), "mine\n")

    def test_symlinked_staging_and_user_abandoned_are_refused(self):
        staging = os.path.join(self.exp, ".ckptfs-staging")
        abandoned = os.path.join(self.exp, ".ckptfs-abandoned")
        as_nobody("ln", "-s", self.victim, staging)
        as_nobody("mkdir", "-m", "0777", abandoned)
        with mounted(self.src, "--commit-quiet", "0.2") as (mnt, _, log):
            self.assertIn(staging + ": is a symbolic link", read(log))  # recovery at start
            new = os.path.join(mnt, "exp", "new")
            # Refused (new/ shows as a link the mount cannot read: EINVAL).
            with self.assertRaises(OSError) as made:
                os.mkdir(os.path.join(new, "CKPT+5"))
            self.assertIn(made.exception.errno, (errno.EACCES, errno.EPERM, errno.EROFS, errno.EINVAL))
            with self.assertRaises(OSError) as created:
                open(os.path.join(new, "epoch=5-step=50.ckpt"), "wb").close()
            self.assertIn(created.exception.errno, (errno.EACCES, errno.EPERM, errno.EROFS, errno.EINVAL))
            # Still serving everything else.
            self.assertEqual(checkpoint_of(os.path.join(mnt, "exp", "latest")),
                             os.path.join(self.exp, "CKPT+3"))
        self.assertEqual(tree(self.victim), self.victim_before)
        self.assertEqual(os.listdir(abandoned), [])  # nothing of root's moved into the user's dir
        self.assertTrue(os.path.islink(staging))
        self.assertEqual(self.ckpts(), ["CKPT+1", "CKPT+2", "CKPT+3"])

    def test_user_owned_staging_directory_is_refused(self):
        staging = os.path.join(self.exp, ".ckptfs-staging")
        as_nobody("mkdir", "-m", "0755", staging)
        with mounted(self.src, "--commit-quiet", "0.2") as (mnt, _, log):
            new = os.path.join(mnt, "exp", "new")
            with self.assertRaises(OSError) as made:
                os.mkdir(os.path.join(new, "CKPT+5"))
            self.assertIn(made.exception.errno, (errno.EACCES, errno.EPERM, errno.EROFS))
            self.assertIn("new/ disabled for " + self.exp, read(log))
            self.assertIn(staging + ": is owned by uid %d" % NOBODY, read(log))
            self.assertEqual(checkpoint_of(os.path.join(mnt, "exp", "latest")),
                             os.path.join(self.exp, "CKPT+3"))
        self.assertEqual(os.listdir(staging), [])
        self.assertEqual(self.ckpts(), ["CKPT+1", "CKPT+2", "CKPT+3"])

    def test_other_users_fake_newest_checkpoints_do_not_steer_retention(self):
        for name in ("CKPT+8", "CKPT+9"):
            d = os.path.join(self.exp, name)
            as_nobody("sh", "-c", "mkdir %s && printf 'unixtime: 9999999999\\n' > %s/CKPT.yaml && "
                      "printf fake > %s/mdl.ckpt" % (d, d, d))
        with mounted(self.src, "--keep-last", "2") as (_, _, log):
            # The policy's own decision about root's checkpoints: the oldest goes.
            self.assertTrue(wait_for(lambda: not os.path.exists(os.path.join(self.exp, "CKPT+1")),
                                     timeout=10), read(log))
            self.assertIn("ignored by retention", read(log))
        # After the daemon stopped: every run it made is over.
        self.assertEqual(self.ckpts(), ["CKPT+2", "CKPT+3", "CKPT+8", "CKPT+9"])
        self.assertEqual(read(os.path.join(self.exp, "CKPT+9", "mdl.ckpt")), "fake")

    def test_owners_future_unixtime_is_logged_and_ranked_by_mtime(self):
        future = os.path.join(self.exp, "CKPT+2")
        with open(os.path.join(future, "CKPT.yaml"), "w") as f:
            f.write("unixtime: 9999999999\nloss: 0.5\n")
        for n in os.listdir(future):
            os.utime(os.path.join(future, n), (50, 50))  # older than CKPT+1's unixtime 100
        shutil.rmtree(os.path.join(self.exp, "CKPT+3"))
        with mounted(self.src, "--keep-last", "2", "--commit-quiet", "0.5") as (mnt, _, log):
            self.assertIn(future + ": unixtime 9999999999 is", read(log))
            self.assertEqual(checkpoint_of(os.path.join(mnt, "exp", "latest")),
                             os.path.join(self.exp, "CKPT+1"))
            experiments.speechbrain(os.path.join(mnt, "exp", "new"), [("3", {"unixtime": 300, "loss": 0.3})])
            # Ranked by its mtime (50), the "future" one is the oldest of three.
            self.assertTrue(wait_for(lambda: not os.path.exists(future), timeout=15), read(log))
            self.assertEqual(checkpoint_of(os.path.join(mnt, "exp", "latest")),
                             os.path.join(self.exp, "CKPT+3"))
        self.assertEqual(self.ckpts(), ["CKPT+1", "CKPT+3"])


if __name__ == "__main__":
    unittest.main()
