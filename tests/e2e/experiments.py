"""Builds sample experiments with real torch.save files (Debian python3-torch).

Used by the end-to-end tests and by the demo. Every checkpoint holds a real
model state_dict; meta files are written as each framework writes them.
"""
import json
import os
import time

import torch


def _model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))


def _yaml(meta):
    lines = ["# yamllint disable"]
    for k, v in meta.items():
        if isinstance(v, bool):
            v = "true" if v else "false"
        lines.append(f"{k}: {v}")
    return "\n".join(lines) + "\n"


def speechbrain(root, runs):
    """runs: list of (ckpt name suffix, meta dict). Writes CKPT+<suffix>/ with
    CKPT.yaml (meta first, as SpeechBrain's Checkpointer does) and mdl.ckpt."""
    os.makedirs(root, exist_ok=True)
    paths = []
    for i, (suffix, meta) in enumerate(runs):
        d = os.path.join(root, "CKPT+" + suffix)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "CKPT.yaml"), "w") as f:
            f.write(meta if isinstance(meta, str) else _yaml(meta))
        torch.save(_model(i).state_dict(), os.path.join(d, "mdl.ckpt"))
        torch.save({"step": i}, os.path.join(d, "counter.ckpt"))
        paths.append(d)
    return paths


def huggingface(root, steps_and_losses):
    """checkpoint-N/ with trainer_state.json and pytorch_model.bin."""
    os.makedirs(root, exist_ok=True)
    history = []
    for i, (step, eval_loss) in enumerate(steps_and_losses):
        d = os.path.join(root, f"checkpoint-{step}")
        os.makedirs(d, exist_ok=True)
        history.append({"epoch": step / 100, "loss": 0.1, "step": step})
        history.append({"epoch": step / 100, "eval_loss": eval_loss, "step": step})
        state = {"global_step": step, "epoch": step / 100, "log_history": list(history)}
        with open(os.path.join(d, "trainer_state.json"), "w") as f:
            json.dump(state, f, indent=2)
        torch.save(_model(100 + i).state_dict(), os.path.join(d, "pytorch_model.bin"))
        # Recency comes from mtimes here: space them out explicitly.
        t = 1_700_000_000 + step
        for name in os.listdir(d):
            os.utime(os.path.join(d, name), (t, t))


def demo(root):
    """A SpeechBrain-style experiment of five epochs, one with a broken CKPT.yaml."""
    base = 1_700_000_000
    runs = []
    losses = [0.92, 0.61, 0.38, 0.33, 0.45]
    for epoch, loss in enumerate(losses, start=1):
        runs.append((f"2024-01-0{epoch}+12-00-00+00",
                     {"end-of-epoch": True, "epoch": epoch, "loss": loss,
                      "validation-type": "full" if epoch % 2 else "quick",
                      "unixtime": base + epoch * 3600}))
    runs.append(("2024-01-06+12-00-00+00", "loss: 0.1\n\n@ not yaml {"))
    speechbrain(root, runs)


if __name__ == "__main__":
    import sys
    demo(sys.argv[1])
