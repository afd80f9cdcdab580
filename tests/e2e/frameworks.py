"""What three training frameworks do to their checkpoint folder, call for
call, without the frameworks (they are not Debian packages).

Each class below reproduces the file-system calls of one upstream function,
in the same order, with the same open modes and the same listing/existence
checks; the tensors are small but real (torch.save/torch.load). Upstream
versions read (for the call sequences only; no code is copied):

- SpeechBrain, speechbrain/speechbrain 9c826ef3937bac885c8a6ca86c6889a30f256fb5:
  speechbrain/utils/checkpoints.py (Checkpointer) and
  speechbrain/utils/epoch_loop.py (EpochCounter._save/_recover).
- Hugging Face transformers: src/transformers/trainer.py at
  000945a9b726d87a93e61e873b88ff8f3cd411b5 (Trainer._save_checkpoint, _save,
  _save_optimizer_and_scheduler, _save_rng_state, _sorted_checkpoints,
  _rotate_checkpoints) and src/transformers/trainer_utils.py at
  007360d654f36b1f4bc0c701c7b1b69273a7c4ed (get_last_checkpoint).
- Lightning, Lightning-AI/pytorch-lightning 7f0c3436cd3f6ad3753125672024fc415cbcb414:
  src/lightning/pytorch/callbacks/model_checkpoint.py (ModelCheckpoint),
  src/lightning/fabric/plugins/io/torch_io.py (TorchCheckpointIO) and
  src/lightning/fabric/utilities/cloud_io.py (_atomic_save), with fsspec's
  LocalFileSystem/LocalFileOpener (fsspec/filesystem_spec
  00b742f819232d629571d927b97630a3cc114fe9, fsspec/implementations/local.py).
"""
import collections
import hashlib
import json
import os
import pathlib
import random
import re
import shutil
import tempfile
import time

import torch
import yaml

import tensor_fixtures


