#!/usr/bin/env bash
# The ckptfs demo: sets up, builds, creates a sample SpeechBrain experiment of
# real torch.save checkpoints, mounts it, and shows what best/min/loss and
# latest are, then loads best/min/loss/mdl.ckpt with torch.load.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/build.sh >/dev/null
CKPTFS="$PWD/build/fs/ckptfs"

work=$(mktemp -d /tmp/ckptfs-demo-XXXXXX)
src="$work/experiments"
mnt="$work/mnt"
mkdir -p "$mnt"
cleanup() {
  fusermount3 -u "$mnt" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

/usr/bin/python3 tests/e2e/experiments.py "$src/asr"
echo "== the source: a SpeechBrain experiment, one CKPT.yaml is broken"
"$CKPTFS" ls --index "$work/index.sqlite" "$src"

"$CKPTFS" mount --index "$work/index.sqlite" "$src" "$mnt"
echo
echo "== mounted at $mnt"
echo "\$ ls $mnt/asr"
ls "$mnt/asr"
echo "\$ ls $mnt/asr/best/min/loss"
ls "$mnt/asr/best/min/loss"
which() { /usr/bin/python3 -c 'import os,sys; print(os.getxattr(sys.argv[1], "user.ckptfs.checkpoint").decode())' "$mnt/asr/$1"; }
echo "best/min/loss                            -> $(which best/min/loss)"
echo "latest                                   -> $(which latest)"
echo "where/validation-type=full/best/min/loss -> $(which where/validation-type=full/best/min/loss)"
echo "\$ cat $mnt/asr/best/min/loss/CKPT.yaml"
cat "$mnt/asr/best/min/loss/CKPT.yaml"
echo
echo "\$ python3 -c 'torch.load(\"$mnt/asr/best/min/loss/mdl.ckpt\")'"
/usr/bin/python3 - "$mnt/asr/best/min/loss/mdl.ckpt" <<'PY'
import sys, torch
sd = torch.load(sys.argv[1])
print(f"{type(sd).__name__} with {len(sd)} tensors: " + ", ".join(f"{k}{tuple(v.shape)}" for k, v in sd.items()))
PY
echo
echo "\$ ckptfs status $mnt"
"$CKPTFS" status "$mnt"
