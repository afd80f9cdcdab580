"""End-to-end attacks on the safetensors/ view, the user.ckptfs.globals xattr
and `ckptfs inspect` (issue 13): a root daemon mounted with allow_other, an
ordinary user (uid 65534, setpriv) as one attacker, and small real
torch.save files under SOURCE as the other.

- Amplification: a 700-byte file whose tensor is one float expanded with
  stride 0 to 2^28 elements asked the conversion for 1 GiB (2^40 elements:
  4 TiB, the disk); a 1 MiB file whose memoized 1 MiB string is used 300
  times asked the audit (xattr, inspect) for 300 MB of JSON. Both are now
  refused by named budgets, with nothing written and the daemon serving.
- Confidentiality (held): nothing of a 0600 file or a 0700 directory reaches
  uid 65534 through safetensors/, the xattr or inspect.
"""
import errno
import json
import os
import re
import shutil
import subprocess
import tempfile
import unittest

import torch

from mount_util import CKPTFS, errno_of, mounted
from tensor_fixtures import Evil

NOBODY = 65534

# Runs as uid 65534: one job per argv[1:] entry ("read:PATH", "list:PATH",
# "xattr:PATH", "stat:PATH"); prints {entry: "ok" | errno | names}.
ATTACKER = r'''
import json, os, sys
out = {}
for job in sys.argv[1:]:
    kind, path = job.split(":", 1)
    try:
        if kind == "read":
            with open(path, "rb") as f:
                f.read()
            out[job] = "ok"
        elif kind == "list":
            out[job] = sorted(os.listdir(path))
        elif kind == "xattr":
            out[job] = os.getxattr(path, "user.ckptfs.globals").decode()
        elif kind == "stat":
            os.stat(path)
            out[job] = "ok"
    except OSError as e:
        out[job] = e.errno
print(json.dumps(out))
'''


def vm_hwm_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1))


def dir_bytes(path):
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def read(path):
    with open(path, "rb") as f:
        return f.read()


def write_sb(path, payload, mode=0o644, name="mdl.ckpt"):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "CKPT.yaml"), "w") as f:
        f.write("# yamllint disable\nend-of-epoch: true\nloss: 0.5\nunixtime: 1000\n")
    torch.save(payload, os.path.join(path, name))
    os.chmod(os.path.join(path, name), mode)


class AttackSafeTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="ckptfs-attack-")
        os.chmod(cls.tmp, 0o755)
        cls.src = os.path.join(cls.tmp, "src")
        cls.marker = os.path.join(cls.tmp, "pwned")
        write_sb(os.path.join(cls.src, "expand", "CKPT+1"), {"w": torch.ones(1).expand(1 << 28)})
        write_sb(os.path.join(cls.src, "strings", "CKPT+1"),
                 {"w": torch.ones(2), "v": ["x" * (1 << 20)] * 300})
        write_sb(os.path.join(cls.src, "ok", "CKPT+1"), {"w": torch.ones(3)})
        # Root-only: a 0600 file with an unsafe global in a public directory,
        # and a 0700 experiment whose file names are themselves secret.
        write_sb(os.path.join(cls.src, "priv", "CKPT+1"),
                 {"w": torch.ones(2), "x": Evil(cls.marker)}, mode=0o600)
        hidden = os.path.join(cls.src, "hidden")
        write_sb(os.path.join(hidden, "CKPT+1"), {"w": torch.ones(2)}, name="secret_name.ckpt")
        os.chmod(hidden, 0o700)
        cls.script = os.path.join(cls.tmp, "attacker.py")
        with open(cls.script, "w") as f:
            f.write(ATTACKER)
        os.chmod(cls.script, 0o644)
        cls.index = os.path.join(cls.tmp, "index.sqlite")
        cls.cache = cls.index + ".avg"  # the default cache: beside the index
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

    def as_nobody(self, *jobs):
        p = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                            "/usr/bin/python3", self.script, *jobs],
                           capture_output=True, timeout=120)
        self.assertEqual(p.returncode, 0, p.stderr.decode(errors="replace"))
        return json.loads(p.stdout)

    def test_an_expanded_tensor_cannot_fill_the_cache(self):
        # 1 GiB asked for by a file of about 700 bytes: refused before writing.
        path = self.m("expand", "safetensors", "latest", "mdl.safetensors")
        self.assertLess(os.path.getsize(os.path.join(self.src, "expand", "CKPT+1", "mdl.ckpt")), 4096)
        e = errno_of(lambda: read(path))
        self.assertIn(e, (errno.EIO, errno.EOPNOTSUPP, errno.ENOTSUP), path)
        self.assertLess(dir_bytes(self.cache), 1 << 20)
        with open(self.log, errors="replace") as f:
            self.assertIn("kMaxConvertAmplification", f.read())
        # `ckptfs cat` (no mount) refuses it the same way.
        p = subprocess.run([CKPTFS, "cat", "--index", os.path.join(self.tmp, "cli.sqlite"),
                            "--avg-cache", os.path.join(self.tmp, "cli-cache"), self.src,
                            "/expand/safetensors/latest/mdl.safetensors"],
                           capture_output=True, timeout=120)
        self.assertNotEqual(p.returncode, 0)
        self.assertEqual(p.stdout, b"")
        self.assertIn(b"kMaxConvertAmplification", p.stderr)
        self.assertLess(dir_bytes(os.path.join(self.tmp, "cli-cache")), 1 << 20)
        # The daemon serves on.
        self.assertGreater(len(read(self.m("ok", "safetensors", "latest", "mdl.safetensors"))), 0)

    def test_a_string_used_many_times_cannot_blow_up_the_audit(self):
        # 300 uses of one memoized 1 MiB string: 300 MB of JSON values. The
        # xattr and inspect fail (never "safe"); the daemon stays small.
        before = vm_hwm_kib(self.proc.pid)
        for path in (self.m("strings", "latest", "mdl.ckpt"),
                     self.m("strings", "safetensors", "latest", "mdl.safetensors")):
            e = errno_of(lambda: os.getxattr(path, "user.ckptfs.globals"))
            self.assertEqual(e, errno.EIO, path)
        self.assertLess(vm_hwm_kib(self.proc.pid) - before, 200 << 10)
        p = subprocess.run([CKPTFS, "inspect", os.path.join(self.src, "strings", "CKPT+1", "mdl.ckpt")],
                           capture_output=True, timeout=120)
        self.assertEqual(p.returncode, 1, p.stdout[-2000:])
        self.assertIn(b"kMaxValueBytes", p.stderr)
        e = errno_of(lambda: read(self.m("strings", "safetensors", "latest", "mdl.safetensors")))
        self.assertEqual(e, errno.EIO)

    def test_nobody_learns_nothing_of_what_it_cannot_read(self):
        if os.geteuid() != 0:
            self.skipTest("needs root to act as uid 65534")
        # Root converts and audits first: a cached result is no way around.
        read(self.m("priv", "safetensors", "latest", "mdl.safetensors"))
        self.assertTrue(os.getxattr(self.m("priv", "latest", "mdl.ckpt"),
                                    "user.ckptfs.globals").startswith(b"unsafe: "))
        read(self.m("hidden", "safetensors", "latest", "secret_name.safetensors"))
        denied = [
            "read:" + self.m("priv", "safetensors", "latest", "mdl.safetensors"),
            "read:" + self.m("safetensors", "priv", "CKPT+1", "mdl.safetensors"),
            "xattr:" + self.m("priv", "latest", "mdl.ckpt"),
            "xattr:" + self.m("priv", "CKPT+1", "mdl.ckpt"),
            "xattr:" + self.m("priv", "safetensors", "latest", "mdl.safetensors"),
            "list:" + self.m("hidden"),
            "list:" + self.m("hidden", "safetensors"),
            "list:" + self.m("hidden", "safetensors", "latest"),
            "list:" + self.m("safetensors", "hidden"),
            "stat:" + self.m("hidden", "safetensors", "latest", "secret_name.safetensors"),
            "stat:" + self.m("safetensors", "hidden", "CKPT+1", "secret_name.safetensors"),
        ]
        got = self.as_nobody(*denied, "list:" + self.m("safetensors"),
                             "list:" + self.m("priv", "safetensors", "latest"),
                             "xattr:" + self.m("ok", "latest", "mdl.ckpt"))
        for job in denied:
            self.assertEqual(got[job], errno.EACCES, job)
        # What a plain listing shows anyway (names in public directories)
        # and no more: the root lists "hidden" as ls of SOURCE does.
        self.assertIn("hidden", got["list:" + self.m("safetensors")])
        self.assertIn("mdl.safetensors", got["list:" + self.m("priv", "safetensors", "latest")])
        self.assertEqual(got["xattr:" + self.m("ok", "latest", "mdl.ckpt")], "safe")
        self.assertNotIn("secret_name", json.dumps(list(got.values())))
        # inspect run by uid 65534: on the mount and on SOURCE, an error.
        for args in ([self.m("priv", "latest", "mdl.ckpt")],
                     [self.m("priv", "safetensors", "latest", "mdl.safetensors")],
                     ["--index", os.path.join(self.tmp, "nobody.sqlite"), self.src,
                      "/priv/latest/mdl.ckpt"]):
            p = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                                CKPTFS, "inspect", *args], capture_output=True, timeout=120)
            self.assertEqual(p.returncode, 1, (args, p.stdout, p.stderr))
            self.assertNotIn(b"posix.system", p.stdout + p.stderr)
        self.assertFalse(os.path.exists(self.marker))


if __name__ == "__main__":
    unittest.main()
