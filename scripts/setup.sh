#!/usr/bin/env bash
# Installs every Debian package ckptfs needs to build, test and run.
# Idempotent: does nothing when all are present.
set -euo pipefail

PACKAGES=(
  cmake g++ make pkg-config
  libfuse3-dev fuse3 libsystemd-dev systemd mount
  libsqlite3-dev nlohmann-json3-dev libyaml-cpp-dev libgtest-dev
  libtorch-dev python3-torch python3-yaml python3-numpy
  clang libclang-rt-14-dev zlib1g-dev libisal-dev util-linux
)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]} == 0)); then
  echo "setup: all ${#PACKAGES[@]} packages present"
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
echo "setup: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
