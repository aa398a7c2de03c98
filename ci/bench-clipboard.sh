#!/usr/bin/env bash
# Clipboard gateway benchmark: latency from a grab in the general guest to
# the sanitised data in the classified guest (median, p99) for 1 KiB text,
# 1 MiB text and a 4-megapixel image, plus the gateway's and sanitiser's
# peak RSS. Release build, fake agents on unix sockets. Prints figures;
# fails only if the gateway does. An optional argument multiplies the runs.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
export CARGO_TERM_COLOR=never
echo "bench-clipboard: building (release)"
cargo bench --locked -p airlock-gateway --bench clipboard --no-run 2>&1 | tail -n 1
echo "bench-clipboard: running on $(nproc) CPUs"
cargo bench --locked -p airlock-gateway --bench clipboard -- "${1:-1}" 2>/dev/null
