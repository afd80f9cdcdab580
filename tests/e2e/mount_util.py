"""Mounting ckptfs for real in tests: start, wait until ready, always unmount."""
import contextlib
import os
import subprocess
import tempfile
import time

CKPTFS = os.environ.get("CKPTFS_BIN", "ckptfs")


def wait_for(predicate, timeout=5.0, interval=0.02):
    """Polls predicate until it returns a truthy value or timeout passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def errno_of(fn):
    """The errno fn() fails with, or 0 when it succeeds."""
    try:
        fn()
    except OSError as e:
        return e.errno
    return 0


def checkpoint_of(path):
    """The checkpoint a view selected (its user.ckptfs.checkpoint xattr), or None."""
    try:
        return os.getxattr(path, "user.ckptfs.checkpoint").decode()
    except OSError:
        return None


def unmount(mnt):
    if subprocess.run(["fusermount3", "-u", mnt], capture_output=True).returncode != 0:
        subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True)


@contextlib.contextmanager
def mounted(source, *options, index=None):
    """Runs `ckptfs mount -f` on source; yields (mountpoint, process, log path).
    Unmounts and checks the daemon exited 0 on the way out."""
    mnt = tempfile.mkdtemp(prefix="ckptfs-mnt-")
    log_path = mnt + ".log"
    index = index or mnt + ".sqlite"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([CKPTFS, "mount", "-f", "--index", index, *options, source, mnt],
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        if not wait_for(lambda: os.path.ismount(mnt) or proc.poll() is not None, timeout=30):
            raise AssertionError("mount did not come up")
        if proc.poll() is not None:
            raise AssertionError("ckptfs mount exited %s: %s" % (proc.returncode, open(log_path, errors="backslashreplace").read()))
        yield mnt, proc, log_path
    finally:
        unmount(mnt)
        try:
            rc = proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        with open(log_path, errors="backslashreplace") as f:
            log_text = f.read()
        os.rmdir(mnt)
        if rc != 0:
            raise AssertionError("daemon exited %s after unmount: %s" % (rc, log_text))
