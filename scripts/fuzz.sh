#!/usr/bin/env bash
# Builds the libFuzzer targets with clang and runs each for SECONDS (default
# 20) on a seed corpus of real inputs. A crash fails the script and leaves the
# reproducer in build-fuzz/.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-20}"
CXX=clang++ CC=clang cmake -S . -B build-fuzz -DCKPTFS_FUZZ=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build-fuzz -j"$(nproc)"
corpus=build-fuzz/corpus
rm -rf "$corpus" && mkdir -p "$corpus"/{pickle,safetensors,query_path,meta}
cp tests/fixtures/tensors/*.data.pkl "$corpus/pickle/"
tail -c +9 tests/fixtures/tensors/small.safetensors | head -c "$(od -An -tu8 -N8 tests/fixtures/tensors/small.safetensors | tr -d ' ')" > "$corpus/safetensors/small.json"
printf '/where/a=1/best/min/loss/mdl.ckpt' > "$corpus/query_path/1"
printf '/top/3/max/acc/2' > "$corpus/query_path/2"
printf '/avg/best3/min/loss/m.pt' > "$corpus/query_path/3"
cp tests/fixtures/wild/speechbrain-meta/*.yaml "$corpus/meta/" 2>/dev/null || true
cp tests/fixtures/wild/hf-whisper-ja/checkpoint-1000/trainer_state.json "$corpus/meta/" 2>/dev/null || true
for target in pickle safetensors query_path meta; do
  echo "fuzz: $target for ${seconds}s"
  (cd build-fuzz && "./tests/fuzz/${target}_fuzzer" -max_total_time="$seconds" -max_len=65536 \
     -print_final_stats=0 "corpus/$target" 2>&1 | tail -n 2)
done
echo "fuzz: no crash"
