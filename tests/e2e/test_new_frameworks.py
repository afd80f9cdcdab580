"""End-to-end tests of EXPERIMENT/new/ used as a framework's own checkpoint
folder (issue 11): SpeechBrain's Checkpointer, Hugging Face's Trainer and
Lightning's ModelCheckpoint pointed at MOUNT/exp/new must not be able to tell
it from a plain directory, while every other reader and every query sees a
checkpoint only whole.

The frameworks are not Debian packages: frameworks.py reproduces the calls
each one makes (which upstream function and commit each follows is written
there). Every test runs on a real mount with real torch.save/torch.load, and
where it compares with a plain directory it runs the same emulation, with the
same pauses, on a local folder."""
import errno
import hashlib
import os
import random
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import unittest

import torch

import experiments
import frameworks as fw
from mount_util import CKPTFS, checkpoint_of, errno_of, mounted, wait_for


# Short settle times keep the suite fast: a checkpoint that holds every file
# of the experiment's previous one commits after --commit-quiet; one that
# lacks some waits --commit-wait.
COMMIT_WAIT = ["--commit-wait", "3"]
OPTS = ["--commit-quiet", "0.3", *COMMIT_WAIT]
LONG_WAIT = ["--commit-quiet", "0.3", "--commit-wait", "10"]
COMMIT_TIMEOUT = 60  # generous: a lacking checkpoint may wait the default --commit-wait (30 s)


def pauses(seed, n):
    """Training time between two saves: 0.5 to 1.5 s, about one quiet period
    (the default --commit-quiet is 1 s), the same for the plain run."""
    rng = random.Random(seed)
    return [rng.uniform(0.5, 1.5) for _ in range(n)]


def ckpt_names(folder, prefix):
    return sorted(n for n in os.listdir(folder) if n.startswith(prefix))


def loads(path):
    """torch.load(path), or None when it cannot be read now (for polling)."""
    try:
        return torch.load(path)
    except (OSError, RuntimeError, EOFError):
        return None


def same_state(sd, expected):
    return sd is not None and sd.keys() == expected.keys() and all(torch.equal(sd[k], expected[k]) for k in expected)


def whole_versions_reader(path, written, size, stop, errors, count):
    """Reads path until stop: each time in full, and the bytes must be one
    version written (sha256 in written, filled by the writer before each
    version reaches the mount); every fourth time also torch.load(path), whose
    parts must belong together (w and b of the epoch it names)."""
    n = 0
    while not stop.is_set():
        n += 1
        try:
            with open(path, "rb") as f:
                data = f.read()
            if hashlib.sha256(data).hexdigest() not in written:
                errors.append(f"{path}: {len(data)} bytes that are no version written (a torn read)")
                continue
            if n % 4 == 0:
                ck = torch.load(path)
                w_of = [e for e in range(8) if torch.equal(ck["state_dict"]["w"], fw.lightning_weights(e, size))]
                b_of = ck["state_dict"]["b"][0].item()
                if w_of != [ck["epoch"]] or b_of != float(ck["epoch"]):
                    errors.append(f"{path} says epoch {ck['epoch']}, its w is epoch {w_of}'s, its b epoch {b_of}'s")
            count[0] += 1
        except Exception as e:  # noqa: BLE001 - every failure is a finding
            errors.append(repr(e))


def abandoned(exp):
    d = os.path.join(exp, ".ckptfs-abandoned")
    return os.listdir(d) if os.path.isdir(d) else []