def net(seed):
    """A small model whose weights say which training step made them."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Linear(8, 4))


def big_net(seed):
    """A model of 4 MiB: reading it takes many reads, so a reader can meet a rewrite."""
    torch.manual_seed(seed)
    return torch.nn.Linear(1024, 1024)


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --- SpeechBrain -------------------------------------------------------------

SBCheckpoint = collections.namedtuple("SBCheckpoint", ["path", "meta", "paramfiles"])
SBCheckpoint.__hash__ = lambda self: hash(self.path)  # as upstream: a checkpoint is its path


def sb_recency(ckpt):
    return ckpt.meta["unixtime"]


class EpochCounter:
    """speechbrain/utils/epoch_loop.py EpochCounter: _save writes str(current)
    with open(path, "w"); _recover reads it back (one less mid-epoch)."""

    def __init__(self, limit):
        self.current, self.limit = 0, limit

    def __iter__(self):
        while self.current < self.limit:
            self.current += 1
            yield self.current

    def save(self, path):
        with open(path, "w", encoding="utf-8") as fo:
            fo.write(str(self.current))

    def load(self, path, end_of_epoch=True):
        with open(path, encoding="utf-8") as fi:
            saved = int(fi.read())
        self.current = saved if end_of_epoch else saved - 1


class Module:
    """SpeechBrain's default hooks for a torch.nn.Module: torch_save
    (torch.save(state_dict, path)) and torch_recovery (torch.load + load_state_dict)."""

    def __init__(self, module):
        self.module = module

    def save(self, path):
        torch.save(self.module.state_dict(), path)

    def load(self, path, end_of_epoch=True):
        self.module.load_state_dict(torch.load(path, map_location="cpu"))


class Checkpointer:
    """speechbrain.utils.checkpoints.Checkpointer, the calls it makes:

    __init__: os.makedirs(checkpoints_dir, exist_ok=True).
    save_checkpoint: name = _new_checkpoint_dirpath() (CKPT+<local time to the
      second>+NN, NN the first suffix for which Path.exists() is false) or
      CKPT+<name>; os.makedirs(ckpt_dir, exist_ok=True); CKPT.yaml written with
      open("w") ("# yamllint disable" + yaml.dump(meta), meta has unixtime and
      end-of-epoch); then one save hook per recoverable, in order, to
      <name>.ckpt.
    list_checkpoints: Path.iterdir() of the folder, keeping directories named
      CKPT* that hold CKPT.yaml (_is_checkpoint_dir: is_dir, startswith,
      exists); for each, open CKPT.yaml + yaml.load, and iterdir() for *.ckpt.
    find_checkpoints / delete_checkpoints / save_and_keep_only: the same ranking
      (recency by unixtime; min_keys/max_keys), then shutil.rmtree of every
      checkpoint no key protects (_delete_checkpoint checks _is_checkpoint_dir
      first).
    recover_if_possible: find_checkpoint, then each recoverable's load hook on
      paramfiles[name] with meta["end-of-epoch"].

    custom_save_hooks maps a recoverable name to callable(obj, path), as
    upstream's custom_save_hooks."""

    def __init__(self, checkpoints_dir, recoverables, custom_save_hooks=None):
        self.checkpoints_dir = pathlib.Path(checkpoints_dir)
        os.makedirs(self.checkpoints_dir, exist_ok=True)
        self.recoverables = collections.OrderedDict(recoverables)
        self.custom_save_hooks = dict(custom_save_hooks or {})

    def save_checkpoint(self, meta=None, end_of_epoch=True, name=None):
        ckpt_dir = self._new_checkpoint_dirpath() if name is None else self.checkpoints_dir / f"CKPT+{name}"
        os.makedirs(ckpt_dir, exist_ok=True)
        saved_meta = self._save_checkpoint_metafile(ckpt_dir / "CKPT.yaml", meta or {}, end_of_epoch)
        paramfiles = {}
        for rname, obj in self.recoverables.items():
            savepath = ckpt_dir / f"{rname}.ckpt"
            paramfiles[rname] = savepath
            if rname in self.custom_save_hooks:
                self.custom_save_hooks[rname](obj, savepath)
            else:
                obj.save(savepath)
        return SBCheckpoint(ckpt_dir, saved_meta, paramfiles)

    def save_and_keep_only(self, meta=None, end_of_epoch=True, name=None, num_to_keep=1, keep_recent=True,
                           importance_keys=None, max_keys=None, min_keys=None):
        self.save_checkpoint(meta=meta, end_of_epoch=end_of_epoch, name=name)
        keys = list(importance_keys or [])
        if keep_recent:
            keys.append(sb_recency)
        self.delete_checkpoints(num_to_keep=num_to_keep, max_keys=max_keys, min_keys=min_keys,
                                importance_keys=keys)

    def find_checkpoint(self, importance_key=None, max_key=None, min_key=None):
        found = self.find_checkpoints(importance_key, max_key, min_key)
        return found[0] if found else None

    def find_checkpoints(self, importance_key=None, max_key=None, min_key=None, max_num_checkpoints=None):
        predicate = None
        if importance_key is None and min_key is None and max_key is None:
            importance_key = sb_recency
        if max_key and not importance_key:
            importance_key = lambda c: c.meta[max_key]  # noqa: E731
            predicate = lambda c: max_key in c.meta  # noqa: E731
        elif min_key and not importance_key:
            importance_key = lambda c: -c.meta[min_key]  # noqa: E731
            predicate = lambda c: min_key in c.meta  # noqa: E731
        ckpts = list(filter(predicate, self.list_checkpoints()))
        ckpts = sorted(ckpts, key=sb_recency, reverse=True)
        ranked = sorted(ckpts, key=importance_key, reverse=True)
        return ranked[:max_num_checkpoints] if max_num_checkpoints is not None else ranked

    def recover_if_possible(self, importance_key=None, max_key=None, min_key=None):
        chosen = self.find_checkpoint(importance_key, max_key, min_key)
        if chosen is not None:
            end_of_epoch = chosen.meta["end-of-epoch"]
            for rname, obj in self.recoverables.items():
                obj.load(chosen.paramfiles[rname], end_of_epoch)
        return chosen

    def list_checkpoints(self):
        return self._construct_checkpoint_objects(
            [x for x in self.checkpoints_dir.iterdir() if self._is_checkpoint_dir(x)])

    def delete_checkpoints(self, *, num_to_keep=1, min_keys=None, max_keys=None, importance_keys=(sb_recency,)):
        potential, protected = set(), set()
        keys = [{"min_key": k} for k in min_keys or []]
        keys += [{"max_key": k} for k in max_keys or []]
        keys += [{"importance_key": k} for k in importance_keys]
        for kw in keys:
            potential.update(self.find_checkpoints(**kw))
            protected.update(self.find_checkpoints(max_num_checkpoints=num_to_keep, **kw))
        for ckpt in potential:
            if ckpt not in protected:
                if not self._is_checkpoint_dir(ckpt.path):
                    raise RuntimeError("Checkpoint does not appear valid for deletion.")
                shutil.rmtree(ckpt.path)

    @staticmethod
    def _construct_checkpoint_objects(dirs):
        out = []
        for ckpt_dir in dirs:
            with open(ckpt_dir / "CKPT.yaml", encoding="utf-8") as fi:
                meta = yaml.load(fi, Loader=yaml.Loader)
            paramfiles = {f.stem: f for f in ckpt_dir.iterdir() if f.suffix == ".ckpt"}
            out.append(SBCheckpoint(ckpt_dir, meta, paramfiles))
        return out

    @staticmethod
    def _is_checkpoint_dir(path):
        path = pathlib.Path(path)
        return path.is_dir() and path.name.startswith("CKPT") and (path / "CKPT.yaml").exists()

    def _new_checkpoint_dirpath(self):
        stamp = time.strftime("%Y-%m-%d+%H-%M-%S", time.localtime(time.time()))
        n = 0
        while (self.checkpoints_dir / f"CKPT+{stamp}+{n:02d}").exists():
            n += 1
        return self.checkpoints_dir / f"CKPT+{stamp}+{n:02d}"

    @staticmethod
    def _save_checkpoint_metafile(fpath, meta_to_include, end_of_epoch):
        meta = {"unixtime": time.time(), "end-of-epoch": end_of_epoch}
        meta.update(meta_to_include)
        with open(fpath, "w", encoding="utf-8") as fo:
            fo.write("# yamllint disable\n")
            fo.write(yaml.dump(meta))
        return meta


