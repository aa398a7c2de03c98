#!/usr/bin/env bash
# Fuzzes each cargo-fuzz target (vdagent codec, clipboard sanitiser) for a
# bounded time and fails on any crash, panic, leak or timeout.
#
#   FUZZ_SECONDS   seconds per target (default 60)
#
# Installs cargo-fuzz if missing; needs the nightly toolchain. The corpora
# in the repository are seeds only: new inputs go to a temporary directory,
# so a run never grows the repository. A crashing input is kept under
# <fuzz dir>/artifacts/<target>/ and its path is printed. Plain lines, no TTY.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
export CARGO_TERM_COLOR=never
seconds=${FUZZ_SECONDS:-60}
# The instrumented builds are slow (minutes for the image decoders), and a
# CI run starts from a clean clone: keep them between runs.
export CARGO_TARGET_DIR=${FUZZ_TARGET_DIR:-/var/cache/airlock/fuzz-target}

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz"
  cargo install --locked cargo-fuzz
fi
if ! cargo +nightly --version >/dev/null 2>&1; then
  echo "fuzz: the nightly toolchain is missing (rustup toolchain install nightly)" >&2
  exit 1
fi

# "<fuzz crate dir> <target>"
targets=(
  "appliance-daemon/vdagent/fuzz decode"
  "appliance-daemon/gateway/fuzz sanitise"
)

failed=()
for entry in "${targets[@]}"; do
  dir=${entry% *}
  target=${entry#* }
  work=$(mktemp -d)
  log=$(mktemp)
  echo "fuzz: $target: building ($dir)"
  (cd "$dir" && cargo +nightly fuzz build "$target" 2>&1 | tail -n 3)
  echo "fuzz: $target: running ${seconds}s from corpus/$target"
  start=$(date +%s)
  set +e
  (cd "$dir" && cargo +nightly fuzz run "$target" "$work" "corpus/$target" -- \
      -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1) >"$log" 2>&1
  rc=$?
  set -e
  grep -E '^#[0-9]+ *(pulse|DONE)|^Done|stat::number_of_executed_units|stat::peak_rss_mb' "$log" | sed "s/^/fuzz: $target: /" || true
  if [ "$rc" -ne 0 ]; then
    echo "fuzz: $target: FAILED (exit $rc) after $(( $(date +%s) - start ))s; log tail:"
    tail -n 40 "$log" | sed "s/^/fuzz: $target: | /"
    failed+=("$target")
  else
    echo "fuzz: $target: ok after $(( $(date +%s) - start ))s, $(ls "$work" | wc -l) new corpus entries (not kept)"
  fi
  rm -rf "$work" "$log"
done

if [ "${#failed[@]}" -ne 0 ]; then
  echo "fuzz: FAILED: ${failed[*]}"
  exit 1
fi
echo "fuzz: all targets passed"
