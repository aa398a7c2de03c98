#!/usr/bin/env bash
# Every test: unit and integration tests of the workspace, then the QEMU
# acceptance suite (builds the images, boots them). Run as root on Debian 12.
# Prints one line per stage with its duration.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
export CARGO_TERM_COLOR=never

suite_start=$(date +%s)
timings=()
stage() {
  local name=$1; shift
  local start=$(date +%s)
  echo "== stage $name: $*"
  "$@"
  local took=$(( $(date +%s) - start ))
  timings+=("$name ${took}s")
  echo "== stage $name: done in ${took}s"
}

stage host-deps ci/install-host-deps.sh
stage build cargo build --release --locked --workspace --all-targets
# The production image first (the README's main job): besides proving the
# build, it leaves the image tree in the cache, whose trixie kernel (virtio
# console built in) the host tests' tiny guests boot (ci/test-guest).
stage image ci/build-image.sh target/ci-image
stage unit+integration cargo test --release --locked --workspace
# Tests that need root and loop devices (CI runs as root): the update agent
# writing real block devices.
stage root-only cargo test --release --locked -p airlock-update -- --ignored
stage fuzz env FUZZ_SECONDS="${FUZZ_SECONDS:-60}" ci/fuzz.sh
stage acceptance cargo xtask acceptance --cache-dir "${AIRLOCK_CACHE_DIR:-/var/cache/airlock}"

echo "== all stages passed in $(( $(date +%s) - suite_start ))s: ${timings[*]}"
