#!/usr/bin/env bash
# Fuzzes every parser and untrusted-input path of ckptfs.
#
# Builds the libFuzzer targets (tests/fuzz/*_fuzzer.cc) with clang, ASan and
# UBSan into build-fuzz/, then for each target:
#  1. replays its seeds once (libFuzzer given the files as arguments runs each
#     exactly once): every real file and every committed crash input must
#     pass, whatever the fuzzing below happens to find;
#  2. fuzzes it for SECONDS (default 20) from those seeds, with
#     tests/fuzz/<target>.dict when there is one.
# Seeds: tests/fuzz/corpus/<target>/ (attack inputs and past crashes) plus
# real files: tests/fixtures/tensors/* (torch.save outputs, safetensors) and
# tests/fixtures/wild/** (real trainer_state.json and CKPT.yaml). The lists
# mirror tests/fuzz/CMakeLists.txt. A crash fails the script; its input is
# left in build-fuzz/crashes/<target>/: fix the bug and commit the input to
# tests/fuzz/corpus/<target>/.
#
# Which compiler. What ships is g++ RelWithDebInfo; libFuzzer needs clang's
# coverage instrumentation, so inputs are found with clang. Clang's code is
# not g++'s: stack frames, inlining and what the optimiser makes of UB
# differ, and a deep recursion once overflowed the stack only in g++'s
# build. So a clang fuzz build alone does not cover the shipped code: every
# harness is also linked, by g++ in the normal build, with a plain driver
# (tests/fuzz/replay_main.cc), and the unit tests fuzz_corpus_replay_<target>
# run every seed and committed crash input through it, in every CI run
# (scripts/test.sh, and under ASan+UBSan in scripts/sanitize.sh). Fuzzing
# finds; the shipping compiler re-checks what was found, for good.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-20}"
targets=(pickle safetensors query_path meta zip average scanner)

# The seed directories of a target (missing ones are skipped).
seeds_of() {
  local c=tests/fuzz/corpus f=tests/fixtures
  case "$1" in
    pickle) echo "$c/pickle $f/tensors" ;;
    safetensors) echo "$c/safetensors $f/tensors" ;;
    query_path) echo "$c/query_path" ;;
    meta) echo "$c/meta $f/wild" ;;
    zip) echo "$c/zip $f/tensors" ;;
    average) echo "$c/average $c/zip $c/safetensors $f/tensors" ;;
    scanner) echo "$c/scanner $c/meta $f/wild" ;;
  esac
}

# The target's own dictionary, else the one of the format it reads.
dict_of() {
  local d
  for d in "$1" "$(case "$1" in scanner) echo meta ;; zip) echo pickle ;; esac)"; do
    if [ -n "$d" ] && [ -f "tests/fuzz/$d.dict" ]; then
      echo "-dict=tests/fuzz/$d.dict"
      return
    fi
  done
}

launcher=()
if command -v ccache >/dev/null; then launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache); fi
CXX=clang++ CC=clang cmake -S . -B build-fuzz -DCKPTFS_FUZZ=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  "${launcher[@]}" >/dev/null
cmake --build build-fuzz -j"$(nproc)"

rm -rf build-fuzz/corpus build-fuzz/crashes build-fuzz/logs
mkdir -p build-fuzz/logs
status=0
for target in "${targets[@]}"; do
  corpus="build-fuzz/corpus/$target"
  mkdir -p "$corpus" "build-fuzz/crashes/$target"
  seeds=()
  for dir in $(seeds_of "$target"); do
    [ -d "$dir" ] || continue
    while IFS= read -r -d '' file; do
      seeds+=("$file")
      # Flattened, named after the path: checkpoint-1000/trainer_state.json
      # and checkpoint-2000/trainer_state.json stay apart.
      cp "$file" "$corpus/$(echo "${file#tests/}" | tr '/' '_')"
    done < <(find "$dir" -type f -print0 | sort -z)
  done
  if ((${#seeds[@]} == 0)); then  # libFuzzer without inputs would fuzz forever
    echo "fuzz: $target: no seeds in $(seeds_of "$target")"
    status=1
    continue
  fi
  bin="build-fuzz/tests/fuzz/${target}_fuzzer"
  log="build-fuzz/logs/$target.log"
  common=(-artifact_prefix="build-fuzz/crashes/$target/" -print_final_stats=0)
  echo "fuzz: $target: replaying ${#seeds[@]} seeds"
  if ! "$bin" "${common[@]}" "${seeds[@]}" >"$log" 2>&1; then
    echo "fuzz: $target: a seed fails (log $log):"
    tail -n 60 "$log"
    status=1
    continue
  fi
  echo "fuzz: $target for ${seconds}s $(dict_of "$target")"
  # shellcheck disable=SC2046  # the dictionary option is one word or none
  if ! "$bin" "${common[@]}" -max_total_time="$seconds" -max_len=65536 -timeout=60 \
      $(dict_of "$target") "$corpus" >"$log" 2>&1; then
    echo "fuzz: $target: crash (log $log, input in build-fuzz/crashes/$target/):"
    tail -n 60 "$log"
    status=1
    continue
  fi
  tail -n 1 "$log"
done
if [ "$status" -ne 0 ]; then
  echo "fuzz: FAILED"
  exit 1
fi
echo "fuzz: no crash"
