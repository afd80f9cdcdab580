#!/usr/bin/env bash
# Sets up, builds and runs the whole test suite: unit tests (GoogleTest) and
# end-to-end tests (real FUSE mounts, real torch.save / torch.load).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/build.sh -DCKPTFS_WERROR=ON
cd build
ctest --output-on-failure --timeout 900 "$@"
