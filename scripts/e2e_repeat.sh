#!/usr/bin/env bash
# Runs the end-to-end tests N times in a row (default 20) to shake out races:
# a test that passes once but fails one run in ten is a bug, not bad luck.
# Stops at the first failing run, keeps its output and names the failed
# tests; prints a summary either way. Exit status: 0 when every run passed.
#
#   scripts/e2e_repeat.sh [N] [REGEX]   REGEX: only tests matching it (ctest -R),
#                                       e.g. scripts/e2e_repeat.sh 10 e2e_write
# Builds build/ first if the ckptfs binary is missing (scripts/build.sh), and
# otherwise brings what the e2e tests run up to date: the ckptfs binary.
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-20}"
regex="${2:-}"
if ! [[ "$runs" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 [N] [REGEX]  (N: a positive number of runs, default 20)" >&2
  exit 2
fi
if [[ ! -x build/fs/ckptfs ]]; then
  bash scripts/build.sh -DCKPTFS_WERROR=ON
else
  cmake --build build -j"$(nproc)" --target ckptfs >/dev/null
fi
selector=(-L e2e)
[[ -n "$regex" ]] && selector+=(-R "$regex")
logs="$(mktemp -d "${TMPDIR:-/tmp}/ckptfs-e2e-repeat-XXXXXX")"
start=$SECONDS
passed=0
for ((i = 1; i <= runs; i++)); do
  log="$logs/run-$i.log"
  run_start=$SECONDS
  if (cd build && ctest "${selector[@]}" --output-on-failure --timeout 900) >"$log" 2>&1; then
    passed=$((passed + 1))
    echo "run $i/$runs: passed ($((SECONDS - run_start)) s)"
    rm -f "$log"
  else
    echo "run $i/$runs: FAILED ($((SECONDS - run_start)) s); output: $log"
    grep -E '^[[:space:]]*[0-9]+ - |^(FAIL|ERROR):' "$log" | sed 's/^/  /' || true
    echo "summary: $passed of $i runs passed before the first failure (run $i)," \
      "$((SECONDS - start)) s; ctest ${selector[*]}"
    exit 1
  fi
done
rmdir "$logs" 2>/dev/null || true
echo "summary: $passed of $runs runs passed, $((SECONDS - start)) s; ctest ${selector[*]}"
