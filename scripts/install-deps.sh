#!/usr/bin/env bash
# Installs every Debian 12 package fleeced needs to build, test, demo and benchmark.
# Idempotent; run as root (or with sudo available).
set -euo pipefail
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi
packages=(
  # build
  build-essential cmake ninja-build ccache pkg-config clang clang-format
  libboost1.81-dev libboost-json1.81-dev libssl-dev libspdlog-dev libfmt-dev
  libgtest-dev libgmock-dev libnbd-dev libxxhash-dev
  # real clients and peers used by tests, demo and benchmarks
  libnbd-bin python3 python3-libnbd nbdkit qemu-utils qemu-system-common fio
  gnutls-bin openssl jq util-linux procps coreutils
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -q
  $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
