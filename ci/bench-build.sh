#!/usr/bin/env bash
# Build-time benchmark: prints figures, asserts nothing.
#   cold   — empty tree cache (packages already downloaded): `--fresh`
#   warm   — same inputs again, after changing one overlay file
#   noop   — `--reuse` with unchanged inputs
# and the image and root partition sizes. Run as root; repeat with RUNS=N
# and quote the median (these machines are noisy).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
runs=${RUNS:-1}
out=$(mktemp -d /var/tmp/airlock-bench.XXXXXX)
trap 'rm -rf "$out"; rm -f overlay/etc/airlock-bench-marker' EXIT
cargo build --release --locked -p airlock >/dev/null 2>&1
airlock=target/release/airlock
secs() { local s=$(date +%s.%N); "$@" >/dev/null; awk -v a="$s" -v b="$(date +%s.%N)" "BEGIN{printf \"%.1f\", b-a}"; }
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
cold=(); warm=(); noop=()
for i in $(seq "$runs"); do
  cold+=("$(secs $airlock build --manifest examples/debian.toml --output "$out" --fresh)")
  echo "bench $i $(date +%s%N)" > overlay/etc/airlock-bench-marker
  warm+=("$(secs $airlock build --manifest examples/debian.toml --output "$out")")
  noop+=("$(secs $airlock build --manifest examples/debian.toml --output "$out" --reuse)")
done
report=$out/airlock_1.0.report.json
image_bytes=$(stat -c %s "$out/airlock_1.0.raw")
image_alloc=$(du -B1 "$out/airlock_1.0.raw" | cut -f1)
printf 'cold build (fresh bootstrap, cached packages): median %.1f s over %d run(s): %s\n' "$(printf '%s\n' "${cold[@]}" | median)" "$runs" "${cold[*]}"
printf 'warm rebuild (one overlay file changed):      median %.1f s: %s\n' "$(printf '%s\n' "${warm[@]}" | median)" "${warm[*]}"
printf 'no-op (--reuse, inputs unchanged):            median %.2f s: %s\n' "$(printf '%s\n' "${noop[@]}" | median)" "${noop[*]}"
printf 'image: %d MiB apparent, %d MiB allocated\n' $((image_bytes/1048576)) $((image_alloc/1048576))
python3 - "$report" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"root filesystem (erofs, lz4): {r['root_fs_bytes']/1048576:.0f} MiB, verity {r['root_verity_bytes']/1048576:.1f} MiB, {len(r['packages'])} packages")
print("last warm build stages: " + ", ".join(f"{s['stage']} {s['seconds']:.1f}s" for s in r["stages"]))
PY
