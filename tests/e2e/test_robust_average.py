"""End-to-end tests of averaging on crafted and changing input, through a
real mount: deflated zip entries (valid for torch.load) average as stored
ones do, a zip bomb and a truncated member fail with an error naming the
file while the daemon keeps serving, and SIGTERM or a forced unmount stops
an average in progress.

Run as a script to regenerate the fuzzing seeds (small real files, and the
crafted ones these tests use):
  /usr/bin/python3 tests/e2e/test_robust_average.py --write-seeds tests/fuzz/corpus
"""
import collections
import errno
import json
import os
import pickle
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import unittest
import zipfile
import zlib

import torch

import tensor_fixtures as tf
from mount_util import CKPTFS, errno_of, mounted, wait_for

MiB = 1 << 20
FIXED_TIME = (1980, 1, 1, 0, 0, 0)


def rewrite_deflated(src, dst, deflate=lambda name: True):
    """The same archive with the chosen entries deflated, as Python's zipfile
    writes them (torch.load reads these: libtorch's reader inflates)."""
    with zipfile.ZipFile(src) as zin:
        entries = [(info.filename, zin.read(info)) for info in zin.infolist()]
    with zipfile.ZipFile(dst, "w") as zout:
        for name, data in entries:
            info = zipfile.ZipInfo(name, FIXED_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED if deflate(name) else zipfile.ZIP_STORED
            zout.writestr(info, data)


def zeros_deflated(mib):
    """A raw deflate stream of `mib` MiB of zero bytes, built from one
    full-flush segment repeated: about 1 KiB per MiB, made in milliseconds."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    segment = c.compress(b"\0" * MiB) + c.flush(zlib.Z_FULL_FLUSH)
    tail = c.flush(zlib.Z_FINISH)
    crc = 0
    block = b"\0" * MiB
    for _ in range(mib):
        crc = zlib.crc32(block, crc)
    return segment * mib + tail, crc


def write_zip(path, entries):
    """A zip file from (name, method, crc, size, payload) with payload
    already compressed: what zipfile cannot write (bombs, lying sizes)."""
    out, central = bytearray(), bytearray()
    for name, method, crc, size, payload in entries:
        n = name.encode()
        offset = len(out)
        out += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, method, 0, 0x21, crc, len(payload), size, len(n), 0)
        out += n + payload
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, method, 0, 0x21, crc,
                               len(payload), size, len(n), 0, 0, 0, 0, 0, offset)
        central += n
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(entries), len(entries), len(central), len(out), 0)
    with open(path, "wb") as f:
        f.write(bytes(out + central + end))


def entries_of(path):
    """A real torch.save file's entries as (name, method, crc, size, payload)."""
    with zipfile.ZipFile(path) as z:
        return [(i.filename, 0, i.CRC, i.file_size, z.read(i)) for i in z.infolist()]


def with_bomb_pickle(src, dst, mib, declared=None):
    """src with its data.pkl replaced by `mib` MiB of zeros, deflated; the
    header declares `declared` bytes (default: the truth)."""
    stream, crc = zeros_deflated(mib)
    entries = []
    for name, method, c, size, payload in entries_of(src):
        if name.endswith("/data.pkl"):
            entries.append((name, 8, crc, mib * MiB if declared is None else declared, stream))
        else:
            entries.append((name, method, c, size, payload))
    write_zip(dst, entries)


class _Storage:
    """Pickles as the persistent id torch.save writes for a storage."""
    def __init__(self, key, numel):
        self.key, self.numel = key, numel


class _Tensor:
    def __init__(self, storage, size, stride):
        self.storage, self.size, self.stride = storage, size, stride

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2,
                (self.storage, 0, self.size, self.stride, False, collections.OrderedDict()))


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ("storage", torch.FloatStorage, obj.key, "cpu", obj.numel)
        return None


def crafted_torch_file(path, numel, size, stride, data=b"\0" * 4):
    """A torch.save-shaped archive whose one tensor has the given storage
    numel, size and stride, over `data`: sizes no real writer produces."""
    import io
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(collections.OrderedDict(w=_Tensor(_Storage("0", numel), size, stride)))
    entries = [("a/data.pkl", buf.getvalue()), ("a/data/0", data), ("a/version", b"3\n")]
    write_zip(path, [(n, 0, zlib.crc32(d), len(d), d) for n, d in entries])