def rmtree_fd_walk(path, after_first_unlink=None):
    """shutil.rmtree on Python 3.11 (_rmtree_safe_fd), call for call: lstat,
    open the directory, fstat (samestat), scandir on the descriptor, unlink
    each entry with dir_fd, close, rmdir. after_first_unlink runs right after
    the first unlink succeeds."""
    orig = os.lstat(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert os.path.samestat(orig, os.fstat(fd))
        with os.scandir(fd) as it:
            entries = list(it)
        for i, entry in enumerate(entries):
            os.unlink(entry.name, dir_fd=fd)
            if i == 0 and after_first_unlink:
                after_first_unlink()
    finally:
        os.close(fd)
    os.rmdir(path)


class NewFrameworksTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="ckptfs-e2e-fw-")
        self.src = os.path.join(self.tmp, "src")
        self.exp = os.path.join(self.src, "exp")
        os.makedirs(self.exp)  # an experiment that starts empty, as a new run's folder does
        self.plain = os.path.join(self.tmp, "plain", "exp")

    def tearDown(self):
        shutil.rmtree(self.tmp, ignore_errors=True)

    def wait_committed(self, mnt, name, timeout=COMMIT_TIMEOUT):
        """Until NAME is in the experiment on disk and latest/ selects it."""
        path = os.path.join(self.exp, name)
        self.assertTrue(wait_for(lambda: checkpoint_of(os.path.join(mnt, "exp", "latest")) == path,
                                 timeout=timeout), f"{name} never became latest/")

    # --- SpeechBrain ---------------------------------------------------------

    def test_speechbrain_recipe_resumes_across_remount_like_a_plain_directory(self):
        """A recipe run twice (the normal way to resume) with a remount in
        between: the second run's recover_if_possible() resumes at the epoch the
        plain run resumes at, with that epoch's weights, and SpeechBrain's own
        retention (save_and_keep_only(num_to_keep=2, min_keys=["loss"])) with
        saves 0.5-1.5 s apart raises nothing and keeps the same checkpoints.
        (An unmount right after a save has its own test below.)"""
        losses = [0.9, 0.5, 0.7, 0.6, 0.8]
        gaps = pauses(11, len(losses))
        pace = lambda epoch: time.sleep(gaps[epoch - 1])  # noqa: E731
        plain_first, _, _ = fw.sb_recipe(self.plain, losses, 3, pace)
        plain_kept_first = sorted(fw.sb_kept_epochs(self.plain).values())
        plain_second, _, _ = fw.sb_recipe(self.plain, losses, 5, pace)
        plain_kept = sorted(fw.sb_kept_epochs(self.plain).values())
        self.assertEqual((plain_first, plain_second, plain_kept_first, plain_kept), (0, 3, [2, 3], [2, 4, 5]))

        with mounted(self.src, *OPTS) as (mnt, _, _):
            new = os.path.join(mnt, "exp", "new")
            first, _, _ = fw.sb_recipe(new, losses, 3, pace)
            self.assertEqual(first, plain_first)
            kept = fw.sb_kept_epochs(new)
            self.assertEqual(sorted(kept.values()), plain_kept_first)
            self.wait_committed(mnt, max(kept, key=lambda n: kept[n]))
        self.assertEqual(sorted(fw.sb_kept_epochs(self.exp).values()), plain_kept_first)
        self.assertEqual(abandoned(self.exp), [])

        with mounted(self.src, *OPTS) as (mnt, _, _):
            new = os.path.join(mnt, "exp", "new")
            # What recover_if_possible loads, checked on its own first.
            model, counter = fw.net(99), fw.EpochCounter(5)
            chosen = fw.Checkpointer(new, [("model", fw.Module(model)), ("counter", counter)]).recover_if_possible()
            self.assertIsNotNone(chosen, "recover_if_possible() found nothing in new/")
            self.assertEqual(counter.current, plain_second)
            self.assertTrue(fw.same_weights(model, fw.net(plain_second)))
            self.assertEqual(os.path.dirname(str(chosen.path)), new)  # its path is under new/

            second, _, _ = fw.sb_recipe(new, losses, 5, pace)
            self.assertEqual(second, plain_second)
            kept = fw.sb_kept_epochs(new)
            self.assertEqual(sorted(kept.values()), plain_kept)
            # The experiment and every query agree once the last one is committed.
            newest = max(kept, key=lambda n: kept[n])
            self.wait_committed(mnt, newest)
            self.assertEqual(ckpt_names(self.exp, "CKPT+"), sorted(kept))
            self.assertEqual(ckpt_names(os.path.join(mnt, "exp"), "CKPT+"), sorted(kept))
            self.assertEqual(sorted(os.listdir(new)), sorted(kept))
            best = os.path.join(mnt, "exp", "best", "min", "loss")
            self.assertEqual(checkpoint_of(best), os.path.join(self.exp, min(kept, key=lambda n: losses[kept[n] - 1])))
        self.assertEqual(abandoned(self.exp), [])

    def test_speechbrain_paths_and_descriptors_survive_the_commit(self):
        """SpeechBrain lists new/, then opens new/X/CKPT.yaml; a commit may fall
        in between. The path stays valid across the commit, and a descriptor
        opened before it keeps reading the same file after it."""
        with mounted(self.src, *OPTS) as (mnt, _, _):
            new = os.path.join(mnt, "exp", "new")
            model = fw.net(1)
            ckpt = fw.Checkpointer(new, [("model", fw.Module(model)), ("counter", fw.EpochCounter(9))])
            first = ckpt.save_checkpoint(meta={"loss": 0.8, "epoch": 1})
            self.wait_committed(mnt, first.path.name)
            self.assertEqual([c.path.name for c in ckpt.list_checkpoints()], [first.path.name])

            # A file open for writing holds the commit back: the last save hook
            # leaves its file open (appending nothing changes no byte), so the
            # descriptors below are surely opened before the commit.
            held = []

            def save_and_hold(obj, path):
                obj.save(path)
                held.append(open(path, "a"))

            model.load_state_dict(fw.net(2).state_dict())
            second = fw.Checkpointer(new, [("model", fw.Module(model)), ("counter", fw.EpochCounter(9))],
                                     custom_save_hooks={"counter": save_and_hold}).save_checkpoint(
                                         meta={"loss": 0.4, "epoch": 2})
            holder = held[0]
            listed = os.listdir(new)
            meta_fd = open(second.path / "CKPT.yaml", encoding="utf-8")
            model_fd = open(second.path / "model.ckpt", "rb")
            try:
                self.assertFalse(os.path.exists(os.path.join(self.exp, second.path.name)), "committed while open")
                holder.close()
                self.wait_committed(mnt, second.path.name)
                self.assertIn("epoch: 2", meta_fd.read())
                self.assertTrue(same_state(torch.load(model_fd), fw.net(2).state_dict()))
            finally:
                holder.close()
                meta_fd.close()
                model_fd.close()
            self.assertEqual(sorted(listed), sorted([first.path.name, second.path.name]))
            # The names listed before the commit still open, by path.
            for name in listed:
                with open(os.path.join(new, name, "CKPT.yaml"), encoding="utf-8") as f:
                    self.assertIn("unixtime", f.read())
            self.assertEqual(sorted(c.meta["epoch"] for c in ckpt.list_checkpoints()), [1, 2])
            self.assertEqual(sorted(os.listdir(new)), sorted(listed))

    def test_speechbrain_named_checkpoint_saved_twice(self):
        """save_checkpoint(name="final") twice: on a plain directory the second
        replaces the first (os.makedirs(exist_ok=True), then truncating
        writes). Readers of the experiment see the first version whole until
        the second is committed, then the second."""
        with mounted(self.src, *OPTS) as (mnt, _, _):
            new = os.path.join(mnt, "exp", "new")
            model = fw.big_net(1)
            ckpt = fw.Checkpointer(new, [("model", fw.Module(model)), ("counter", fw.EpochCounter(9))])
            ckpt.save_checkpoint(meta={"loss": 0.5}, name="final")
            self.wait_committed(mnt, "CKPT+final")
            v1 = {k: v.clone() for k, v in fw.big_net(1).state_dict().items()}
            v2 = fw.big_net(2).state_dict()

            stop, errors, seen, read_hashes = threading.Event(), [], set(), set()
            real = os.path.join(self.exp, "CKPT+final", "model.ckpt")
            with open(real, "rb") as f:
                h1 = hashlib.sha256(f.read()).hexdigest()

            def reader():
                # Full reads (hashes checked at the end against the two
                # versions) and, every fourth time, torch.load.
                path = os.path.join(mnt, "exp", "CKPT+final", "model.ckpt")
                n = 0
                while not stop.is_set():
                    n += 1
                    try:
                        with open(path, "rb") as f:
                            read_hashes.add(hashlib.sha256(f.read()).hexdigest())
                        if n % 4:
                            continue
                        sd = torch.load(path)
                        if all(torch.equal(sd[k], v1[k]) for k in v1):
                            seen.add(1)
                        elif all(torch.equal(sd[k], v2[k]) for k in v2):
                            seen.add(2)
                        else:
                            errors.append("a mixed model.ckpt")
                    except Exception as e:  # noqa: BLE001 - every failure is a finding
                        errors.append(repr(e))

            t = threading.Thread(target=reader)
            t.start()
            try:
                self.assertTrue(wait_for(lambda: seen or errors, timeout=30))
                model.load_state_dict(v2)
                ckpt.save_checkpoint(meta={"loss": 0.3}, name="final")  # raises nothing
                self.assertTrue(wait_for(lambda: same_state(loads(os.path.join(self.exp, "CKPT+final", "model.ckpt")), v2),
                                         timeout=COMMIT_TIMEOUT))
                self.assertTrue(wait_for(lambda: 2 in seen or errors, timeout=30))
            finally:
                stop.set()
                t.join(timeout=60)
            self.assertEqual(errors, [])
            with open(real, "rb") as f:
                h2 = hashlib.sha256(f.read()).hexdigest()
            self.assertEqual(read_hashes - {h1, h2}, set(), "model.ckpt read as bytes of neither version (torn)")
            self.assertEqual(sorted(os.listdir(new)), ["CKPT+final"])
            listed = ckpt.list_checkpoints()
            self.assertEqual([(c.path.name, c.meta["loss"]) for c in listed], [("CKPT+final", 0.3)])
            fresh = fw.big_net(7)
            fw.Checkpointer(new, [("model", fw.Module(fresh))]).recover_if_possible()
            self.assertTrue(all(torch.equal(fresh.state_dict()[k], v2[k]) for k in v2))
            self.assertEqual(ckpt_names(self.exp, "CKPT+"), ["CKPT+final"])
            self.assertEqual(sorted(os.listdir(os.path.join(self.exp, "CKPT+final"))),
                             ["CKPT.yaml", "counter.ckpt", "model.ckpt"])

    def test_speechbrain_unmount_right_after_a_save_commits_it(self):
        """A save followed at once by a clean unmount (fusermount3 -u) or by
        SIGTERM is committed, not set aside."""
        for how in ("fusermount", "sigterm"):
            with self.subTest(how=how):
                with mounted(self.src, *OPTS) as (mnt, proc, log):
                    new = os.path.join(mnt, "exp", "new")
                    model = fw.net(10)
                    ckpt = fw.Checkpointer(new, [("model", fw.Module(model)), ("counter", fw.EpochCounter(9))])
                    first = ckpt.save_checkpoint(meta={"loss": 0.6, "how": how})
                    self.wait_committed(mnt, first.path.name)
                    model.load_state_dict(fw.net(11).state_dict())
                    last = ckpt.save_checkpoint(meta={"loss": 0.5, "how": how})
                    if how == "sigterm":
                        proc.send_signal(signal.SIGTERM)
                        self.assertEqual(proc.wait(timeout=60), 0)
                # The daemon is gone: the source alone says what happened.
                d = os.path.join(self.exp, last.path.name)
                self.assertTrue(os.path.isdir(d), f"{last.path.name} not committed at unmount ({how})")
                self.assertEqual(sorted(os.listdir(d)), ["CKPT.yaml", "counter.ckpt", "model.ckpt"])
                sd = torch.load(os.path.join(d, "model.ckpt"))
                self.assertTrue(all(torch.equal(sd[k], v) for k, v in fw.net(11).state_dict().items()))
                self.assertEqual(abandoned(self.exp), [])
                self.assertNotIn(last.path.name, os.listdir(os.path.join(self.exp, ".ckptfs-staging"))
                                 if os.path.isdir(os.path.join(self.exp, ".ckptfs-staging")) else [])

    def test_speechbrain_slow_save_hook_never_shows_a_partial_checkpoint(self):
        """A save hook pausing between files for longer than the quiet period
        (but less than --commit-wait): the checkpoint lacks a file its
        predecessor has, so it waits; latest/ and best/ never select it before
        it is whole, and the save completes (upstream: "Parent directory ...
        does not exist" when the half was committed)."""
        with mounted(self.src, *LONG_WAIT) as (mnt, _, _):
            new = os.path.join(mnt, "exp", "new")
            _, _, ckpt = fw.sb_recipe(new, [0.9], 1, lambda e: None)
            (first,) = [c.path.name for c in ckpt.list_checkpoints()]
            self.wait_committed(mnt, first)
            stop, bad, polls = threading.Event(), [], [0]
            views = [os.path.join(mnt, "exp", "latest"), os.path.join(mnt, "exp", "best", "min", "loss")]

            def poll():
                while not stop.is_set():
                    for view in views:
                        chosen = checkpoint_of(view)
                        if chosen is None:
                            bad.append(f"{view} selects nothing")
                        elif os.path.basename(chosen) != first:
                            files = sorted(os.listdir(view))
                            if files != ["CKPT.yaml", "counter.ckpt", "extra.ckpt", "model.ckpt"]:
                                bad.append(f"{view} -> {chosen} holds {files}")
                    polls[0] += 1

            t = threading.Thread(target=poll)
            t.start()
            try:
                _, _, ckpt = fw.sb_recipe(new, [0.9, 0.2], 2, lambda e: None, slow_hook=fw.slow_torch_save(2.0))
                names = sorted(c.path.name for c in ckpt.list_checkpoints())
                second = [n for n in names if n != first][0]
                self.wait_committed(mnt, second)
            finally:
                stop.set()
                t.join(timeout=60)
            self.assertEqual(bad, [])
            self.assertGreater(polls[0], 10)
            self.assertEqual(sorted(os.listdir(os.path.join(self.exp, second))),
                             ["CKPT.yaml", "counter.ckpt", "extra.ckpt", "model.ckpt"])
            self.assertEqual(torch.load(os.path.join(mnt, "exp", "latest", "extra.ckpt"))["weight"].flatten()[0].item(),
                             2.0)

    def test_rmtree_through_new_removes_the_whole_checkpoint_at_the_first_unlink(self):
        """shutil.rmtree of a committed checkpoint through new/ (Python 3.11's fd
        walk): at the first unlink the checkpoint leaves the experiment and
        every view; the other unlinks and the rmdir succeed. os.remove of a
        single-file checkpoint removes it. A pinned checkpoint answers EPERM
        and stays whole."""
        experiments.speechbrain(self.exp, [(str(i), {"unixtime": 100 + i, "loss": 1.0 - i / 10, "epoch": i})
                                           for i in (1, 2, 3)])
        torch.save({"w": torch.ones(3)}, os.path.join(self.exp, "epoch=0-val_loss=0.90.ckpt"))
        open(os.path.join(self.exp, "CKPT+1", ".keep"), "w").close()
        with mounted(self.src, *OPTS) as (mnt, _, _):
            new = os.path.join(mnt, "exp", "new")
            mexp = os.path.join(mnt, "exp")
            self.assertEqual(sorted(os.listdir(new)), ["CKPT+1", "CKPT+2", "CKPT+3", "epoch=0-val_loss=0.90.ckpt"])
            # Lightning's _remove_checkpoint: exists, then os.remove.
            os.remove(os.path.join(new, "epoch=0-val_loss=0.90.ckpt"))
            self.assertFalse(os.path.exists(os.path.join(self.exp, "epoch=0-val_loss=0.90.ckpt")))
            self.assertNotIn("epoch=0-val_loss=0.90.ckpt", os.listdir(mexp))
            self.assertNotIn("epoch=0-val_loss=0.90.ckpt", os.listdir(new))
            self.assertEqual(checkpoint_of(os.path.join(mexp, "latest")), os.path.join(self.exp, "CKPT+3"))
            state = {}

            def after_first_unlink():
                state["source"] = os.path.exists(os.path.join(self.exp, "CKPT+3"))
                state["listing"] = sorted(os.listdir(mexp))
                state["latest"] = checkpoint_of(os.path.join(mexp, "latest"))
                with open(os.path.join(mexp, "index.json")) as f:
                    state["index"] = f.read()

            rmtree_fd_walk(os.path.join(new, "CKPT+3"), after_first_unlink)
            self.assertFalse(state["source"], "CKPT+3 still in the experiment after the first unlink")
            self.assertNotIn("CKPT+3", state["listing"])
            self.assertEqual(state["latest"], os.path.join(self.exp, "CKPT+2"))
            self.assertNotIn("CKPT+3", state["index"])
            self.assertNotIn("CKPT+3", os.listdir(new))
            self.assertFalse(os.path.exists(os.path.join(self.exp, "CKPT+3")))

            shutil.rmtree(os.path.join(new, "CKPT+2"))  # the real thing, once
            self.assertEqual(ckpt_names(self.exp, "CKPT+"), ["CKPT+1"])

            # Pinned: refused, whole, still listed.
            self.assertEqual(errno_of(lambda: os.remove(os.path.join(new, "CKPT+1", "mdl.ckpt"))), errno.EPERM)
            with self.assertRaises(PermissionError):
                shutil.rmtree(os.path.join(new, "CKPT+1"))
            self.assertEqual(sorted(os.listdir(os.path.join(self.exp, "CKPT+1"))),
                             [".keep", "CKPT.yaml", "counter.ckpt", "mdl.ckpt"])
            torch.load(os.path.join(new, "CKPT+1", "mdl.ckpt"))
            self.assertEqual(sorted(os.listdir(new)), ["CKPT+1"])
            self.assertEqual(checkpoint_of(os.path.join(mexp, "latest")), os.path.join(self.exp, "CKPT+1"))

    # --- Hugging Face Trainer --------------------------------------------------

    def test_hf_trainer_rotation_and_resume_like_a_plain_directory(self):
        """Trainer(output_dir=MOUNT/exp/new, save_steps=10, save_total_limit=2):
        checkpoint-N saved 0.5-1.5 s apart, rotation by glob + getmtime +
        shutil.rmtree(ignore_errors=True), then after a remount
        get_last_checkpoint resumes at the same step with the same state, and
        the kept checkpoints are those of a plain directory."""
        gaps = pauses(23, 5)
        pace = lambda step: time.sleep(gaps[step // 10 - 1])  # noqa: E731
        plain = fw.HFTrainer(self.plain, 2)
        plain.train_steps(30, 10, pace)
        plain_first = ckpt_names(self.plain, "checkpoint-")
        plain2 = fw.HFTrainer(self.plain, 2)
        plain_resumed = os.path.basename(plain2.resume())
        plain2.train_steps(50, 10, pace)
        plain_final = ckpt_names(self.plain, "checkpoint-")
        self.assertEqual((plain_first, plain_resumed, plain_final),
                         (["checkpoint-20", "checkpoint-30"], "checkpoint-30", ["checkpoint-40", "checkpoint-50"]))

        with mounted(self.src, *OPTS) as (mnt, _, _):
            new = os.path.join(mnt, "exp", "new")
            trainer = fw.HFTrainer(new, 2)
            trainer.train_steps(30, 10, pace)
            # ignore_errors=True hides failures: check what is really left.
            self.assertEqual(ckpt_names(new, "checkpoint-"), plain_first)
            trained = {k: v.clone() for k, v in trainer.model.state_dict().items()}
            momentum = [s["momentum_buffer"].clone() for s in trainer.optimizer.state_dict()["state"].values()]
            self.assertTrue(wait_for(lambda: checkpoint_of(os.path.join(mnt, "exp", "latest"))
                                     == os.path.join(self.exp, "checkpoint-30"), timeout=COMMIT_TIMEOUT))
        self.assertEqual(ckpt_names(self.exp, "checkpoint-"), plain_first)
        self.assertEqual(abandoned(self.exp), [])

        with mounted(self.src, *OPTS) as (mnt, _, _):
            new = os.path.join(mnt, "exp", "new")
            trainer = fw.HFTrainer(new, 2, seed=5)
            resumed = trainer.resume()
            self.assertEqual(resumed, os.path.join(new, plain_resumed))
            self.assertEqual(trainer.state["global_step"], 30)
            self.assertTrue(all(torch.equal(trainer.model.state_dict()[k], v) for k, v in trained.items()))
            resumed_momentum = [s["momentum_buffer"] for s in trainer.optimizer.state_dict()["state"].values()]
            self.assertEqual(len(resumed_momentum), len(momentum))
            self.assertTrue(all(torch.equal(a, b) for a, b in zip(resumed_momentum, momentum)))
            trainer.train_steps(50, 10, pace)
            self.assertEqual(ckpt_names(new, "checkpoint-"), plain_final)
            self.assertTrue(wait_for(lambda: checkpoint_of(os.path.join(mnt, "exp", "latest"))
                                     == os.path.join(self.exp, "checkpoint-50"), timeout=COMMIT_TIMEOUT))
            self.assertEqual(ckpt_names(self.exp, "checkpoint-"), plain_final)
            self.assertEqual(ckpt_names(os.path.join(mnt, "exp"), "checkpoint-"), plain_final)
            self.assertEqual(sorted(os.listdir(os.path.join(self.exp, "checkpoint-50"))),
                             sorted(os.listdir(os.path.join(self.plain, "checkpoint-50"))))
        self.assertEqual(abandoned(self.exp), [])

    # --- Lightning ModelCheckpoint ---------------------------------------------

    def test_lightning_top_k_and_last_like_a_plain_directory_readers_never_see_a_torn_last(self):
        """ModelCheckpoint(dirpath=MOUNT/exp/new, filename="{epoch}-{val_loss:.2f}",
        monitor="val_loss", save_top_k=2, save_last=True): names (with the
        version counter from exists()), removal of the worst and last.ckpt
        rewritten in place (truncating copy) as on a plain directory; meanwhile
        torch.load of MOUNT/exp/last.ckpt always loads one whole version."""
        losses = [0.5, 0.4, 0.6, 0.3, 0.45]
        gaps = pauses(37, 2 * len(losses))

        def run(dirpath, offset, size, after_epoch=None, written=None):
            mc = fw.ModelCheckpoint(dirpath, size=size, written=written)
            for epoch, loss in enumerate(losses):
                mc.on_validation_end(epoch, 10 * (epoch + 1), loss)
                if after_epoch:
                    after_epoch(epoch)
                time.sleep(gaps[offset + epoch])
            return mc

        run(self.plain, 0, 10)
        plain_first = sorted(os.listdir(self.plain))
        self.assertEqual(plain_first, ["epoch=1-val_loss=0.40.ckpt", "epoch=3-val_loss=0.30.ckpt", "last.ckpt"])
        run(self.plain, len(losses), 10)
        plain_final = sorted(os.listdir(self.plain))

        size = 2_000_000  # 8 MB: a rewrite takes a while
        with mounted(self.src, *OPTS) as (mnt, _, _):
            new = os.path.join(mnt, "exp", "new")
            last = os.path.join(mnt, "exp", "last.ckpt")
            stop, errors, count, written = threading.Event(), [], [0], set()
            readers = [threading.Thread(target=whole_versions_reader, args=(last, written, size, stop, errors, count))
                       for _ in range(3)]

            def start_readers(epoch):
                if epoch == 0:
                    self.assertTrue(wait_for(lambda: os.path.exists(os.path.join(self.exp, "last.ckpt")),
                                             timeout=COMMIT_TIMEOUT), "last.ckpt never committed")
                    for t in readers:
                        t.start()

            try:
                mc = run(new, 0, size, start_readers, written)
                # The worst was removed through new/: gone from everywhere at once.
                for gone in ("epoch=0-val_loss=0.50.ckpt",):
                    self.assertNotIn(gone, os.listdir(os.path.join(mnt, "exp")))
                    self.assertFalse(os.path.exists(os.path.join(self.exp, gone)))
                self.assertEqual(sorted(os.listdir(new)), plain_first)
                self.assertTrue(wait_for(lambda: (loads(last) or {}).get("epoch") == len(losses) - 1,
                                         timeout=COMMIT_TIMEOUT))
                seen = count[0]
                self.assertTrue(wait_for(lambda: count[0] > seen + 2 or errors, timeout=30))
            finally:
                stop.set()
                for t in readers:
                    if t.ident:
                        t.join(timeout=60)
            self.assertEqual(errors[:5], [], f"{len(errors)} bad loads of {count[0] + len(errors)}")
            self.assertGreater(count[0], 0)
            self.assertEqual(mc.best_model_path, os.path.join(new, "epoch=3-val_loss=0.30.ckpt"))
        self.assertEqual(sorted(n for n in os.listdir(self.exp) if not n.startswith(".")), plain_first)
        self.assertEqual(abandoned(self.exp), [])

        with mounted(self.src, *OPTS) as (mnt, _, _):
            new = os.path.join(mnt, "exp", "new")
            self.assertEqual(fw.ModelCheckpoint(new).find_last_checkpoints(), {os.path.join(new, "last.ckpt")})
            self.assertEqual(torch.load(os.path.join(new, "last.ckpt"))["epoch"], len(losses) - 1)
            run(new, len(losses), 10)  # a second run into the same folder: version counters
            self.assertEqual(sorted(os.listdir(new)), plain_final)
            self.assertTrue(wait_for(lambda: sorted(n for n in os.listdir(self.exp) if not n.startswith("."))
                                     == plain_final, timeout=COMMIT_TIMEOUT))
            self.assertEqual(sorted(n for n in os.listdir(os.path.join(mnt, "exp")) if n.endswith(".ckpt")),
                             plain_final)
            for name in plain_final:
                torch.load(os.path.join(mnt, "exp", name))

    def test_lightning_manual_save_over_a_committed_file_readers_see_whole_versions(self):
        """trainer.save_checkpoint(MOUNT/exp/new/epoch=9-step=90.ckpt) again and
        again (TorchCheckpointIO.save_checkpoint: makedirs, then _atomic_save's
        truncating copy onto the committed file): every torch.load of
        MOUNT/exp/epoch=9-step=90.ckpt meanwhile loads one whole version, and
        the last one wins. (The same rewrite as last.ckpt, under a name every
        version of ckptfs takes for a checkpoint.)"""
        size, name, versions = 2_000_000, "epoch=9-step=90.ckpt", 8
        gaps = pauses(41, versions)
        with mounted(self.src, *OPTS) as (mnt, _, _):
            new = os.path.join(mnt, "exp", "new")
            path = os.path.join(mnt, "exp", name)
            stop, errors, count, written = threading.Event(), [], [0], set()
            mc = fw.ModelCheckpoint(new, size=size, written=written)
            mc._save_checkpoint(os.path.join(new, name), {"epoch": 0, "step": 90})
            self.assertTrue(wait_for(lambda: os.path.exists(os.path.join(self.exp, name)), timeout=COMMIT_TIMEOUT))
            readers = [threading.Thread(target=whole_versions_reader, args=(path, written, size, stop, errors, count))
                       for _ in range(3)]
            for t in readers:
                t.start()
            try:
                for v in range(1, versions):
                    time.sleep(gaps[v])
                    mc._save_checkpoint(os.path.join(new, name), {"epoch": v, "step": 90})
                self.assertTrue(wait_for(lambda: (loads(os.path.join(self.exp, name)) or {}).get("epoch")
                                         == versions - 1, timeout=COMMIT_TIMEOUT))
                seen = count[0]
                self.assertTrue(wait_for(lambda: count[0] > seen + 2 or errors, timeout=30))
            finally:
                stop.set()
                for t in readers:
                    t.join(timeout=60)
            self.assertEqual(errors[:5], [], f"{len(errors)} bad loads of {count[0] + len(errors)}")
            self.assertEqual(torch.load(path)["epoch"], versions - 1)
            self.assertEqual(sorted(os.listdir(new)), [name])

    # --- A new run in a tree mount -----------------------------------------------

    def test_new_experiment_in_a_tree_mount(self):
        """Checkpointer(MOUNT/asr/exp2/new) where asr/exp2 does not exist yet
        (os.makedirs through the mount) or exists but is empty: the run starts
        through the mount and its checkpoint appears in MOUNT/asr/expN/latest."""
        asr = os.path.join(self.src, "asr")
        experiments.speechbrain(os.path.join(asr, "exp1"), [("1", {"unixtime": 100, "loss": 0.9})])
        os.makedirs(os.path.join(asr, "exp3"))
        with mounted(self.src, *OPTS) as (mnt, _, _):
            for exp in ("exp2", "exp3"):
                with self.subTest(exp=exp):
                    new = os.path.join(mnt, "asr", exp, "new")
                    os.makedirs(new, exist_ok=True)
                    self.assertTrue(os.path.isdir(os.path.join(asr, exp)))
                    self.assertFalse(os.path.exists(os.path.join(asr, exp, "new")))  # new/ is no real directory
                    model = fw.net(3)
                    ckpt = fw.Checkpointer(new, [("model", fw.Module(model)), ("counter", fw.EpochCounter(1))])
                    saved = ckpt.save_checkpoint(meta={"loss": 0.4, "epoch": 1})
                    real = os.path.join(asr, exp, saved.path.name)
                    self.assertTrue(wait_for(lambda: checkpoint_of(os.path.join(mnt, "asr", exp, "latest")) == real,
                                             timeout=COMMIT_TIMEOUT), f"{exp}: never in latest/")
                    sd = torch.load(os.path.join(mnt, "asr", exp, "latest", "model.ckpt"))
                    self.assertTrue(all(torch.equal(sd[k], v) for k, v in fw.net(3).state_dict().items()))
                    self.assertEqual([c.path.name for c in ckpt.list_checkpoints()], [saved.path.name])
            # mkdir -p of a directory that is not a checkpoint, as a shell script does.
            subprocess.run(["mkdir", "-p", os.path.join(mnt, "asr", "exp4")], check=True)
            self.assertTrue(os.path.isdir(os.path.join(asr, "exp4")))
            self.assertTrue(os.path.isdir(os.path.join(mnt, "asr", "exp4", "new")))
            self.assertEqual(checkpoint_of(os.path.join(mnt, "asr", "exp1", "latest")),
                             os.path.join(asr, "exp1", "CKPT+1"))


if __name__ == "__main__":
    unittest.main()
