#!/usr/bin/env bash
# The main job: on a fresh Debian machine, install the host tools and build
# examples/debian.toml into an appliance image.
#   usage: ci/build-image.sh [OUTPUT_DIR] [extra `airlock build` options]
set -euo pipefail
cd "$(dirname "$0")/.."
output=${1:-out}
shift || true
export PATH="$HOME/.cargo/bin:$PATH"
ci/install-host-deps.sh
cargo build --release --locked -p airlock
exec target/release/airlock build --manifest examples/debian.toml --output "$output" "$@"