def sb_recipe(folder, losses, first_epoch_limit, pace, stop_after=None, slow_hook=None):
    """A SpeechBrain recipe's loop (the template's fit loop): a Checkpointer on
    folder with model, optimizer-like state and the epoch counter;
    recover_if_possible(); then per epoch "train" (weights depend on the epoch)
    and save_and_keep_only(meta={"loss", "epoch"}, num_to_keep=2,
    min_keys=["loss"]). pace(epoch) is the pause before each save (the
    training time). Returns (epoch resumed after, model, checkpointer)."""
    model = net(0)
    counter = EpochCounter(first_epoch_limit)
    extra = Module(torch.nn.Linear(4, 2))
    ckpt = Checkpointer(folder, [("model", Module(model)), ("counter", counter), ("extra", extra)],
                        custom_save_hooks={"extra": slow_hook} if slow_hook else None)
    ckpt.recover_if_possible()
    resumed = counter.current
    for epoch in counter:
        trained = net(epoch)
        model.load_state_dict(trained.state_dict())
        extra.module.weight.data.fill_(float(epoch))
        pace(epoch)
        ckpt.save_and_keep_only(meta={"loss": losses[epoch - 1], "epoch": epoch}, num_to_keep=2, min_keys=["loss"])
        if stop_after is not None and epoch == stop_after:
            break
    return resumed, model, ckpt


def slow_torch_save(pause):
    """A custom save hook that takes its time (a large or remote object):
    torch.save after a pause."""
    def hook(obj, path):
        time.sleep(pause)
        obj.save(path)
    return hook


def sb_kept_epochs(folder):
    """What SpeechBrain itself sees in folder: {name: epoch}."""
    return {c.path.name: c.meta["epoch"] for c in Checkpointer(folder, []).list_checkpoints()}


# --- Hugging Face Trainer -------------------------------------------------------

_re_checkpoint = re.compile(r"^checkpoint\-(\d+)$")


def get_last_checkpoint(folder):
    """transformers.trainer_utils.get_last_checkpoint: os.listdir, keep
    checkpoint-N that os.path.isdir, the highest N."""
    content = os.listdir(folder)
    cks = [p for p in content if _re_checkpoint.search(p) is not None and os.path.isdir(os.path.join(folder, p))]
    if not cks:
        return None
    return os.path.join(folder, max(cks, key=lambda x: int(_re_checkpoint.search(x).groups()[0])))


