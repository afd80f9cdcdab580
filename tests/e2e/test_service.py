"""End-to-end tests of running ckptfs as a service: mount(8) and fstab through
Debian's mount.fuse3, the configuration file, `ckptfs status`, systemd's
readiness protocol, restart after a killed daemon, journald priorities, and
the installed systemd unit (checked by `systemd-analyze verify`)."""
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import unittest

import torch

import experiments
from mount_util import CKPTFS, checkpoint_of, mounted, unmount, wait_for


def names(d):
    return sorted(n for n in os.listdir(d) if n.startswith("CKPT+"))


class ServiceTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="ckptfs-e2e-service-")
        self.src = os.path.join(self.tmp, "src")
        self.exp = os.path.join(self.src, "exp")
        experiments.speechbrain(self.exp, [(str(i), {"unixtime": 100 + i, "loss": loss, "epoch": i})
                                           for i, loss in [(1, 0.5), (2, 0.3), (3, 0.4), (4, 0.6)]])
        self.mnt = os.path.join(self.tmp, "mnt")
        os.mkdir(self.mnt)
        self.index = os.path.join(self.tmp, "index.sqlite")

    def tearDown(self):
        if os.path.ismount(self.mnt):
            unmount(self.mnt)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def check_mounted_with_policy(self):
        """keep_last=2 + keep_best=min:loss:1 applied at mount; views answer."""
        self.assertTrue(wait_for(lambda: os.path.ismount(self.mnt), timeout=10))
        self.assertEqual(checkpoint_of(os.path.join(self.mnt, "exp/best/min/loss")), os.path.join(self.exp, "CKPT+2"))
        torch.load(os.path.join(self.mnt, "exp/latest/mdl.ckpt"))
        self.assertEqual(names(self.exp), ["CKPT+2", "CKPT+3", "CKPT+4"])

    def umount(self):
        p = subprocess.run(["umount", self.mnt], capture_output=True, text=True)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertTrue(wait_for(lambda: not os.path.ismount(self.mnt), timeout=10))

    def test_mount_t_fuse_runs_ckptfs_with_o_options(self):
        # mount.fuse3 runs `PROGRAM SOURCE MOUNTPOINT -o OPTS`; the PROGRAM#SOURCE
        # form names our build instead of the `ckptfs` on PATH that
        # `-t fuse.ckptfs` would run (mount(8) resets PATH).
        opts = f"keep_last=2,keep_best=min:loss:1,index={self.index},allow_other,nofail"
        p = subprocess.run(["mount", "-t", "fuse", f"{CKPTFS}#{self.src}", self.mnt, "-o", opts],
                           capture_output=True, text=True, timeout=60)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.check_mounted_with_policy()
        with open("/proc/mounts") as f:
            line = next(l for l in f if f" {self.mnt} " in l)
        self.assertIn("fuse.ckptfs", line)
        self.assertIn("allow_other", line)
        self.umount()

    def test_fstab_line(self):
        fstab = os.path.join(self.tmp, "fstab")
        with open(fstab, "w") as f:
            f.write(f"# ckptfs\n{CKPTFS}#{self.src} {self.mnt} fuse "
                    f"noauto,keep_last=2,keep_best=min:loss:1,index={self.index} 0 0\n")
        p = subprocess.run(["mount", "--fstab", fstab, self.mnt], capture_output=True, text=True, timeout=60)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.check_mounted_with_policy()
        self.umount()

    def test_mount_helper_name(self):
        # mount(8) runs /sbin/mount.fuse.ckptfs SOURCE MOUNTPOINT -o OPTS [-t TYPE]
        # when it is installed (the install puts that link in sbin/).
        helper = os.path.join(self.tmp, "mount.fuse.ckptfs")
        os.symlink(CKPTFS, helper)
        p = subprocess.run([helper, self.src, self.mnt, "-o",
                            f"rw,keep_last=2,keep_best=min:loss:1,index={self.index}", "-t", "fuse.ckptfs"],
                           capture_output=True, text=True, timeout=60)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.check_mounted_with_policy()
        self.umount()
        p = subprocess.run([helper, self.src, self.mnt, "-o", "keep_last=x"], capture_output=True, text=True)
        self.assertEqual(p.returncode, 2)
        self.assertIn("--keep-last", p.stderr)
        self.assertFalse(os.path.ismount(self.mnt))

    def write_config(self, mount):
        path = os.path.join(self.tmp, "ckptfs.json")
        with open(path, "w") as f:
            json.dump({"mounts": {"exp": mount}}, f)
        return path

    def test_configuration_file_and_overrides(self):
        config = self.write_config({
            "source": self.src, "mountpoint": self.mnt, "index": self.index, "commit_quiet": 0.2,
            "policy": {"keep_last": 2, "keep_best": ["min:loss:1"]}})
        # prune reads the same mount's policy; the command line's replaces it.
        p = subprocess.run([CKPTFS, "prune", "--dry-run", "--config", config, "--name", "exp"],
                           capture_output=True, text=True)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertRegex(p.stdout, r"exp/CKPT\+1 +delete")
        self.assertRegex(p.stdout, r"exp/CKPT\+2 +keep +keep_best=min:loss:1")
        p = subprocess.run([CKPTFS, "prune", "--dry-run", "--config", config, "--name", "exp", "--keep-last", "1"],
                           capture_output=True, text=True)
        self.assertRegex(p.stdout, r"exp/CKPT\+2 +delete")
        self.assertIn("policy: keep_last=1;", p.stdout)
        # Errors name the file and what is wrong.
        for mount, message in [({"source": self.src, "keep_lats": 3}, "unknown key 'keep_lats'"),
                               ({"source": self.src, "policy": {"keep_last": "x"}}, "policy"),
                               ({"source": 3}, "'source' must be a string")]:
            bad = self.write_config(mount)
            p = subprocess.run([CKPTFS, "prune", "--config", bad, "--name", "exp", "--keep-last", "1"],
                               capture_output=True, text=True)
            self.assertEqual(p.returncode, 2, mount)
            self.assertIn(bad, p.stderr)
            self.assertIn(message, p.stderr)
        p = subprocess.run([CKPTFS, "ls", "--config", config, "--name", "nope"], capture_output=True, text=True)
        self.assertEqual(p.returncode, 2)
        self.assertIn("no mount named 'nope' (configured: exp)", p.stderr)
        # The mount itself, with SOURCE and MOUNTPOINT from the file.
        config = self.write_config({
            "source": self.src, "mountpoint": self.mnt, "index": self.index,
            "policy": {"keep_last": 2, "keep_best": ["min:loss:1"]}})
        p = subprocess.run([CKPTFS, "mount", "--config", config, "--name", "exp"], capture_output=True, text=True,
                           timeout=60)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.check_mounted_with_policy()
        # status by name: the mountpoint comes from the configuration.
        p = subprocess.run([CKPTFS, "status", "--config", config, "--name", "exp"], capture_output=True, text=True)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertIn("mount exp: ", p.stdout)
        self.assertIn("policy: keep_last=2 keep_best=min:loss:1", p.stdout)
        self.umount()

    def test_status_reports_commits_deletions_averages_errors(self):
        with mounted(self.src, "--commit-quiet", "1", "--keep-last", "3") as (mnt, _, _):
            s = json.loads(subprocess.run([CKPTFS, "status", "--json", mnt], capture_output=True,
                                          text=True, check=True).stdout)
            self.assertEqual(s["source"], self.src)
            self.assertEqual(s["index"]["checkpoints"], 3)
            self.assertEqual(s["totals"]["deletions"], 1)
            self.assertIn("CKPT+1", s["last_deletions"][0]["what"])
            # A commit through new/ (which prunes one more), an average, an error.
            experiments.speechbrain(os.path.join(mnt, "exp/new"), [("5", {"unixtime": 105, "loss": 0.1})])
            self.assertTrue(wait_for(lambda: os.path.exists(os.path.join(self.exp, "CKPT+5")), timeout=10))
            torch.load(os.path.join(mnt, "exp/avg/last2/mdl.ckpt"))
            with open(os.path.join(self.exp, "CKPT+4", "mdl.ckpt"), "r+b") as f:
                f.truncate(100)  # corrupt: averaging it fails with EIO and an error line
            with self.assertRaises(OSError):
                open(os.path.join(mnt, "exp/avg/last3/mdl.ckpt"), "rb").close()
            s = json.loads(open(os.path.join(mnt, ".ckptfs-status")).read())
            self.assertEqual(s["totals"]["commits"], 1)
            self.assertIn("exp/CKPT+5", s["last_commits"][0]["what"])
            self.assertEqual(s["totals"]["deletions"], 2)
            self.assertEqual(s["totals"]["averages"], 1)
            self.assertIn("avg/last2/mdl.ckpt", s["last_averages"][0]["what"])
            self.assertGreaterEqual(s["totals"]["errors"], 1)
            self.assertIn("CKPT+4/mdl.ckpt", s["last_errors"][0]["what"])
            text = subprocess.run([CKPTFS, "status", mnt], capture_output=True, text=True, check=True).stdout
            self.assertIn("totals: 1 commit(s), 2 deletion(s), 1 average(s) served", text)
            self.assertIn("last errors:", text)
        p = subprocess.run([CKPTFS, "status", self.tmp], capture_output=True, text=True)
        self.assertEqual(p.returncode, 1)
        self.assertIn("not a ckptfs mount", p.stderr)

    def test_sd_notify_readiness_and_clean_stop(self):
        sock_path = os.path.join(self.tmp, "notify.sock")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(sock_path)
        sock.settimeout(30)
        env = dict(os.environ, NOTIFY_SOCKET=sock_path)
        log = open(os.path.join(self.tmp, "log"), "w+")
        proc = subprocess.Popen([CKPTFS, "mount", "-f", "--index", self.index, self.src, self.mnt], env=env,
                                stderr=log)
        try:
            msg = sock.recv(4096).decode()
            self.assertIn("READY=1", msg)
            self.assertIn(f"MAINPID={proc.pid}", msg)
            # Ready means ready: the mount answers at once.
            self.assertTrue(os.path.ismount(self.mnt))
            self.assertIn("latest", os.listdir(os.path.join(self.mnt, "exp")))
            proc.send_signal(signal.SIGTERM)  # what systemctl stop sends
            self.assertIn("STOPPING=1", sock.recv(4096).decode())
            rc = proc.wait(timeout=30)
            log.seek(0)
            self.assertEqual(rc, 0, log.read())
            self.assertFalse(os.path.ismount(self.mnt))
        finally:
            if proc.poll() is None:
                proc.kill()
            sock.close()
            log.close()

    def test_restart_after_kill_detaches_the_dead_mount(self):
        log = os.path.join(self.tmp, "log")
        for attempt in range(2):
            with open(log, "w") as f:
                proc = subprocess.Popen([CKPTFS, "mount", "-f", "--index", self.index, self.src, self.mnt],
                                        stderr=f)
            # Not ismount(): the dead mount from before still looks mounted.
            self.assertTrue(wait_for(lambda: " mounted " in open(log).read(), timeout=30), open(log).read())
            self.assertEqual(checkpoint_of(os.path.join(self.mnt, "exp/best/min/loss")), os.path.join(self.exp, "CKPT+2"))
            proc.kill()
            proc.wait()
            with self.assertRaises(OSError) as e:
                os.listdir(self.mnt)
            self.assertEqual(e.exception.errno, 107)  # ENOTCONN: the dead mount stays
        with open(log) as f:
            self.assertIn("daemon died is still there; detaching it", f.read())
        unmount(self.mnt)

    def test_journal_priorities(self):
        # Under systemd, stderr is the journal and JOURNAL_STREAM names it.
        log = os.path.join(self.tmp, "journal")
        with open(log, "w") as f:
            st = os.fstat(f.fileno())
            env = dict(os.environ, JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}")
            subprocess.run([CKPTFS, "prune", "--keep-last", "1", "--index", self.index, self.src], stderr=f,
                           stdout=subprocess.DEVNULL, env=env, check=True)
        with open(log) as f:
            lines = f.read().splitlines()
        self.assertTrue(lines)
        self.assertTrue(all(l.startswith("<6>info: ") for l in lines), lines)

    def test_installed_unit_verifies(self):
        build = os.environ.get("CKPTFS_BUILD_DIR")
        if not build:
            self.skipTest("CKPTFS_BUILD_DIR not set (run through ctest)")
        prefix = os.path.join(self.tmp, "prefix")
        p = subprocess.run(["cmake", "--install", build, "--prefix", prefix], capture_output=True, text=True)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertTrue(os.access(os.path.join(prefix, "bin/ckptfs"), os.X_OK))
        self.assertEqual(os.readlink(os.path.join(prefix, "sbin/mount.fuse.ckptfs")), "../bin/ckptfs")
        example = os.path.join(prefix, "share/doc/ckptfs/ckptfs.json.example")
        unit = os.path.join(prefix, "lib/systemd/system/ckptfs@.service")
        with open(unit) as f:
            text = f.read()
        self.assertIn(f"ExecStart={prefix}/bin/ckptfs mount -f --config /etc/ckptfs/ckptfs.json --name %i", text)
        for directive in ["ProtectSystem=", "PrivateTmp=", "PrivateDevices=", "DeviceAllow=", "MountFlags="]:
            self.assertNotIn("\n" + directive, text)  # each would hide the mount or /dev/fuse
        # systemd-analyze verifies an instance; it reports bad lines on stderr
        # (with exit 0), so any output fails.
        units = os.path.join(self.tmp, "units")
        os.mkdir(units)
        shutil.copy(unit, units)
        os.symlink("ckptfs@.service", os.path.join(units, "ckptfs@asr.service"))
        p = subprocess.run(["systemd-analyze", "verify", "--man=no", os.path.join(units, "ckptfs@asr.service")],
                           capture_output=True, text=True, cwd=units)
        self.assertEqual((p.returncode, p.stderr.strip()), (0, ""))
        # The example configuration parses, and the installed binary reads it.
        p = subprocess.run([os.path.join(prefix, "bin/ckptfs"), "prune", "--dry-run", "--config", example,
                            "--name", "asr", "--index", self.index, self.src], capture_output=True, text=True)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertIn("keep_best=min:loss:2", p.stdout)


if __name__ == "__main__":
    unittest.main()
