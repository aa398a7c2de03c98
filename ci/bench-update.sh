#!/usr/bin/env bash
# Update benchmark, on this host (no emulator): the update agent applies a
# full signed bundle onto a copy of the test image's disk (verify, write
# slot B while hashing, read it back, install the UKI on an ESP directory),
# and verifies the bundle alone (`airlock-update check`: signatures and
# every payload byte, nothing written); then the update server's path: the
# same apply with the bundle fetched from a local HTTP server (python3's
# http.server on 127.0.0.1: download, then the same work), and the periodic
# check when the server offers the version that runs already (the header
# only). N runs each (default 3); prints each run, the medians, the
# throughputs, the ratio URL / file, and bundle size / image size.
#
# Uses what `cargo xtask acceptance` (its update: group) leaves in
# target/acceptance: the test image (slot A), the next version's bundle
# signed by the suite's key, and that key's allowed_signers file. Asserts
# nothing but that the agent succeeds.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
export CARGO_TERM_COLOR=never
runs=${1:-3}
acc=target/acceptance
image=$acc/images/test/airlock_1.0.raw
report=$acc/images/test/airlock_1.0.report.json
keys=$acc/update-key/allowed_signers
bundle=$(ls "$acc"/update/*.airlock 2>/dev/null | grep -v -e /flipped -e /untrusted | head -n 1 || true)
for f in "$image" "$report" "$keys" "$bundle"; do
    if [ -z "$f" ] || [ ! -f "$f" ]; then
        echo "bench-update: ${f:-the signed next-version bundle} is missing: run 'cargo xtask acceptance --filter update:' first" >&2
        exit 1
    fi
done

echo "bench-update: building airlock-update (release)"
cargo build --release --locked -q -p airlock-update
agent=target/release/airlock-update

work=$(mktemp -d /var/tmp/airlock-bench-update-XXXXXX)
trap 'rm -rf "$work"' EXIT
# The running system the agent sees: the test image's version and root hash.
read -r name version compatible epoch root_hash < <(python3 -c '
import json, sys
r = json.load(open(sys.argv[1]))
print(r["name"], r["version"], r["compatible"], r["security_epoch"], r["root_hash"])' "$report")
printf 'IMAGE_ID=%s\nIMAGE_VERSION=%s\nAIRLOCK_COMPATIBLE=%s\nAIRLOCK_SECURITY_EPOCH=%s\n' "$name" "$version" "$compatible" "$epoch" > "$work/os-release"
echo "initrd=x roothash=$root_hash ro" > "$work/cmdline"

image_bytes=$(stat -c %s "$image")
bundle_bytes=$(stat -c %s "$bundle")
echo "bench-update: $bundle ($((bundle_bytes >> 20)) MiB) onto a copy of $image ($((image_bytes >> 20)) MiB), running $name $version; $(nproc) CPUs, $runs runs"

now() { date +%s.%N; }
calc() { awk "BEGIN {print $1}"; }
median() { sort -n | awk '{v[NR] = $1} END {print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }
agent_on() { "$agent" --allowed-signers "$keys" --threshold 1 --disk "$work/disk.raw" --esp "$work/esp" \
    --state-dir "$work/state" --os-release "$work/os-release" --cmdline "$work/cmdline" "$@"; }

# The update server: a local web server over a directory with the bundle.
mkdir -p "$work/www/airlock"
ln -s "$(realpath "$bundle")" "$work/www/airlock/current.airlock"
port=18080
python3 -m http.server --bind 127.0.0.1 --directory "$work/www" "$port" > "$work/http.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 50); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    sleep 0.1
done
url="http://127.0.0.1:$port/airlock/current.airlock"
# What the next version's PC sees (for "running already").
next_report=$(ls "$acc"/images/test-*/"${name}"_*.report.json 2>/dev/null | head -n 1 || true)

fresh_machine() {
    rm -rf "$work/disk.raw" "$work/esp" "$work/state"
    cp --sparse=always "$image" "$work/disk.raw"
    mkdir -p "$work/esp/EFI/Linux"
    echo "slot A's UKI" > "$work/esp/EFI/Linux/${name}_${version}.efi"
    sync
    echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
}