class HFTrainer:
    """transformers.Trainer's checkpointing, the calls it makes:

    _save_checkpoint: output_dir = run_dir/checkpoint-<global_step>; save_model ->
      _save: os.makedirs(output_dir, exist_ok=True), save_pretrained
      (os.makedirs exist_ok, config.json with open("w"), model.safetensors),
      torch.save(args, training_args.bin); _save_optimizer_and_scheduler:
      torch.save optimizer.pt, scheduler.pt; _save_rng_state: os.makedirs
      exist_ok, torch.save rng_state.pth; TrainerState.save_to_json: open("w")
      trainer_state.json; then _rotate_checkpoints(use_mtime=True, run_dir).
    _sorted_checkpoints: Path(run_dir).glob("checkpoint-*") if os.path.isdir,
      by os.path.getmtime; if the newest and oldest mtimes are under 1 s apart,
      by the number in the name instead.
    _rotate_checkpoints: the oldest beyond save_total_limit go with
      shutil.rmtree(checkpoint, ignore_errors=True): errors are swallowed, so
      callers must check the result themselves.
    resume: get_last_checkpoint(run_dir), then _load_from_checkpoint /
      _load_optimizer_and_scheduler / _load_rng_state: os.path.isfile checks and
      loads of each file, TrainerState.load_from_json."""

    def __init__(self, run_dir, save_total_limit, seed=0):
        self.run_dir = run_dir
        self.save_total_limit = save_total_limit
        self.model = net(seed)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=10)
        self.state = {"global_step": 0, "epoch": 0.0, "log_history": [], "best_model_checkpoint": None}

    def train_steps(self, until, save_steps, pace):
        while self.state["global_step"] < until:
            self.state["global_step"] += 1
            step = self.state["global_step"]
            self.optimizer.zero_grad()
            self.model(torch.full((2, 16), float(step))).sum().backward()
            self.optimizer.step()
            self.scheduler.step()
            if step % save_steps == 0:
                self.state["log_history"].append({"step": step, "eval_loss": 1.0 / step})
                pace(step)
                self._save_checkpoint()

    def _save_checkpoint(self):
        output_dir = os.path.join(self.run_dir, f"checkpoint-{self.state['global_step']}")
        os.makedirs(output_dir, exist_ok=True)  # _save
        os.makedirs(output_dir, exist_ok=True)  # save_pretrained
        with open(os.path.join(output_dir, "config.json"), "w", encoding="utf-8") as w:
            w.write(json.dumps({"model_type": "toy", "hidden": 8}, indent=2, sort_keys=True) + "\n")
        tensor_fixtures.save_safetensors({k: v.contiguous() for k, v in self.model.state_dict().items()},
                                         os.path.join(output_dir, "model.safetensors"), {"format": "pt"})
        torch.save({"output_dir": self.run_dir, "save_total_limit": self.save_total_limit},
                   os.path.join(output_dir, "training_args.bin"))
        torch.save(self.optimizer.state_dict(), os.path.join(output_dir, "optimizer.pt"))
        torch.save(self.scheduler.state_dict(), os.path.join(output_dir, "scheduler.pt"))
        os.makedirs(output_dir, exist_ok=True)
        torch.save({"python": random.getstate(), "cpu": torch.random.get_rng_state()},
                   os.path.join(output_dir, "rng_state.pth"))
        with open(os.path.join(output_dir, "trainer_state.json"), "w", encoding="utf-8") as f:
            f.write(json.dumps(self.state, indent=2, sort_keys=True) + "\n")
        self._rotate_checkpoints(use_mtime=True)

    def _sorted_checkpoints(self, use_mtime):
        globbed = [str(x) for x in pathlib.Path(self.run_dir).glob("checkpoint-*") if os.path.isdir(x)]
        order = []
        for path in globbed:
            if use_mtime:
                order.append((os.path.getmtime(path), path))
            else:
                m = re.match(r".*checkpoint-([0-9]+)", path)
                if m is not None:
                    order.append((int(m.groups()[0]), path))
        order = sorted(order)
        if use_mtime and len(order) > 1 and order[-1][0] - order[0][0] < 1.0:
            return self._sorted_checkpoints(use_mtime=False)
        return [p for _, p in order]

    def _rotate_checkpoints(self, use_mtime):
        ordered = self._sorted_checkpoints(use_mtime)
        if len(ordered) <= self.save_total_limit:
            return
        for checkpoint in ordered[:max(0, len(ordered) - self.save_total_limit)]:
            shutil.rmtree(checkpoint, ignore_errors=True)

    def resume(self):
        """Trainer.train(resume_from_checkpoint=get_last_checkpoint(run_dir))."""
        last = get_last_checkpoint(self.run_dir)
        if last is None:
            return None
        with open(os.path.join(last, "trainer_state.json"), encoding="utf-8") as f:
            self.state = json.loads(f.read())
        self.model.load_state_dict(tensor_fixtures.load_safetensors(os.path.join(last, "model.safetensors")))
        if os.path.isfile(os.path.join(last, "optimizer.pt")) and os.path.isfile(os.path.join(last, "scheduler.pt")):
            self.optimizer.load_state_dict(torch.load(os.path.join(last, "optimizer.pt")))
            self.scheduler.load_state_dict(torch.load(os.path.join(last, "scheduler.pt")))
        if os.path.isfile(os.path.join(last, "rng_state.pth")):
            torch.random.set_rng_state(torch.load(os.path.join(last, "rng_state.pth"))["cpu"])
        return last