def safetensors_raw(path, header, data):
    raw = json.dumps(header, separators=(",", ":")).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + data)


def write_seeds(root):
    """tests/fuzz/corpus/{zip,safetensors}: real small files and crafted ones."""
    z, s = os.path.join(root, "zip"), os.path.join(root, "safetensors")
    os.makedirs(z, exist_ok=True)
    os.makedirs(s, exist_ok=True)
    torch.save(tf.state_dict(0), os.path.join(z, "state_dict.pt"))
    torch.save(tf.state_dict(1), os.path.join(z, "state_dict_p4.pt"), pickle_protocol=4)
    torch.save(tf.lightning(0), os.path.join(z, "lightning.ckpt"))
    torch.save(tf.tied(0), os.path.join(z, "tied.pt"))
    torch.save({"scalar": torch.tensor(1.5), "empty": torch.zeros(0, 3), "c64": torch.ones(2, dtype=torch.complex64),
                "i8": torch.arange(4, dtype=torch.int8), "f64": torch.ones(2, dtype=torch.float64),
                "list": [torch.ones(1), (2, "x")]}, os.path.join(z, "dtypes.pt"))
    rewrite_deflated(os.path.join(z, "state_dict.pt"), os.path.join(z, "deflated.pt"))
    rewrite_deflated(os.path.join(z, "tied.pt"), os.path.join(z, "deflated_pickle_only.pt"),
                     lambda name: name.endswith("data.pkl"))
    with_bomb_pickle(os.path.join(z, "state_dict.pt"), os.path.join(z, "bomb_small.pt"), 16)
    with_bomb_pickle(os.path.join(z, "state_dict.pt"), os.path.join(z, "bomb_lying.pt"), 16, declared=1024)
    with_bomb_pickle(os.path.join(z, "state_dict.pt"), os.path.join(z, "bomb_declared.pt"), 1, declared=3 << 30)
    crafted_torch_file(os.path.join(z, "overflow_numel.pt"), 1 << 62, (1 << 62,), (1,))
    crafted_torch_file(os.path.join(z, "overflow_stride.pt"), 1, (1 << 40, 1 << 40), (1 << 40, 1 << 40))
    tf.save_safetensors({"a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
                         "b": torch.tensor([1, 2], dtype=torch.int64)},
                        os.path.join(s, "small.safetensors"), {"format": "pt"})
    tf.save_safetensors({"h": torch.ones(3).half(), "bf": torch.ones(2).bfloat16(), "d": torch.ones(1).double(),
                         "mask": torch.tensor([True, False]), "u8": torch.arange(3, dtype=torch.uint8),
                         "empty": torch.zeros(0)},
                        os.path.join(s, "dtypes.safetensors"))
    tf.save_safetensors({}, os.path.join(s, "empty.safetensors"))
    safetensors_raw(os.path.join(s, "overflow_shape.safetensors"),
                    {"a": {"dtype": "F32", "shape": [(1 << 62) + 1], "data_offsets": [0, 4]}}, b"\0" * 4)
    safetensors_raw(os.path.join(s, "overflow_numel.safetensors"),
                    {"a": {"dtype": "F32", "shape": [1 << 32, 1 << 32, 1 << 32], "data_offsets": [0, 4]}}, b"\0" * 4)
    safetensors_raw(os.path.join(s, "scalar.safetensors"),
                    {"s": {"dtype": "F16", "shape": [], "data_offsets": [0, 2]}}, b"\0\x3c")
    safetensors_raw(os.path.join(s, "opaque_u16.safetensors"),
                    {"a": {"dtype": "U16", "shape": [3], "data_offsets": [0, 6]}}, b"\1" * 6)


def vm_hwm_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1))


class RobustAverageTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="ckptfs-e2e-robust-")
        self.src = os.path.join(self.tmp, "src")
        self.cache = os.path.join(self.tmp, "cache")

    def tearDown(self):
        shutil.rmtree(self.tmp, ignore_errors=True)

    def experiment(self, name, objects, file="model.ckpt"):
        """CKPT+i directories, CKPT+{n-1} newest; the member paths newest first."""
        paths = []
        for i, obj in enumerate(objects):
            d = os.path.join(self.src, name, f"CKPT+{i}")
            os.makedirs(d)
            with open(os.path.join(d, "CKPT.yaml"), "w") as f:
                f.write(f"unixtime: {1000 + i}\nloss: {1.0 / (i + 1)}\n")
            torch.save(obj, os.path.join(d, file))
            paths.append(os.path.join(d, file))
        return paths[::-1]

    def assert_same(self, got, want):
        self.assertEqual(list(got.keys()), list(want.keys()))
        for k in want:
            self.assertEqual(got[k].dtype, want[k].dtype, k)
            self.assertTrue(torch.equal(got[k], want[k]), k)

    def assert_leaves_no_temporary(self):
        left = [n for n in os.listdir(self.cache) if ".tmp-" in n] if os.path.isdir(self.cache) else []
        self.assertEqual(left, [])

    def test_deflated_members_average_as_stored_ones(self):
        paths = self.experiment("d", [tf.state_dict(i) for i in range(3)])
        stored = {p: torch.load(p) for p in paths}
        for i, p in enumerate(paths):  # one member stored, one all deflated, one pickle only
            if i == 0:
                continue
            rewrite_deflated(p, p + ".z", (lambda n: True) if i == 1 else (lambda n: n.endswith("data.pkl")))
            os.replace(p + ".z", p)
            with zipfile.ZipFile(p) as z:
                self.assertIn(zipfile.ZIP_DEFLATED, [e.compress_type for e in z.infolist()])
            self.assert_same(torch.load(p), stored[p])  # valid for torch.load
        members = [stored[p] for p in paths]
        with mounted(self.src, "--avg-cache", self.cache) as (mnt, _, _):
            out = torch.load(os.path.join(mnt, "d", "avg", "last3", "model.ckpt"))
            self.assert_same(out, tf.reference_average(members, members[0]))

    def test_deflated_storages_of_every_size_average(self):
        """Deflated storages whose inflated size ends just past a read piece
        (zlib holds the last output after the last input byte is read: this
        used to fail as 'deflate data ends early'), averaged and inspected."""
        objects = [{"w": torch.full((2**23 + 1,), float(i)), "v": torch.arange(5000, dtype=torch.float32) * i}
                   for i in range(2)]
        paths = self.experiment("z", objects)
        for p in paths:
            rewrite_deflated(p, p + ".z")
            os.replace(p + ".z", p)
        loaded = [torch.load(p) for p in paths]
        p = subprocess.run([CKPTFS, "cat", "--index", os.path.join(self.tmp, "z.sqlite"), "--avg-cache",
                            self.cache, self.src, "/z/avg/last2/model.ckpt"], capture_output=True)
        self.assertEqual(p.returncode, 0, p.stderr)
        out = os.path.join(self.tmp, "z.out")
        with open(out, "wb") as f:
            f.write(p.stdout)
        self.assert_same(torch.load(out), tf.reference_average(loaded, loaded[0]))
        p = subprocess.run([CKPTFS, "inspect", paths[0]], capture_output=True, text=True)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertIn("8388609", p.stdout)

    def test_zip_bomb_fails_without_allocating_and_the_daemon_serves_on(self):
        paths = self.experiment("b", [tf.state_dict(i) for i in range(2)])
        # 3 MiB of deflate that inflates to 3 GiB, declared truthfully.
        with_bomb_pickle(paths[1], paths[1] + ".bomb", 3 << 10)
        self.assertLess(os.path.getsize(paths[1] + ".bomb"), 4 * MiB)
        os.replace(paths[1] + ".bomb", paths[1])
        with mounted(self.src, "--avg-cache", self.cache) as (mnt, proc, log):
            avg = os.path.join(mnt, "b", "avg", "last2", "model.ckpt")
            self.assertIn(errno_of(lambda: open(avg, "rb").close()), (errno.EIO, errno.EOPNOTSUPP))
            with open(log) as f:
                text = f.read()
            self.assertIn(paths[1], text)
            self.assertIn("kMaxPickleBytes", text)
            self.assertLess(vm_hwm_kib(proc.pid), 1 << 20, "the daemon's peak memory stays under 1 GiB")
            torch.load(os.path.join(mnt, "b", "latest", "model.ckpt"))
        self.assert_leaves_no_temporary()

    def test_truncated_member_fails_with_eio_and_the_daemon_serves_on(self):
        paths = self.experiment("t", [tf.state_dict(i) for i in range(3)])
        with mounted(self.src, "--avg-cache", self.cache) as (mnt, _, log):
            self.assertEqual(sorted(os.listdir(os.path.join(mnt, "t", "avg", "last3"))),
                             ["CKPT.yaml", "model.ckpt"])  # indexed
            size = os.path.getsize(paths[1])
            with open(paths[1], "r+b") as f:
                f.truncate(size // 2)
            avg = os.path.join(mnt, "t", "avg", "last3", "model.ckpt")
            self.assertEqual(errno_of(lambda: open(avg, "rb").close()), errno.EIO)
            with open(log) as f:
                self.assertIn(paths[1], f.read())
            self.assert_same(torch.load(os.path.join(mnt, "t", "latest", "model.ckpt")), torch.load(paths[0]))
            # Written back whole, the member averages again.
            torch.save(tf.state_dict(1), paths[1])
            self.assertTrue(wait_for(lambda: errno_of(lambda: open(avg, "rb").close()) == 0, timeout=10))
            members = [torch.load(p) for p in paths]
            self.assert_same(torch.load(avg), tf.reference_average(members, members[0]))
        self.assert_leaves_no_temporary()

    def big_experiment(self, name):
        """Three members of 160 MB (40 storages of 4 MB): an average that runs
        for a while after its first storage is logged."""
        objs = []
        for i in range(3):
            g = torch.Generator().manual_seed(i)
            objs.append(collections.OrderedDict((f"layer{j}.weight", torch.randn(1 << 20, generator=g))
                                                for j in range(40)))
        return self.experiment(name, objs)

    def start_average_and_wait_until_running(self, mnt, log):
        """A reader of the average in the background, returned once the
        daemon has logged progress on it (the average is under way)."""
        reader = subprocess.Popen([sys.executable, "-c", "import sys; open(sys.argv[1], 'rb').read()",
                                   os.path.join(mnt, "big", "avg", "last3", "model.ckpt")],
                                  stderr=subprocess.PIPE)

        def running():
            with open(log) as f:
                return re.search(r"big/avg/last3/model.ckpt: \d+%", f.read()) is not None
        self.assertTrue(wait_for(running, timeout=120), "the average did not start")
        return reader

    def assert_cancelled(self, proc, log, mnt, reader):
        """The daemon stopped the average (it did not finish it first), exited
        0 and the mount is gone; the reader got an error."""
        self.assertEqual(proc.wait(timeout=30), 0)
        with open(log) as f:
            text = f.read()
        self.assertIn("cancelled (ckptfs is stopping)", text)
        self.assertNotIn("averaged 3 member(s)", text)
        self.assertFalse(os.path.ismount(mnt))
        self.assertNotEqual(reader.wait(timeout=30), 0)
        self.assert_leaves_no_temporary()

    def test_sigterm_stops_an_average_in_progress(self):
        self.big_experiment("big")
        with mounted(self.src, "--avg-cache", self.cache, "--log-level", "debug") as (mnt, proc, log):
            reader = self.start_average_and_wait_until_running(mnt, log)
            proc.send_signal(signal.SIGTERM)
            self.assert_cancelled(proc, log, mnt, reader)

    def test_forced_unmount_stops_an_average_in_progress(self):
        self.big_experiment("big")
        with mounted(self.src, "--avg-cache", self.cache, "--log-level", "debug") as (mnt, proc, log):
            reader = self.start_average_and_wait_until_running(mnt, log)
            if os.geteuid() != 0:
                reader.kill()
                self.skipTest("umount -f needs root")
            # A plain unmount is refused while the average's open is under way
            # (EBUSY); umount -f aborts the FUSE connection first, which ends
            # the session. It may still report EBUSY (the reader had not let
            # go yet), and libfuse does not unmount an aborted connection:
            # the daemon detaches that dead mount itself on its way out.
            subprocess.run(["umount", "-f", mnt], capture_output=True)
            self.assert_cancelled(proc, log, mnt, reader)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--write-seeds":
        write_seeds(sys.argv[2])
    else:
        unittest.main()
