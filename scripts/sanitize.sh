#!/usr/bin/env bash
# Builds ckptfs with AddressSanitizer and UndefinedBehaviorSanitizer into
# build-asan/ with the shipping compiler (g++, RelWithDebInfo) and runs the
# unit and end-to-end tests on it; extra arguments go to ctest.
#
# Every sanitized process (the ckptfs daemon and CLI the e2e tests start,
# the gtest binaries, the fuzz_corpus_replay_* drivers) writes its reports
# to build-asan/sanitizer-reports/ rather than stderr, then exits 1. Both
# count: a daemon that dies fails its test (mount_util.mounted asserts exit
# 0 after unmount), and any report file at all fails this script, which
# prints them. The files catch what exit codes cannot: a CLI run a test
# expects to fail, a daemon that mount(8) detached from the test's stderr.
#
# The ckptfs binary has the ASan runtime linked in (averaging included);
# libfuse and SQLite are not instrumented, so overflows inside them go unseen, but every
# call from our code into them is checked on our side.
set -euo pipefail
cd "$(dirname "$0")/.."
build=build-asan
reports="$PWD/$build/sanitizer-reports"

launcher=()
if command -v ccache >/dev/null; then launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache); fi
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCKPTFS_SANITIZE=address,undefined \
  -DCKPTFS_WERROR=ON -DCKPTFS_BUILD_BENCH=OFF "${launcher[@]}" >/dev/null
cmake --build "$build" -j"$(nproc)"

rm -rf "$reports" && mkdir -p "$reports"
# halt_on_error/abort_on_error=0: the first report ends the process with
# exit code 1 (not a core dump). Leaks are checked in every process, the
# daemon included: the daemon and CLI with libtorch and libfuse loaded ran
# clean, so nothing is turned off. Should a third-party library's leak ever
# show up, it is suppressed by library in scripts/lsan.supp (one exception
# of ours, explained there: handles still open when a stop ends the session).
export ASAN_OPTIONS="halt_on_error=1:abort_on_error=0:exitcode=1:detect_leaks=1:\
check_initialization_order=1:strict_string_checks=1:detect_stack_use_after_return=1:\
print_stacktrace=1:log_path=$reports/asan"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:log_path=$reports/ubsan"
export LSAN_OPTIONS="suppressions=$PWD/scripts/lsan.supp:print_suppressions=0"

rc=0
(cd "$build" && ctest --output-on-failure --timeout 900 -L 'unit|e2e' "$@") || rc=$?
if compgen -G "$reports/*" >/dev/null; then
  echo "sanitize: sanitizer reports:"
  for f in "$reports"/*; do
    echo "== $f"
    cat "$f"
  done
  rc=1
fi
if [ "$rc" -ne 0 ]; then
  echo "sanitize: FAILED"
  exit "$rc"
fi
echo "sanitize: no sanitizer report"