# --- Lightning ModelCheckpoint ---------------------------------------------------

class ModelCheckpoint:
    """lightning.pytorch.callbacks.ModelCheckpoint(dirpath, filename, monitor,
    mode="min", save_top_k, save_last=True), the calls it makes on
    on_validation_end:

    _save_topk_checkpoint -> check_monitor_top_k -> _update_best_and_save: the
      k-th best is dropped from best_k_models; the name comes from
      _get_metric_interpolated_filepath_name: format_checkpoint_name, and while
      file_exists(name) (fsspec exists: os.stat without following links) and
      name != the one being replaced, "<name>-v<N>" from v1; then
      _save_checkpoint; then _remove_checkpoint(the dropped one).
    _save_last_checkpoint: "last.ckpt", with the same version counter while it
      exists and is not last_model_path; _save_checkpoint; remove the previous
      last if it differs.
    _save_checkpoint -> TorchCheckpointIO.save_checkpoint: fs.makedirs(dirname,
      exist_ok=True) then cloud_io._atomic_save: inside fs.transaction,
      fs.open(path, "wb") is a LocalFileOpener that writes a tempfile.mkstemp()
      file (in the temp dir, another file system than the mount), torch.save
      into it, and on commit shutil.move(temp, path): rename fails EXDEV, so
      copy2 (open(path, O_WRONLY|O_CREAT|O_TRUNC), copy, copystat) and unlink
      the temp. An existing last.ckpt is thus truncated and rewritten in place.
    _remove_checkpoint -> TorchCheckpointIO.remove_checkpoint: fs.exists(path),
      fs.rm(path, recursive=True): isdir -> os.remove(path).
    _find_last_checkpoints: fs.exists(dirpath), fs.ls(dirpath) (os.listdir),
      names whose stem matches ^last(-(\\d+))? with suffix .ckpt."""

    def __init__(self, dirpath, filename="{epoch}-{val_loss:.2f}", monitor="val_loss", save_top_k=2, size=1000,
                 written=None):
        self.dirpath, self.filename, self.monitor, self.save_top_k = dirpath, filename, monitor, save_top_k
        self.written = written  # a set that collects the sha256 of every file written, if given
        self.best_k_models, self.kth_best_model_path, self.kth_value = {}, "", None
        self.best_model_path, self.last_model_path = "", ""
        self.size = size

    def format_checkpoint_name(self, metrics, filename=None, ver=None):
        filename = filename or self.filename
        for group in sorted(re.findall(r"(\{.*?)[:\}]", filename), key=len, reverse=True):
            name = group[1:]
            filename = filename.replace(group, name + "=" + "{" + name)
            filename = filename.replace(group, "{0[" + name + "]")
        filename = filename.format(metrics)
        if ver is not None:
            filename = "-".join((filename, f"v{ver}"))
        return os.path.join(self.dirpath, filename + ".ckpt")

    def file_exists(self, path):
        try:
            os.stat(path, follow_symlinks=False)
            return True
        except OSError:
            return False

    def on_validation_end(self, epoch, step, val_loss):
        metrics = {"epoch": epoch, "step": step, self.monitor: val_loss}
        if len(self.best_k_models) < self.save_top_k or val_loss < self.best_k_models[self.kth_best_model_path]:
            self._update_best_and_save(val_loss, metrics)
        self._save_last_checkpoint(metrics)

    def _update_best_and_save(self, current, metrics):
        del_filepath = None
        if len(self.best_k_models) == self.save_top_k:
            del_filepath = self.kth_best_model_path
            self.best_k_models.pop(del_filepath)
        filepath = self.format_checkpoint_name(metrics)
        ver = 1
        while self.file_exists(filepath) and filepath != del_filepath:
            filepath = self.format_checkpoint_name(metrics, ver=ver)
            ver += 1
        self.best_k_models[filepath] = current
        if len(self.best_k_models) == self.save_top_k:
            self.kth_best_model_path = max(self.best_k_models, key=self.best_k_models.get)
            self.kth_value = self.best_k_models[self.kth_best_model_path]
        self.best_model_path = min(self.best_k_models, key=self.best_k_models.get)
        self._save_checkpoint(filepath, metrics)
        if del_filepath and del_filepath != filepath:
            self._remove_checkpoint(del_filepath)

    def _save_last_checkpoint(self, metrics):
        filepath = self.format_checkpoint_name(metrics, "last")
        ver = 1
        while self.file_exists(filepath) and filepath != self.last_model_path:
            filepath = self.format_checkpoint_name(metrics, "last", ver=ver)
            ver += 1
        previous, self.last_model_path = self.last_model_path, filepath
        self._save_checkpoint(filepath, metrics)
        if previous and previous != filepath:
            self._remove_checkpoint(previous)

    def checkpoint(self, metrics):
        """Trainer.dump_checkpoint, small: epoch, step, weights, callback state."""
        return {"epoch": metrics["epoch"], "global_step": metrics["step"],
                "state_dict": {"w": lightning_weights(metrics["epoch"], self.size), "b": torch.full((4,), float(metrics["epoch"]))},
                "callbacks": {"ModelCheckpoint": {"best_model_path": self.best_model_path,
                                                  "last_model_path": self.last_model_path,
                                                  "best_k_models": dict(self.best_k_models),
                                                  "dirpath": self.dirpath}}}

    def _save_checkpoint(self, filepath, metrics):
        os.makedirs(os.path.dirname(filepath), exist_ok=True)
        atomic_save(self.checkpoint(metrics), filepath, self.written)

    def _remove_checkpoint(self, filepath):
        if self.file_exists(filepath):
            if os.path.isdir(filepath):
                shutil.rmtree(filepath)
            else:
                os.remove(filepath)

    def find_last_checkpoints(self):
        if not self.file_exists(self.dirpath):
            return set()
        return {os.path.normpath(os.path.join(self.dirpath, p)) for p in os.listdir(self.dirpath)
                if p.endswith(".ckpt") and re.match(r"^last(-(\d+))?", p[:-len(".ckpt")])}


def lightning_weights(epoch, size):
    """The weights of an epoch, from a generator of its own (readers on other
    threads check them without touching the global RNG)."""
    return torch.randn(size, generator=torch.Generator().manual_seed(epoch))


def atomic_save(obj, filepath, written=None):
    """cloud_io._atomic_save on a local path, through fsspec's transaction:
    torch.save into a tempfile.mkstemp() file, then shutil.move onto filepath.
    written (a set), if given, gets the sha256 of the bytes before the move."""
    fd, temp = tempfile.mkstemp()
    os.close(fd)
    try:
        with open(temp, "wb") as f:
            torch.save(obj, f)
        if written is not None:
            with open(temp, "rb") as f:
                written.add(hashlib.sha256(f.read()).hexdigest())
        shutil.move(temp, filepath)
    finally:
        if os.path.exists(temp):
            os.remove(temp)