: > "$work/apply.txt"
: > "$work/check.txt"
: > "$work/url.txt"
: > "$work/header.txt"
for run in $(seq 1 "$runs"); do
    # A fresh machine each run: the image as flashed, an ESP with slot A's entry.
    fresh_machine
    start=$(now)
    agent_on check "$bundle" > "$work/check.log" 2>&1 || { cat "$work/check.log" >&2; exit 1; }
    check=$(calc "$(now) - $start")
    echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
    start=$(now)
    agent_on apply --file "$bundle" > "$work/apply.log" 2>&1 || { cat "$work/apply.log" >&2; exit 1; }
    apply=$(calc "$(now) - $start")
    echo "$check" >> "$work/check.txt"
    echo "$apply" >> "$work/apply.txt"
    printf 'bench-update: run %d: verification alone %.1f s, apply %.1f s (%s)\n' "$run" "$check" "$apply" "$(tail -n 1 "$work/apply.log")"
    fresh_machine
    start=$(now)
    agent_on apply --url "$url" > "$work/url.log" 2>&1 || { cat "$work/url.log" >&2; exit 1; }
    fetched=$(calc "$(now) - $start")
    echo "$fetched" >> "$work/url.txt"
    printf 'bench-update: run %d: apply from the update server %.1f s (%s)\n' "$run" "$fetched" "$(tail -n 1 "$work/url.log")"
    if [ -n "$next_report" ]; then
        # The periodic check on a PC that runs the offered version already.
        read -r _ next_version _ _ next_hash < <(python3 -c '
import json, sys
r = json.load(open(sys.argv[1]))
print(r["name"], r["version"], r["compatible"], r["security_epoch"], r["root_hash"])' "$next_report")
        cp "$work/os-release" "$work/os-release.a"; cp "$work/cmdline" "$work/cmdline.a"
        sed -i "s/^IMAGE_VERSION=.*/IMAGE_VERSION=$next_version/" "$work/os-release"
        echo "initrd=x roothash=$next_hash ro" > "$work/cmdline"
        start=$(now)
        agent_on apply --url "$url" > "$work/header.log" 2>&1 || { cat "$work/header.log" >&2; exit 1; }
        header=$(calc "$(now) - $start")
        mv "$work/os-release.a" "$work/os-release"; mv "$work/cmdline.a" "$work/cmdline"
        grep -q "running already; nothing to do" "$work/header.log" || { cat "$work/header.log" >&2; exit 1; }
        echo "$header" >> "$work/header.txt"
        printf 'bench-update: run %d: periodic check, the version running already: %.3f s\n' "$run" "$header"
    fi
done

check=$(median < "$work/check.txt")
apply=$(median < "$work/apply.txt")
mb=$(calc "$bundle_bytes / 1000000")
printf 'bench-update: verification alone: median %.1f s, %.0f MB/s of bundle\n' "$check" "$(calc "$mb / $check")"
printf 'bench-update: apply (verify, write slot B, read back, UKI): median %.1f s, %.0f MB/s of bundle\n' "$apply" "$(calc "$mb / $apply")"
fetched=$(median < "$work/url.txt")
printf 'bench-update: apply from the update server (download, then the same): median %.1f s, %.0f MB/s of bundle; URL / file %.2f\n' "$fetched" "$(calc "$mb / $fetched")" "$(calc "$fetched / $apply")"
if [ -s "$work/header.txt" ]; then
    header=$(median < "$work/header.txt")
    printf 'bench-update: periodic check with nothing new (header only): median %.3f s; / apply from the server %.4f\n' "$header" "$(calc "$header / $fetched")"
fi
printf 'bench-update: bundle %d MiB / image %d MiB = %.2f\n' "$((bundle_bytes >> 20))" "$((image_bytes >> 20))" "$(calc "$bundle_bytes / $image_bytes")"
